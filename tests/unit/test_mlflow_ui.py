"""Tests of hpo.mlflow_ui (and the records beside it): what the MLflow UI opens on, the study's own record
(hpo.search.study_record) that readers such as `hpo report` compose their config from, the console lines."""

from __future__ import annotations

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient

from hpo.config import ConfigError, load_config
from hpo.mlflow_ui import TRIAL_FILTER, TRIALS_VIEW
from hpo.search import loop, study_record
from hpo.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, NOTE_TAG, Tracker

from helpers import runs_of, hpo_cli


@pytest.mark.slow
def test_study_records_what_the_ui_and_readers_need(tiny_cfg, tiny_overrides, tmp_path, capsys):
    # 14 training frames hold 112 H environments: n_sparse=200 is fitted as 112
    overrides = ("dataset.train_size=100", "study.n_trials=2", "model.n_sparse=200")
    cfg = tiny_cfg(*overrides)
    study = loop.run(cfg)
    out = capsys.readouterr().out

    # the study's own record
    assert study.user_attrs == {"model_kind": "gap", "dataset": "water", "train_size": 100, "cv_folds": 1}
    # effective n_sparse next to the requested one, units on the trial lines, disk use at the end
    default = next(t for t in study.trials if t.user_attrs.get("is_default"))
    assert default.params["n_sparse"] == 200 and default.user_attrs["effective_params"] == {"n_sparse": 112}
    assert "112 <- 200" in out
    assert "[hpo] trial 0: " in out and " eV per cell | finished 1/2" in out
    assert "model.descriptor_cache_dir" in out and "descriptor_cache_max_gb=1 GB" in out
    assert "viewStateShareKey=hpo-trials&workflowType=machine_learning" in out

    # MLflow: experiment kind, saved trials view, run types, descriptions
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert "tags.run_type = 'trial'" in experiment.tags[NOTE_TAG]  # the experiment's description
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{TRIALS_VIEW}"])
    state = json.loads(view["state"])
    assert state["searchFilter"] == TRIAL_FILTER == "tags.run_type = 'trial'"
    assert "metrics.`val_energy_rmse`" in state["selectedColumns"] and "params.`n_sparse_requested`" in state["selectedColumns"]
    parents, children = runs_of(cfg)
    assert [p.data.tags["run_type"] for p in parents] == ["study"]
    trials = client.search_runs([experiment.experiment_id], filter_string=TRIAL_FILTER)
    assert {r.info.run_id for r in trials} == {c.info.run_id for c in children} and len(trials) == 2
    note = next(r for r in trials if r.data.tags["trial_number"] == str(default.number)).data.tags[NOTE_TAG]
    assert "validation energy RMSE" in note and "eV per cell" in note and "meV/atom" in note
    assert "n_sparse: 112 as fitted (200 requested" in note

    # an experiment made before hpo tagged the kind gets the tag when next opened
    client.create_experiment("older", artifact_location=(tmp_path / "older").as_uri())
    Tracker(load_config([*tiny_overrides, "tracking.experiment=older"]).tracking)
    assert client.get_experiment_by_name("older").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    # A reader composes its config from the record: no dataset.train_size=100 needed, a conflict refused.
    name = study.study_name
    base = [*tiny_overrides, f"study.name={name}"]
    again = study_record.config_for_study(load_config(base), overrides=base)
    assert again.dataset.train_size == 100 and again.study.name == name
    with pytest.raises(ConfigError, match="was run with dataset.train_size=100, but the command gives dataset.train_size=50"):
        study_record.config_for_study(load_config([*base, "dataset.train_size=50"]), overrides=[*base, "dataset.train_size=50"])
    with pytest.raises(ConfigError, match="compose the config with them"):  # outside the CLI nothing is recomposed silently
        study_record.config_for_study(load_config(base))

    # a study of another kind: model=sagpr is composed in, and study.name stays the study's
    other = optuna.create_study(study_name="water-sagpr-demo", storage=str(cfg.study.storage))
    other.set_user_attr("model_kind", "sagpr")
    with pytest.raises(ConfigError, match="overrides do not fit it: Could not override 'model.n_sparse'"):
        study_record.config_for_study(load_config([*tiny_overrides, "study.name=water-sagpr-demo"]), overrides=[*tiny_overrides, "study.name=water-sagpr-demo"])
    plain = [o for o in tiny_overrides if not o.startswith(("model.", "search="))]
    composed = study_record.config_for_study(load_config([*plain, "study.name=water-sagpr-demo"]), overrides=[*plain, "study.name=water-sagpr-demo"])
    assert composed.model.kind == "sagpr" and composed.study.name == "water-sagpr-demo" and composed.study.metric == "val_rmse"
    with pytest.raises(ConfigError, match="was run with model=sagpr"):
        study_record.config_for_study(load_config([*plain, "model=gap"]), "water-sagpr-demo", overrides=[*plain, "model=gap"])
    assert study_record.kind_of_params({"reg0", "nc"}) == "sagpr" and study_record.kind_of_params({"n_sparse"}) == "gap"

    # the report command, given only the study's name, reads training size and model from the study
    result = hpo_cli("report", *[o for o in tiny_overrides], f"study.name={name}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was run with dataset.train_size=100" in result.stdout
    assert "[I " not in result.stdout + result.stderr  # no Optuna INFO lines
    assert "Warning" not in result.stderr, result.stderr[-3000:]
