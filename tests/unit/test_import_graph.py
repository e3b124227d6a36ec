"""tools/import_graph.py on src/hpo: no import cycle."""

from __future__ import annotations



def test_import_graph_has_no_cycles():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "tools" / "import_graph.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
    assert " 0 cycles" in done.stdout
