"""Tests of hpo.analysis.report: a self-contained HTML page from a real tiny study."""

from __future__ import annotations

import pytest
import os
import stat
from pathlib import Path

from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.analysis import fit_series, report
from hpo.search import loop


@pytest.mark.slow
def test_report_of_a_three_trial_study(tiny_cfg, tmp_path):
    overrides = ("study.n_trials=3",)
    study = loop.run(tiny_cfg(*overrides))

    # Default config: 3 trials are too few for importances, which the page says instead of drawing noise.
    previous = os.umask(0o022)  # the usual umask: the page must be readable by the group, not 0600 as mkstemp makes it
    try:
        result = report.write_report(tiny_cfg(*overrides))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(result.html.stat().st_mode) == 0o644
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in result.figures)
    page = result.html.read_text()
    assert result.html.name == f"{study.study_name}.html"
    for key, heading in report.SECTIONS.items():
        assert (f"<h2>{heading}" in page) == (key != "pareto"), heading  # a Pareto front only for several objectives
    assert "importances need at least" in page
    assert page.count('<img src="data:image/png;base64,') == 4  # history, slice, train vs val, best parity
    assert "http://" not in page and "https://" not in page
    assert f"<td>{study.best_trial.number}</td>" in page

    # With the threshold lowered the importance figure is drawn (the section alone: no second page needed).
    cfg = tiny_cfg(*overrides, "report.min_trials_for_importance=3")
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    section = report.importance_section(cfg, study, finished, tmp_path / "importance.png", "title")
    assert section.figures == [tmp_path / "importance.png"] and not section.note

    cfg = tiny_cfg(*overrides)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    logged = {Path(a.path).name for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"history.png", "slice.png", "train_vs_validation.png", "parity_energy.png", result.html.name} <= logged

    # The learning curve and sweep take their fixed parameters from the study's best trial.
    model, source = fit_series.fixed_model(cfg, study.study_name)
    assert source == f"best trial {study.best_trial.number} of study {study.study_name}"
    assert model["n_max"] == study.best_trial.params["n_max"]
    assert model["default_sigma"]["energy"] == study.best_trial.params["default_sigma.energy"]
