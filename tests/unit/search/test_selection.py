"""Tests of hpo.search.selection: the failure verdict, cheapest_within, the Pareto front of a multi-objective study."""

from __future__ import annotations

import pytest
from pathlib import Path
from types import SimpleNamespace

from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial
import optuna
from optuna.distributions import FloatDistribution

from hpo.analysis import report
from hpo.search import loop, selection
from hpo.registry.promote import promote
from hpo.search.selection import cheapest_within, failure_verdict


@pytest.mark.slow
def test_multi_objective_study_keeps_a_front_and_promotes_a_point_of_it(tiny_cfg):
    objectives = ["study.objectives=[val_energy_rmse,fit_time_s]", "study.sampler=random", "study.n_trials=4"]
    cfg = tiny_cfg(*objectives)
    study = loop.run(cfg)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(study.directions) == 2 and len(complete) == 4
    for trial in complete:
        assert trial.values[1] == trial.user_attrs["fit_time_s"] > 0
    front = {t.number for t in study.best_trials}
    assert selection.best_trial(study).number in front
    assert (Path(cfg.experiments_dir) / study.study_name / "pareto_front.png").read_bytes().startswith(b"\x89PNG")
    page = report.write_report(cfg).html.read_text()
    assert f"<h2>{report.SECTIONS['pareto']}" in page

    within = 0.5
    best = min(t.values[0] for t in complete)
    expected = min((t for t in complete if t.values[0] <= best * (1 + within)), key=lambda t: t.user_attrs["fit_time_s"])
    lineage = promote(tiny_cfg(*objectives, "promote.pick=cheapest_within", f"promote.within={within}", "promote.cost=fit_time_s", "promote.screen.k=0"))
    assert lineage["trial"] == expected.number and lineage["pick"] == "cheapest_within"
    client = MlflowClient(cfg.tracking.tracking_uri)
    promote_run = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id], "tags.command = 'promote'"
    )[0]
    assert any(a.path.endswith("-pareto.png") for a in client.list_artifacts(promote_run.info.run_id))


def _study(values, costs=None, failed=0):
    study = optuna.create_study()
    dist = {"x": FloatDistribution(0, 1)}
    for i, value in enumerate(values):
        attrs = {"fit_time_s": costs[i]} if costs else {}
        study.add_trial(create_trial(value=value, params={"x": 0.5}, distributions=dist, user_attrs=attrs))
    for _ in range(failed):
        study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=dist, user_attrs={"failure": "gap_fit_error"}))
    return study


def test_failure_verdict_counts_failed_over_ended_trials():
    study_cfg = SimpleNamespace(min_trials_for_failure_rate=4, max_failure_rate=0.5)
    assert failure_verdict(_study([1.0, 2.0], failed=2), study_cfg) is None  # 2 of 4: not more than half
    verdict = failure_verdict(_study([1.0], failed=3), study_cfg)
    assert verdict.startswith("3 of 4 trials failed") and "gap_fit_error" in verdict
    assert failure_verdict(_study([], failed=3), study_cfg) is None  # too few ended trials to judge


def test_cheapest_within_trades_accuracy_for_cost():
    study = _study([0.100, 0.104, 0.120], costs=[10.0, 2.0, 1.0])
    assert cheapest_within(study, 0.05, "fit_time_s").values[0] == 0.104  # 0.120 is beyond 5 %
    assert cheapest_within(study, 0.0, "fit_time_s").values[0] == 0.100
