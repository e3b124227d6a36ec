"""Tests of hpo.search.loop (what `hpo optimize` runs), in process on real gap_fit, Optuna and MLflow stores:
a study tracked and resumed, failures and refusals. Every bad input is refused before any fit in one
paragraph and leaves nothing behind (no Optuna study, no MLflow run, no trial directory); a refused study
leaves no run RUNNING."""

from __future__ import annotations

from pathlib import Path
import math

import ase.io
import numpy as np
import pytest
from optuna.trial import TrialState
from mlflow.tracking import MlflowClient

from hpo.config import ConfigError, load_config, output_overrides
from hpo.data import DataError, load_datasets
from hpo.search import loop, storage
from hpo.search.storage import StudyError

from helpers import runs_of, assert_intact, assert_nothing_left, files_overrides, make_cfg, rewrite, set_position

def set_energy(frame, value):
    def change(frames):
        frames[frame].calc.results["energy"] = value

    return change


def set_force(frame, atom, axis, value):
    def change(frames):
        frames[frame].arrays["force"][atom, axis] = value

    return change


def drop_energy(frame):
    def change(frames):
        del frames[frame].calc.results["energy"]

    return change


def set_cell(frame, value):
    def change(frames):
        cell = frames[frame].cell.array.copy()
        cell[2, 2] = value
        frames[frame].set_cell(cell)

    return change


def carbon_in(frame):
    def change(frames):
        frames[frame].numbers[0] = 6

    return change


def text_edit(edit):
    def apply(path: Path):
        path.write_text(edit(path.read_text()))

    return apply


def narrow_forces(text: str) -> str:
    """Frame 0's force column declared and written with 2 components: a well-formed file, a wrong shape."""
    lines = text.splitlines()
    n = int(lines[0])
    lines[1] = lines[1].replace("force:R:3", "force:R:2", 1)
    lines[2 : 2 + n] = [" ".join(line.split()[:-1]) for line in lines[2 : 2 + n]]
    return "\n".join(lines) + "\n"


def duplicate_training_frame(data: Path) -> None:
    train = ase.io.read(data / "gap_input_50.xyz", ":")
    validation = ase.io.read(data / "gap_validate.xyz", ":")
    ase.io.write(data / "gap_validate.xyz", validation + [train[2]], format="extxyz")


TRAIN, VAL = "gap_input_50.xyz", "gap_validate.xyz"

# (id, file damage: (file name, change of its frames | change of the file) or None, overrides, error, message)
DATA_FAULTS = [
    ("nan-position", (VAL, set_position(1, 2, 0, np.nan)), [], DataError,
     "gap_validate.xyz, frame 1: non-finite positions (atom 2): nan; every value must be a finite number"),
    ("nan-energy", (TRAIN, set_energy(3, np.nan)), [], DataError,
     "gap_input_50.xyz, frame 3: non-finite energy: nan"),
    ("inf-force", (TRAIN, set_force(0, 5, 1, np.inf)), [], DataError,
     "gap_input_50.xyz, frame 0: non-finite forces (atom 5): inf"),
    ("nan-cell", (TRAIN, set_cell(4, np.nan)), [], DataError,
     "gap_input_50.xyz, frame 4: non-finite cell: nan"),
    ("missing-energy", (TRAIN, drop_energy(1)), [], DataError,
     "gap_input_50.xyz, frame 1: energy key 'energy' is missing (dataset.property_keys.energy)"),
    ("wrong-energy-key", None, ["dataset.property_keys.energy=free_energy"], DataError,
     "gap_input_50.xyz, frame 0: energy key 'free_energy' is missing"),
    ("wrong-force-shape", (TRAIN, text_edit(narrow_forces)), [], DataError,
     r"gap_input_50.xyz, frame 0: force column 'force' has shape (12, 2), expected (12, 3)"),
    ("species-not-in-training", (VAL, carbon_in(0)), ["+dataset.e0.C=-1027.0"], DataError,
     "gap_validate.xyz, frame 0: species ['C'] of the validation set are not in the training set "
     "(gap_input_50.xyz has ['H', 'O'])"),
    ("species-without-e0", (VAL, carbon_in(0)), [], DataError,
     "gap_validate.xyz, frame 0: species ['C'] have no e0 in the dataset config (dataset.e0)"),
    ("train-frame-in-validation", "duplicate", [], DataError,
     "1 frame(s) of the training set (gap_input_50.xyz) are also in the validation set (gap_validate.xyz); "
     "frame indices training<->validation: 2<->6. Splits must be disjoint."),
    ("empty-file", (VAL, text_edit(lambda text: "")), [], DataError, "gap_validate.xyz holds no frames"),
    ("malformed-extxyz", (VAL, text_edit(lambda text: "12\nnot an extxyz comment\nO 0 0\n")), [], DataError,
     "gap_validate.xyz is not a readable extended XYZ file"),
    ("binary-file", (TRAIN, "binary"), [], DataError,
     "gap_input_50.xyz is not a readable extended XYZ file: 'utf-8' codec can't decode"),
    ("missing-file", (VAL, "delete"), [], DataError, "lacks gap_validate.xyz"),
]

