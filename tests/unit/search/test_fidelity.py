"""Tests of hpo.search.fidelity: multi-fidelity studies (successive halving, hyperband) and their settings."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.search import loop
from hpo.config import ConfigError, validate


@pytest.mark.slow
def test_multi_fidelity_study_prunes_and_records(tiny_cfg):
    cfg = tiny_cfg(
        "study.n_trials=6",
        "study.fidelity_rungs=[0.5,1.0]",
        "study.pruner=successive_halving",
        "study.sampler=random",
        "study.enqueue_default=false",
    )
    study = loop.run(cfg)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert pruned and complete
    assert len(pruned) + len(complete) == 6  # a pruned trial counts towards n_trials: its fit cost time
    assert all(list(t.intermediate_values) == [5] for t in pruned)  # pruned after the 5-frame rung of 10
    assert all(sorted(t.intermediate_values) == [5, 10] for t in complete)

    client = MlflowClient(cfg.tracking.tracking_uri)
    for trial in pruned:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["state"] == "PRUNED" and run.info.status == "KILLED"
        assert run.data.tags["pruned_at_size"] == "5"
        history = client.get_metric_history(run.info.run_id, "val_energy_rmse")
        assert [m.step for m in history] == [5]
        assert history[0].value == pytest.approx(trial.intermediate_values[5])


@pytest.mark.parametrize(
    "override",
    ["study.fidelity_rungs=[0.5,0.25]", "study.fidelity_rungs=[0.5]", "study.pruner=hyperband", "study.reduction_factor=1"],
)
def test_bad_fidelity_settings_are_refused(tiny_cfg, override):
    with pytest.raises(ConfigError, match=r"study\.(fidelity_rungs|pruner|reduction_factor)="):
        validate(tiny_cfg(override))


@pytest.mark.slow
def test_hyperband_study_counts_pruned_trials(tiny_cfg):
    cfg = tiny_cfg(
        "study.n_trials=4",
        "study.fidelity_rungs=[0.3,1.0]",
        "study.pruner=hyperband",
        "study.sampler=random",
        "study.enqueue_default=false",
    )
    study = loop.run(cfg)
    ended = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(ended) == 4 and all(t.intermediate_values for t in ended)
    assert all(3 in t.intermediate_values for t in ended)  # every trial reported the 3-frame rung of 10
