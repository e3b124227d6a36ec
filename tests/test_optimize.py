"""End to end: real gap_fit, a real SQLite Optuna storage, a real MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.search import loop, space, storage
from hpo.config import load_config

from helpers import runs_of
from hpo.search.space import search_space

TRIAL_METRICS = {
    "train_energy_rmse",
    "val_energy_rmse",
    "energy_rmse_gap",
    "energy_rmse_ratio",
    "fit_time_s",
    "eval_time_s",
}


def test_three_trial_study_is_tracked_and_resumes(tiny_cfg, capsys):
    cfg = tiny_cfg("study.n_trials=3")
    study = loop.run(cfg)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert study.trials[0].user_attrs["is_default"] is True
    assert study.trials[0].params["n_max"] == 2  # the model default, enqueued as trial 0

    parents, children = runs_of(cfg)
    assert len(parents) == 1 and len(children) == 3
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert TRIAL_METRICS <= set(child.data.metrics)
        assert child.data.metrics["energy_rmse_gap"] == pytest.approx(
            child.data.metrics["val_energy_rmse"] - child.data.metrics["train_energy_rmse"]
        )
        assert child.data.tags["overfit"] in ("true", "false")
        assert child.data.tags["state"] == "COMPLETE"
        assert child.info.status == "FINISHED"
        artifacts = {a.path for a in MlflowClient(cfg.tracking.tracking_uri).list_artifacts(child.info.run_id)}
        # the numpy solver's sparse points (one index file per species), kept for the gap_fit refit at promotion
        assert {"sparse_0.idx", "sparse_1.idx", "train_errors.csv", "validation_errors.csv", "parity_energy.png"} <= artifacts
        assert child.data.tags["solver"] == "numpy" and "descriptor_time_s" in child.data.metrics
        assert 0.1 < child.data.metrics["peak_rss_gb"] < 16  # the trial's own peak: a Python process with quippy
    best_run = next(c for c in children if c.data.tags["trial_number"] == str(study.best_trial.number))
    assert best_run.data.tags.get("model_logged") == "true"
    assert "gain over the default" in capsys.readouterr().out

    resumed = loop.run(tiny_cfg("study.n_trials=5"))
    numbers = [t.number for t in resumed.trials]
    assert len(resumed.get_trials(states=(TrialState.COMPLETE,))) == 5
    assert numbers == sorted(set(numbers))
    assert sum(bool(t.user_attrs.get("is_default")) for t in resumed.trials) == 1
    parents, children = runs_of(cfg)
    assert len(parents) == 2 and len(children) == 5


def test_failing_gap_fit_becomes_failed_trial_and_study_goes_on(tiny_cfg):
    # sparse_method=uniform is a valid option that gap_fit aborts on for descriptors of more than 30
    # dimensions ("SYSTEM ABORT: select_uniform: Descriptor is too large"): a real crash, not a mock.
    # With n_max=2, l_max=2 (the enqueued default) has 31 dimensions and fails; l_max=1 has 21 and fits.
    cfg = tiny_cfg(
        "study.n_trials=1",
        "study.max_failure_rate=0.9",
        "model.solver=gap_fit",
        "model.sparse_method=uniform",
        "~search.space",
        "+search.space={l_max:{type:int,low:1,high:2}}",
        "study.sampler=grid",
    )
    study = loop.run(cfg)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 1
    assert len(failed) == 1
    assert failed[0].user_attrs["failure"] == "gap_fit_error"
    _, children = runs_of(cfg)
    failed_runs = [c for c in children if c.data.tags["state"] == "FAIL"]
    assert len(failed_runs) == 1 and failed_runs[0].info.status == "FAILED"
    assert failed_runs[0].data.tags["failure"] == "gap_fit_error"
    assert "gap_fit" in failed_runs[0].data.tags["failure_message"]


def test_cli_optimize_and_multirun(tiny_overrides, tmp_path):
    command = [sys.executable, "-m", "hpo", "optimize", "--multirun", *tiny_overrides, "study.n_trials=1", "dataset.train_size=50,100"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/experiments/optuna.db"  # output_overrides: root=tmp_path
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"water-gap-50", "water-gap-100"}
    assert {p.name for p in tmp_path.iterdir()} == {"experiments", "mlruns"}  # Hydra's sweep folders included
    assert "[hpo] trial 0:" in done.stdout


def test_cli_fit_prints_metrics(tiny_overrides, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "fit", *tiny_overrides], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val_energy_rmse" in done.stdout


def test_same_seed_same_suggestions(tiny_overrides, tmp_path):
    def suggestions(name):
        cfg = load_config([*tiny_overrides, f"study.name={name}"])
        params = search_space(cfg)
        study = storage.open_study(cfg, params)
        distributions = {p.name: space.distribution(p) for p in params}
        return [study.ask(distributions).params for _ in range(3)]

    assert suggestions("a") == suggestions("b")


def test_memory_estimate_matches_gap_fit_and_budget_prunes(tiny_cfg, tiny_data):
    import re
    from pathlib import Path

    import ase.io

    from hpo.models.gap import gap_fit as gap

    # every sampled trial is over budget (the model itself and the space's low end are not, or the config
    # would be refused up front): the study stops after study.max_refused_trials refusals, with the reason
    cfg = tiny_cfg(
        "study.n_trials=1", "study.max_refused_trials=3", "model.memory_budget_gb=0.0013", "study.enqueue_default=false", "model.solver=gap_fit", "model.fit_forces=true",
        "~search.space", "+search.space={cutoff:{type:float,low:3.0,high:30.0}}",
    )
    with pytest.raises(storage.StudyError, match="3 trials were refused before any fit.*memory_budget_gb=0.0013"):
        loop.run(cfg)
    study = storage.load_study(cfg.study)
    assert not study.get_trials(states=(TrialState.COMPLETE,))
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(pruned) == 3 and pruned[0].user_attrs["failure"] == "memory_budget"
    parents, children = runs_of(cfg)
    assert children[0].data.tags["state"] == "PRUNED" and children[0].data.metrics["memory_estimate_gb"] > 0
    assert {run.info.status for run in parents + children} == {"FAILED", "KILLED"}  # nothing left RUNNING

    # the estimate is gap_fit's own: compare with the arrays it lists for a real fit
    trial = loop.run(tiny_cfg("study.n_trials=1", "study.name=fits", "model.solver=gap_fit")).best_trial
    printed = (Path(trial.user_attrs["workdir"]) / "gap_fit.out").read_text()
    arrays = re.findall(r"^(?:yY|yy|A) +(\d+) +(\d+) +memory .*?( \* 2)?$", printed, re.M)
    assert len(arrays) == 3
    total = sum(8 * int(rows) * int(cols) * (2 if twice else 1) for rows, cols, twice in arrays)
    frames = ase.io.read(tiny_data / "gap_input_50.xyz", ":")
    assert gap.covariance_memory_bytes(20, frames, with_forces=False) == total  # water's default: energies only


def test_a_second_descriptor_is_searched_by_its_path(tiny_cfg):
    """model.descriptors adds a short SOAP beside the model's own; the search samples its cutoff by path
    (descriptors.0.cutoff), the trial fits both (two index files per species) and records the sampled value."""
    cfg = tiny_cfg(
        "study.n_trials=2",
        "model.descriptors=[{cutoff:2.0,atom_sigma:0.4,n_sparse:8,delta:0.3,zeta:3}]",
        "~search.space",
        "+search.space={descriptors.0.cutoff:{type:float,low:1.5,high:2.5}}",
    )
    study = loop.run(cfg)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    assert trials[0].params["descriptors.0.cutoff"] == 2.0  # the enqueued default: the config's entry
    assert 1.5 <= trials[1].params["descriptors.0.cutoff"] <= 2.5
    _, children = runs_of(cfg)
    for child in children:
        artifacts = {a.path for a in MlflowClient(cfg.tracking.tracking_uri).list_artifacts(child.info.run_id)}
        assert {f"sparse_{i}.idx" for i in range(4)} <= artifacts  # 2 descriptors x 2 species (O, H)
        assert float(child.data.params["descriptors.0.cutoff"]) == trials[int(child.data.tags["trial_number"])].params["descriptors.0.cutoff"]
    xml = Path(study.best_trial.user_attrs["workdir"]) / "gap.xml"
    assert xml.read_text().count("<gpCoordinates") == 4


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{cutof:2.0}", "model.descriptors.0.cutof is not a descriptor key"),
        ("{cutoff:-2.0}", "model.descriptors.0.cutoff=-2.0 is not allowed: a positive number"),
        ("{cutoff:2.0,atom_sigma:3.0}", "model.descriptors.0.atom_sigma=3.0 is not allowed: smaller than the cutoff (2.0)"),
        ("{descriptor:distance_2b}", "model.descriptors.0.descriptor='distance_2b' is not allowed: one of ('soap',)"),
    ],
)
def test_a_bad_descriptor_entry_is_named(tiny_cfg, entry, message):
    from hpo import config as hpo_config
    from hpo.models.base import ConfigError

    with pytest.raises(ConfigError) as error:
        hpo_config.validate(tiny_cfg(f"model.descriptors=[{entry}]"))
    assert message in str(error.value)