CONFIG_FAULTS = [
    ("missing-data-dir", ["dataset.data_dir=/nonexistent/water"], DataError,
     "dataset.data_dir='/nonexistent/water' is not a directory"),
    ("delta-negative", ["model.delta=-1"], ConfigError, "model.delta=-1 is not allowed: a positive number"),
    ("zeta-zero", ["model.zeta=0"], ConfigError, "model.zeta=0 is not allowed: an integer >= 1"),
    ("atom-sigma-over-cutoff", ["model.atom_sigma=3.5"], ConfigError,
     "model.atom_sigma=3.5 is not allowed: smaller than the cutoff (3.0)"),
    ("sagpr-l-max-0", ["model=sagpr", "search=sagpr_small", "model.l_max=0"], ConfigError,
     "model.l_max=0 is not allowed: an integer >= 1"),
    ("unknown-sampler", ["study.sampler=annealing"], ConfigError,
     "study.sampler='annealing' is not allowed: one of ('tpe', 'random', 'grid')"),
    ("search-bounds-reversed", ["search.space.cutoff.low=7.0"], ConfigError,
     "search.space.cutoff.low=7.0 is not allowed: low <= high (high=4.0)"),
    ("search-bound-not-a-number", ["search.space.n_sparse.high=many"], ConfigError,
     "search.space.n_sparse.high='many' is not allowed: a number"),
    ("search-bound-outside-model-range", ["search.space.n_max.low=0"], ConfigError,
     "search.space.n_max.low=0 is not allowed: a value model.n_max may take: an integer >= 1"),
    ("n-trials-0", ["study.n_trials=0"], ConfigError, "study.n_trials=0 is not allowed: an integer >= 1"),
    ("storage-dir-missing", ["study.storage=sqlite:////nonexistent/dir/optuna.db"], ConfigError,
     "study.storage='sqlite:////nonexistent/dir/optuna.db' is not allowed: a database in an existing directory"),
    ("cutoff-too-large-for-memory", ["model.solver=gap_fit", "model.fit_forces=true", "model.cutoff=100.0"], ConfigError,
     "model.cutoff=100.0 is not allowed for this data: cutoff=100.0 Å: about 3.92e+05 neighbours per atom"),
    ("descriptor-pass-over-time", ["model.cutoff=60.0"], ConfigError,  # energies only: no memory bound, 5e4 neighbours
     "model.cutoff=60.0 is not allowed for this data: cutoff=60.0 Å: the descriptors of the 10 training frames would take about"),
    ("search-space-over-memory", ["model.solver=gap_fit", "model.fit_forces=true", "search.space.cutoff.low=30.0", "search.space.cutoff.high=40.0", "model.memory_budget_gb=1"], ConfigError,
     "search.space.cutoff.low=30.0 is not allowed for this data: even the cheapest point of the search space is over budget: "
     "cutoff=30.0 Å: about 1.06e+04 neighbours per atom"),
]


# Should a fault slip through, the test fails after one short fit instead of running a study.
SAFETY = ["study.n_trials=1", "model.fit_timeout_s=60"]


def with_safety(overrides: list[str]) -> list[str]:
    keys = {o.split("=", 1)[0] for o in overrides}
    sagpr = "model=sagpr" in overrides
    return [o for o in SAFETY if o.split("=", 1)[0] not in keys and not (sagpr and "fit_timeout" in o)] + list(overrides)


def damage(data: Path, spec) -> None:
    if spec is None:
        return
    if spec == "duplicate":
        duplicate_training_frame(data)
        return
    name, change = spec
    path = data / name
    if change == "delete":
        path.unlink()
    elif change == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif change.__name__ == "apply":
        change(path)
    else:
        rewrite(path, change)


