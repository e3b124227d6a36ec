"""`hpo pipeline` end to end: every stage (GAP study, SA-GPR study, promotions, MD, polarizabilities), then
reused; on own files without polarizabilities it ends with the GAP's MD."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from hpo import md as hpo_md
from hpo.config import load_config, output_overrides

from helpers import files_overrides

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow


def test_pipeline_runs_every_stage_then_reuses_them(tiny_data, tmp_path, capsys):
    from hpo import pipeline

    overrides = [
        f"dataset.data_dir={tiny_data}",
        *output_overrides(tmp_path),
        "pipeline.gap_trials=2",
        "pipeline.gap_train_size=50",
        "pipeline.sagpr_trials=2",
        "pipeline.sagpr_train_size=50",
        "pipeline.gap_overrides=['model.n_max=2','model.l_max=2','model.n_sparse=20','model.cutoff=3.0','search=gap_small','model.solver=gap_fit','model.fit_forces=true']",
        "pipeline.sagpr_overrides=['search=sagpr_small','model.n_max=2','model.l_max=2','model.nc=null','model.rc=3.0']",
        "md.steps=10",
        "md.stability.max_extrapolating_fraction=null",
    ]
    first = pipeline.run(overrides)
    assert first["md"]["steps_completed"] == 10
    assert first["polarize"]["n_frames"] == 11 and 0 <= first["polarize"]["fraction_outside"] <= 1
    assert 0 <= first["polarize"]["fraction_uncertain"] <= 1 and first["polarize"]["uncertainty_threshold"] > 0
    assert first["md"]["md_stable"] is True
    client = mlflow.tracking.MlflowClient(load_config(overrides).tracking.tracking_uri)
    sagpr = client.get_model_version("water-sagpr", first["sagpr_version"]).tags
    assert float(sagpr["test_rmse"]) > 0 and float(sagpr["test_rmse_xx"]) > 0 and "md_stable" not in sagpr
    # the same through the command line: every stage is found done and reused
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "pipeline", *overrides], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("reused") == 2 and done.stdout.count("reusing") == 2 and "already holds study" in done.stdout
    assert f"GAP version {first['gap_version']}," in done.stdout
    # an MD that leaves the stability criteria (here: a 1000 K floor) is not used for polarizabilities
    # (the gate is off, else promote itself would refuse every candidate under that floor)
    with pytest.raises(hpo_md.MDUnstable, match=r"not stable \(md_stable=false\): temperature .* at step 0"):
        pipeline.run([*overrides, "promote.screen.k=0", "md.stability.min_temperature_K=1000"])


def test_pipeline_on_own_files_without_polarizability(emt, tmp_path, capsys):
    """Own data keep their training set; without polarizabilities the pipeline ends with the GAP's MD."""
    from hpo import pipeline

    overrides = [
        *output_overrides(tmp_path), *files_overrides(emt), "dataset.name=emtpipe",
        "pipeline.gap_trials=2", "md.steps=20", "promote.screen.steps=20",
    ]
    summary = pipeline.run(overrides)
    assert summary["gap_version"] == 1 and summary["md"]["md_stable"]
    assert summary["sagpr_version"] is None and summary["polarize"] is None
    out = capsys.readouterr().out
    assert "no polarizability in the data" in out and "pipeline done: GAP version 1" in out
    # a second run reuses every stage
    assert pipeline.run(overrides)["md"] == summary["md"]
    assert "already holds 2 finished trials: reused" in capsys.readouterr().out
