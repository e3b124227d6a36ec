"""`hpo data check` end to end in a subprocess on the EMT set of emt_data.py: every check passes, the plot
and the MLflow run are written."""

from __future__ import annotations

import pytest
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from hpo.config import load_config, output_overrides

from helpers import files_overrides, last_check_run

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow


PROJECT = Path(__file__).resolve().parents[2]


def test_data_check_command_passes_the_emt_set(emt, tmp_path, mlruns):
    overrides = [*output_overrides(tmp_path), *mlruns, *files_overrides(emt)]
    env = dict(os.environ, PYTHONPATH=str(PROJECT / "src"))
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "data", "check", *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "7 checks: 0 failed" in done.stdout
    pngs = list((tmp_path / "experiments" / "data_check").glob("*.png"))
    assert len(pngs) == 1
    cfg = load_config(overrides)
    run = last_check_run(cfg)
    assert run.data.tags["command"] == "data check" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert {tags[k] for k in tags if k.startswith("check.")} == {"pass"} and len([k for k in tags if k.startswith("check.")]) == 7
    artifacts = {a.path for a in MlflowClient(cfg.tracking.tracking_uri).list_artifacts(run.info.run_id)}
    assert pngs[0].name in artifacts and "data_check.json" in artifacts
