"""Cheap evaluation and multi-fidelity search, on real gap_fit fits of tiny data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.analysis import report
from hpo.models.gap import gap_fit as gap
from hpo.search import loop, selection
from hpo.cache import Cache
from hpo.config import ConfigError, model_params, validate
from hpo.data import load_datasets
from hpo.search.objective import score
from hpo.registry.promote import promote
from hpo.models.gap.descriptors import descriptor_key
from hpo.models.gap.sparse_gap import SparseGap


@pytest.fixture
def fitted(tiny_cfg, tmp_path):
    """A tiny GAP fitted by gap_fit, with the frames it was trained and validated on."""
    cfg = tiny_cfg()
    data = load_datasets(cfg)
    model = model_params(cfg)
    model["n_sparse"] = gap.effective_n_sparse(model["n_sparse"], data.train.frames)
    result = gap.GAP(model, dict(cfg.dataset.e0), cfg.dataset.property_keys).fit(data.train.path, tmp_path / "fit")
    return model, data, result.model_file_


def quippy_energies(model_file, frames) -> np.ndarray:
    energies, _ = gap.predict(gap.load(model_file), frames)
    return energies


def test_numpy_energies_equal_quippy(fitted, tmp_path):
    model, data, model_file = fitted
    frames = data.train.frames + data.val.frames
    sparse = SparseGap.read(model_file)
    assert len(sparse.gps) == 2  # one sparse GP per centre species (H, O)
    difference = np.abs(sparse.predict(frames) - quippy_energies(model_file, frames))
    assert difference.max() < 1e-6

    # The descriptors hpo computes while gap_fit runs are the ones gap_fit writes into the model.
    expected = sorted(descriptor_key(d) for d in gap.expected_descriptors(model, data.train.frames))
    assert expected == sorted(descriptor_key(d) for d in sparse.descriptors)


def test_descriptor_cache_is_reused_and_exact(fitted, tmp_path):
    _, data, model_file = fitted
    sparse = SparseGap.read(model_file)
    cache = Cache(tmp_path / "cache")
    n = len(data.val.frames)  # entries are per frame and per descriptor (2 species)
    first = sparse.predict(data.val.frames, cache)
    assert cache.stats["gap_descriptors_miss"] == 2 * n and cache.stats["gap_descriptors_hit"] == 0
    second = sparse.predict(data.val.frames, cache)
    assert cache.stats["gap_descriptors_hit"] == 2 * n
    np.testing.assert_array_equal(first, second)
    # A subset of seen frames is all hits; a moved frame is a new entry, never a stale hit.
    sparse.predict(data.val.frames[:3], cache)
    assert cache.stats["gap_descriptors_hit"] == 2 * n + 6 and cache.stats["gap_descriptors_miss"] == 2 * n
    moved = data.val.frames[0].copy()
    moved.positions[0, 0] += 1e-9
    sparse.predict([moved], cache)
    assert cache.stats["gap_descriptors_miss"] == 2 * n + 2


def test_both_solvers_fit_the_same_targets(tiny_cfg, tmp_path):
    """model.fit_forces decides whether forces enter the fit, for both solvers: with every environment a
    sparse point (n_sparse above the count, so the selection method cannot differ) the two fit the same model
    with and without forces (before, gap_fit fitted the force column whatever the setting)."""
    for forces in ("false", "true"):
        runs = {}
        for solver in ("numpy", "gap_fit"):
            cfg = tiny_cfg(f"model.solver={solver}", f"model.fit_forces={forces}", "model.n_sparse=10000", "model.cost_frames=2")
            runs[solver] = score(cfg, model_params(cfg), load_datasets(cfg), tmp_path / f"{solver}-{forces}")
        for key in ("train_energy_rmse", "val_energy_rmse"):
            assert runs["numpy"].metrics[key] == pytest.approx(runs["gap_fit"].metrics[key], abs=1e-6)
        command = (tmp_path / f"gap_fit-{forces}" / "gap_fit.cmd").read_text()
        assert ("force_parameter_name=hpo_no_force_targets" in command) == (forces == "false")
        if forces == "true":
            assert runs["numpy"].metrics["val_force_rmse"] == pytest.approx(runs["gap_fit"].metrics["val_force_rmse"], abs=1e-5)
            assert runs["numpy"].metrics["train_force_rmse"] == pytest.approx(runs["gap_fit"].metrics["train_force_rmse"], abs=1e-5)
        else:
            assert "val_force_rmse" not in runs["numpy"].metrics and "val_force_rmse" not in runs["gap_fit"].metrics
        assert runs["gap_fit"].metrics["md_ms_per_atom"] > 0


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


def test_bad_objectives_are_refused(tiny_cfg):
    with pytest.raises(ConfigError, match=r"study\.objectives="):
        validate(tiny_cfg("study.objectives=[fit_time_s,val_energy_rmse]"))
    with pytest.raises(ConfigError, match=r"md_ms_per_atom only with model.cost_frames"):
        validate(tiny_cfg("study.objectives=[val_energy_rmse,md_ms_per_atom]"))
    with pytest.raises(ConfigError, match=r"study\.pruner="):
        validate(tiny_cfg("study.objectives=[val_energy_rmse,fit_time_s]", "study.fidelity_rungs=[0.5,1.0]", "study.pruner=hyperband"))


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


def test_cross_validation_scores_folds_of_training_and_validation(tiny_cfg, tmp_path):
    cfg = tiny_cfg("study.cv_folds=3")
    data = load_datasets(cfg)
    scored = score(cfg, model_params(cfg), data, tmp_path / "cv")
    folds = sorted((tmp_path / "cv" / "cv").glob("fold_*"))
    assert len(folds) == 3
    fold_rmse = []
    for fold in folds:
        rows = np.loadtxt(fold / "validation_errors.csv", delimiter=",", skiprows=1)
        fold_rmse.append(np.sqrt(np.mean((rows[:, 1] - rows[:, 0]) ** 2)))
    # every frame of training + validation is validated exactly once, and the metric is the folds' mean
    assert sum(len(np.loadtxt(f / "validation_errors.csv", delimiter=",", skiprows=1)) for f in folds) == len(data.train) + len(data.val)
    assert scored.metrics["val_energy_rmse"] == pytest.approx(np.mean(fold_rmse), rel=1e-9)
    assert scored.metrics["cv_std_val_energy_rmse"] == pytest.approx(np.std(fold_rmse), rel=1e-9)
    plain = score(tiny_cfg(), model_params(cfg), data, tmp_path / "plain")
    assert scored.metrics["split_val_energy_rmse"] == pytest.approx(plain.metrics["val_energy_rmse"], rel=1e-9)
