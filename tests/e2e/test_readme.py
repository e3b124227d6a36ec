"""The README opens with the two commands a new user types; CI (.ci/run) must run exactly the second one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The commands of the README's first bash block, comments stripped."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    install_and_run, tests = readme_commands()[:2]
    assert "pytest" in tests and "pytest" not in install_and_run
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines, f"README's test command {tests!r} is not a line of .ci/run"


def test_readme_commands_start_from_a_new_environment():
    """Both commands make their own virtual environment, so they work on a bare machine and never rely
    on packages a developer installed by hand (the test command clears it first)."""
    install_and_run, tests = readme_commands()[:2]
    assert install_and_run.startswith("python3 -m venv .venv && .venv/bin/pip install")
    assert tests.startswith("python3 -m venv --clear .venv && .venv/bin/pip install")
    assert '".[test]"' in tests
