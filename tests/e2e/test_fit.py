"""`hpo fit` end to end: one fit with the config's parameters, its metrics printed."""

from __future__ import annotations

import pytest
import subprocess
import sys

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow


def test_cli_fit_prints_metrics(tiny_overrides, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "fit", *tiny_overrides], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val_energy_rmse" in done.stdout