@pytest.mark.parametrize("case, spec, overrides, error, message", DATA_FAULTS, ids=[c[0] for c in DATA_FAULTS])
def test_bad_data_is_refused_before_any_fit(tiny_cfg, data_copy, tmp_path, case, spec, overrides, error, message):
    damage(data_copy, spec)
    cfg = tiny_cfg(*with_safety([f"dataset.data_dir={data_copy}", *overrides]))
    with pytest.raises(error) as raised:
        loop.run(cfg)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)  # one paragraph
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("case, overrides, error, message", CONFIG_FAULTS, ids=[c[0] for c in CONFIG_FAULTS])
def test_bad_config_is_refused_before_any_fit(tiny_cfg, tiny_data, tmp_path, case, overrides, error, message):
    if "model=sagpr" in overrides:  # the tiny GAP overrides do not apply
        cfg = load_config([f"dataset.data_dir={tiny_data}", *output_overrides(tmp_path), *with_safety(overrides)])
    else:
        cfg = tiny_cfg(*with_safety(overrides))
    with pytest.raises(error) as raised:
        loop.run(cfg)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert_nothing_left(tmp_path)


# The model's cutoff (3 Å) and the space's low end fit in 1.3 MB; almost every sampled cutoff does not.
OVER_BUDGET_SPACE = ["model.solver=gap_fit", "model.fit_forces=true", "study.enqueue_default=false", "~search.space", "+search.space={cutoff:{type:float,low:3.0,high:30.0}}",
                     "model.memory_budget_gb=0.0013"]


@pytest.mark.slow
def test_nothing_running_after_a_refused_study(tiny_cfg, tmp_path):
    """A study refused after the stores exist (every trial over the memory budget) leaves no run RUNNING."""
    cfg = tiny_cfg(*OVER_BUDGET_SPACE, "study.n_trials=1", "study.max_refused_trials=2")
    with pytest.raises(StudyError, match="2 trials were refused before any fit"):
        loop.run(cfg)
    parents, children = runs_of(cfg)
    assert len(parents) == 1 and len(children) == 2
    assert not [r for r in parents + children if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_resumed_study_does_not_replay(tiny_cfg):
    first = loop.run(tiny_cfg("study.n_trials=3", "study.enqueue_default=false"))
    earlier = [t.params for t in first.trials]
    resumed = loop.run(tiny_cfg("study.n_trials=5", "study.enqueue_default=false"))
    later = [t.params for t in resumed.trials[len(earlier):]]
    assert [t.params for t in resumed.trials[: len(earlier)]] == earlier
    assert len(later) == 2 and not [p for p in later if p in earlier]
    assert len({tuple(sorted(p.items())) for p in earlier + later}) == 5


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_share_one_study(tiny_cfg, tmp_path, storage):
    url = f"journal:{tmp_path}/study.log" if storage == "journal" else f"sqlite:///{tmp_path}/workers.db"
    cfg = tiny_cfg("study.n_trials=4", "study.n_workers=2", "threads=2", f"study.storage={url}")
    loop.run(cfg)
    study = assert_intact(cfg, 4)
    parents, children = runs_of(cfg)
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["threads"] for c in children} == {"1"}  # 2 threads shared by 2 workers
    assert len(study.trials) >= 4


TRIAL_METRICS = {
    "train_energy_rmse",
    "val_energy_rmse",
    "energy_rmse_gap",
    "energy_rmse_ratio",
    "fit_time_s",
    "eval_time_s",
}


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_files_study_with_energy_force_loss(emt, tmp_path):
    cfg = make_cfg(tmp_path, *files_overrides(emt), "study.n_trials=2")
    study = loop.run(cfg)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    parents, children = runs_of(cfg)
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].data.tags["check.forces_consistent"] == "pass"
    assert {t for t in parents[0].data.tags if t.startswith("check.")} >= {"check.keys_present", "check.finite", "check.duplicates"}
    for child in children:
        m = child.data.metrics
        assert {"val_force_rmse", "train_force_rmse", "val_loss", "val_energy_rmse_per_atom"} <= set(m)
        expected = math.sqrt(((m["val_energy_rmse_per_atom"] / m["loss_energy_scale"]) ** 2 + (m["val_force_rmse"] / m["loss_force_scale"]) ** 2) / 2)
        assert m["val_loss"] == pytest.approx(expected)
    assert sorted(t.values[0] for t in study.trials) == sorted(c.data.metrics["val_loss"] for c in children)
    data = load_datasets(cfg)
    assert children[0].data.metrics["loss_energy_scale"] == pytest.approx(np.std(data.val.energies / data.val.n_atoms))
