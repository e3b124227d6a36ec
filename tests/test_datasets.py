"""Bring your own data (dataset=files / dataset=pool, `data check`), on the EMT set of emt_data.py:
real gap_fit, real Optuna and MLflow stores, no mocks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from emt_data import write_emt_dataset
from helpers import runs_of
from hpo import metrics
from hpo.config import ConfigError, load_config, model_params, output_overrides, validate
from hpo.data import DataError, check_command, load_datasets, load_test_set, shared_frames
from hpo.search import loop
from hpo.search.objective import score

TINY = ["model.n_max=2", "model.l_max=2", "model.n_sparse=20", "model.cutoff=3.0", "search=gap_small"]
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emt(tmp_path_factory) -> dict[str, Path]:
    return write_emt_dataset(tmp_path_factory.mktemp("emt"))


@pytest.fixture(scope="module")
def mlruns(tmp_path_factory) -> list[str]:
    """One MLflow store for the data-check tests: creating a store costs ~10 s."""
    root = tmp_path_factory.mktemp("mlruns")
    return [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_location={root}/artifacts"]


def last_check_run(cfg):
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.run_type = 'data_check'", order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0]


def files_overrides(paths: dict[str, Path], prefix: str = "", test: bool = True) -> list[str]:
    out = ["dataset=files", f"dataset.train={paths[prefix + 'train']}", f"dataset.val={paths[prefix + 'val']}"]
    return out + ([f"dataset.test={paths[prefix + 'test']}"] if test else [])


def make_cfg(tmp_path: Path, *overrides: str):
    tiny = [] if "model=sagpr" in overrides else TINY
    return load_config([*output_overrides(tmp_path), *tiny, *overrides])


# --------------------------------------------------------------------------- the loss (pure)


def test_loss_formula_and_scales():
    assert metrics.loss(0.2, 0.3, 1.0, 1.0, 0.1, 0.3) == pytest.approx(math.sqrt((4 + 1) / 2))
    assert metrics.loss(0.2, 0.3, 1.0, 3.0, 0.1, 0.3) == pytest.approx(math.sqrt((4 + 3) / 4))
    # no force error (fit_forces=false) or no force weight: the energy term alone
    assert metrics.loss(0.2, None, 1.0, 1.0, 0.1, None) == pytest.approx(2.0)
    assert metrics.loss(0.2, 0.3, 1.0, 0.0, 0.1, 0.3) == pytest.approx(2.0)
    assert metrics.loss(0.2, 0.3, 0.0, 1.0, 0.1, 0.3) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.loss(0.2, None, 0.0, 1.0, 0.1, None)
    energies, n_atoms = np.array([4.0, 8.0, 2.0]), np.array([2, 4, 2])
    forces = [np.array([[1.0, -1.0, 0.0]]), np.array([[2.0, 0.0, 0.0]])]
    e_scale, f_scale = metrics.loss_scales(energies, n_atoms, forces)
    assert e_scale == pytest.approx(np.std([2.0, 2.0, 1.0])) and f_scale == pytest.approx(np.std([1, -1, 0, 2, 0, 0]))
    assert metrics.loss_scales(energies, n_atoms, None, None, None)[1] is None
    assert metrics.loss_scales(energies, n_atoms, forces, 0.5, 2.0) == (0.5, 2.0)
    with pytest.raises(ValueError, match="energy_scale"):
        metrics.loss_scales(np.array([1.0, 1.0]), np.array([1, 1]), None)
    found = {"train_energy_rmse_per_atom": 0.1, "val_energy_rmse_per_atom": 0.2, "val_force_rmse": 0.3}
    out = metrics.loss_metrics(found, {"energy_weight": 1.0, "force_weight": 1.0}, (0.1, 0.3))
    assert out["val_loss"] == pytest.approx(math.sqrt(2.5)) and out["train_loss"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["dataset=files", "dataset.val=v.xyz"], "dataset.train"),
        (["dataset=pool"], "dataset.files"),
        (["dataset=pool", "dataset.files=[a.xyz]", "dataset.split.val=0.6", "dataset.split.test=0.5"], "dataset.split"),
        (["dataset=pool", "dataset.files=[a.xyz]", "dataset.train_size=0"], "dataset.train_size"),
        (["dataset=files", "dataset.train=t.xyz", "dataset.val=v.xyz", "dataset.units.length=parsec"], "dataset.units.length"),
        (["dataset=files", "dataset.train=t.xyz", "dataset.val=v.xyz", "+dataset.keys.stress=S"], "dataset.keys.stress"),
        (["dataset=files", "dataset.train=t.xyz", "dataset.val=v.xyz", "dataset.e0=guess"], "dataset.e0"),
        (["study.loss.energy_weight=-1"], "study.loss.energy_weight"),
        (["model=sagpr", "study.metric=val_loss"], "study.metric"),
    ],
)
def test_bad_dataset_config_names_key_and_allowed(overrides, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")) as error:
        validate(make_cfg(tmp_path, *overrides))
    assert "is not allowed" in str(error.value) or "is not a key" in str(error.value)


def test_dataset_defaults(tmp_path):
    water = make_cfg(tmp_path)
    assert water.study.name == "water-gap-50" and water.model.metric == "val_energy_rmse" and water.model.fit_forces is False
    own = make_cfg(tmp_path, "dataset=files", "dataset.train=t.xyz", "dataset.val=v.xyz")
    validate(own)
    assert own.study.name == "files-gap-all" and own.study.metric == "val_loss" and own.model.fit_forces is True


# --------------------------------------------------------------------------- loading


def test_files_are_converted_split_and_written_for_gap_fit(emt, tmp_path):
    cfg = make_cfg(tmp_path, *files_overrides(emt))
    data = load_datasets(cfg)
    assert len(data.train) == 36 and len(data.val) == 9  # the 2 isolated atoms left the training set
    assert data.keys.energy == "REF_energy" and data.keys.force == "REF_forces"
    assert set(data.e0) == {"Al", "Cu"} and not data.e0_average
    written = ase.io.read(data.train.path, ":")
    assert data.train.path.parent.parent.name == "datasets" and len(written) == 36
    assert np.allclose([a.info["REF_energy"] for a in written], data.train.energies)
    test = load_test_set(cfg, data)
    assert len(test) == 9
    assert not shared_frames(data.train.frames, test.frames) and not shared_frames(data.val.frames, test.frames)


def test_missing_key_names_file_frame_and_key(emt, tmp_path):
    frames = ase.io.read(emt["train"], ":")
    del frames[7].arrays["REF_forces"]
    broken = tmp_path / "broken_train.xyz"
    ase.io.write(broken, frames, format="extxyz")
    cfg = make_cfg(tmp_path, "dataset=files", f"dataset.train={broken}", f"dataset.val={emt['val']}")
    with pytest.raises(DataError, match=r"broken_train\.xyz, frame 7: per-atom force column 'REF_forces' is missing"):
        load_datasets(cfg)
    cfg = make_cfg(tmp_path, *files_overrides(emt, test=False), "dataset.keys.energy=TotEnergy")
    with pytest.raises(DataError, match=r"emt_train\.xyz, frame 0: energy key 'TotEnergy' is missing \(dataset.keys.energy.*stores.*REF_energy"):
        load_datasets(cfg)


def test_e0_from_isolated_atoms_needs_them(emt, tmp_path):
    cfg = make_cfg(tmp_path, "dataset=files", f"dataset.train={emt['val']}", f"dataset.val={emt['test']}")
    with pytest.raises(DataError, match=r"no isolated-atom frame for Al, Cu.*dataset.e0=average"):
        load_datasets(cfg)
    data = load_datasets(make_cfg(tmp_path, "dataset=files", f"dataset.train={emt['val']}", f"dataset.val={emt['test']}", "dataset.e0={Al: 3.0, Cu: 3.5}"))
    assert data.e0 == {"Al": 3.0, "Cu": 3.5}


def test_pool_split_is_disjoint_and_reproducible(emt, tmp_path):
    pool = ["dataset=pool", f"dataset.files=[{emt['train']},{emt['val']},{emt['test']}]", "dataset.split.val=0.2", "dataset.split.test=0.2"]

    def splits(*extra):
        cfg = make_cfg(tmp_path, *pool, *extra)
        data = load_datasets(cfg)
        test = load_test_set(cfg, data)
        return data, test

    data, test = splits()
    assert (len(data.train), len(data.val), len(test)) == (32, 11, 11)  # 54 frames: isolated atoms out
    for a, b in ((data.train, data.val), (data.train, test), (data.val, test)):
        assert not shared_frames(a.frames, b.frames)
    again, _ = splits()
    assert [a.positions.tolist() for a in again.val.frames] == [a.positions.tolist() for a in data.val.frames]
    other, _ = splits("dataset.split.seed=1")
    assert [a.positions.tolist() for a in other.val.frames] != [a.positions.tolist() for a in data.val.frames]
    small, small_test = splits("dataset.train_size=10")
    assert len(small.train) == 10 and len(shared_frames(small.train.frames, data.train.frames)) == 10
    assert len(shared_frames(small.val.frames, data.val.frames)) == len(data.val) and len(small_test) == len(test)


# --------------------------------------------------------------------------- fits


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


def test_own_data_study_promotes_with_test_loss(emt, tmp_path, capsys):
    from hpo.registry.promote import promote

    cfg = make_cfg(tmp_path, *files_overrides(emt), "study.n_trials=1", "promote.screen.k=1", "promote.screen.steps=10")
    loop.run(cfg)
    promote(cfg)
    out = capsys.readouterr().out
    assert "registered files-gap version 1" in out and "val_loss / test_loss" in out
    # MD with the champion starts from the own validation frames and judges stability on the own training set
    from hpo import md

    result = md.main(make_cfg(tmp_path, *files_overrides(emt), "md.steps=10"))
    assert result["steps_completed"] == 10 and "md_stable" in result
    assert {"train_nn_min_Cu-Cu", "nn_max_Cu-Cu"} <= set(result)


def _fit(cfg, workdir):
    return score(cfg, model_params(cfg), load_datasets(cfg), workdir).metrics


def test_hartree_bohr_file_gives_the_same_metrics(emt, tmp_path):
    ev = _fit(make_cfg(tmp_path / "ev", *files_overrides(emt, test=False)), tmp_path / "ev" / "fit")
    au_cfg = make_cfg(
        tmp_path / "au", *files_overrides(emt, "hartree_bohr_", test=False), "dataset.units.energy=Hartree", "dataset.units.length=Bohr"
    )
    au = _fit(au_cfg, tmp_path / "au" / "fit")
    compared = [k for k in ev if "rmse" in k or "mae" in k or k.endswith("loss")]
    assert "val_force_rmse" in compared and "val_loss" in compared
    for key in compared:
        assert au[key] == pytest.approx(ev[key], rel=1e-6), key


def test_e0_average_is_passed_to_gap_fit_and_matched_by_the_numpy_solver(emt, tmp_path):
    from hpo.models.gap.sparse_gap import SparseGap

    base = [*files_overrides(emt, test=False), "dataset.e0=average", "model.fit_forces=false"]
    found = _fit(make_cfg(tmp_path, *base, "model.solver=gap_fit"), tmp_path / "gap_fit")
    command = (tmp_path / "gap_fit" / "gap_fit.cmd").read_text()
    assert "e0_method=average" in command and "e0={" not in command
    assert math.isfinite(found["val_loss"]) and "val_force_rmse" not in found
    assert found["val_loss"] == pytest.approx(found["val_energy_rmse_per_atom"] / found["loss_energy_scale"])
    _fit(make_cfg(tmp_path, *base, "model.solver=numpy"), tmp_path / "numpy")
    data = load_datasets(make_cfg(tmp_path, *base))
    mean = np.mean(data.train.energies / data.train.n_atoms)  # gap_fit's average: of energy per atom over frames
    for solver in ("gap_fit", "numpy"):
        e0 = SparseGap.read(tmp_path / solver / "gap.xml").e0
        assert e0[13] == pytest.approx(mean, rel=1e-10) and e0[29] == pytest.approx(mean, rel=1e-10), solver


# --------------------------------------------------------------------------- data check


def _check_exit(cfg) -> int:
    try:
        check_command.check_command(cfg)
    except SystemExit as exc:
        return exc.code
    return 0


def test_data_check_fails_on_nan_and_cross_split_duplicate_and_flags_shuffled_forces(emt, tmp_path, capsys, mlruns):
    frames = ase.io.read(emt["val"], ":")
    frames[3].info["REF_energy"] = float("nan")
    nan_val = tmp_path / "nan_val.xyz"
    ase.io.write(nan_val, frames, format="extxyz")
    cfg = make_cfg(tmp_path / "nan", *mlruns, "dataset=files", f"dataset.train={emt['train']}", f"dataset.val={nan_val}")
    assert _check_exit(cfg) == 1
    assert "finite" in capsys.readouterr().out
    assert last_check_run(cfg).data.tags["check.finite"] == "fail"
    # optimize stops before any fit, naming the file, the frame and the value
    with pytest.raises(DataError, match=r"nan_val\.xyz, frame 3: energy 'REF_energy' is not finite: nan"):
        loop.run(cfg)
    assert not (tmp_path / "nan" / "experiments" / cfg.study.name).exists()

    val = ase.io.read(emt["val"], ":") + [ase.io.read(emt["train"], "5")]
    leaked = tmp_path / "leaked_val.xyz"
    ase.io.write(leaked, val, format="extxyz")
    cfg = make_cfg(tmp_path / "dup", *mlruns, "dataset=files", f"dataset.train={emt['train']}", f"dataset.val={leaked}")
    assert _check_exit(cfg) == 1
    assert last_check_run(cfg).data.tags["check.duplicates"] == "fail"

    cfg = make_cfg(tmp_path / "shuffled", *mlruns, *files_overrides(emt, "shuffled_forces_"))
    assert _check_exit(cfg) == 1  # energy changes of consecutive MD frames contradict the work of these forces
    assert last_check_run(cfg).data.tags["check.forces_consistent"] == "fail"
    # optimize runs the same checks after reading the data and stops before any fit with the check's message
    with pytest.raises(DataError, match="data check failed: forces_consistent") as refused:
        loop.run(cfg)
    assert "To fit energies only: model.fit_forces=false" in str(refused.value)
    assert not (tmp_path / "shuffled" / "experiments" / cfg.study.name).exists()
    # forces that do not enter the fit cannot spoil it: the same check only warns, and the study runs
    energy_only = make_cfg(tmp_path / "energy_only", *mlruns, *files_overrides(emt, "shuffled_forces_"), "model.fit_forces=false", "study.n_trials=1")
    assert check_command.preflight(energy_only)["check.forces_consistent"] == "warn"


def test_data_check_on_given_files(emt, tmp_path, mlruns):
    cfg = make_cfg(tmp_path, *mlruns, f"data.files=[{emt['train']},{emt['val']}]")
    assert _check_exit(cfg) == 0
    tags = last_check_run(cfg).data.tags
    assert tags["run_type"] == "data_check" and tags["check.keys_present"] == "pass"


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


def test_learning_curve_and_sweep_on_own_files(emt, tmp_path, mlruns):
    """Own data: the learning curve takes nested subsets of the training split (sizes in frames); sweeps as usual."""
    from hpo.analysis import learning_curve, sweep

    cfg = make_cfg(tmp_path, *files_overrides(emt, test=False), *mlruns, "learning_curve.sizes=[6,12]")
    curve = learning_curve.run_learning_curve(cfg)
    assert [row["n_train"] for row in curve.rows] == [6, 12]
    subsets = [ase.io.read(curve.outdir / f"size_{n:04d}_rep_0" / "train_subset.xyz", ":") for n in (6, 12)]
    assert shared_frames(subsets[0], subsets[1]) and len(shared_frames(subsets[0], subsets[1])) == 6  # nested
    assert all("val_force_rmse" in row for row in curve.rows)
    with pytest.raises(ConfigError, match=r"learning_curve.sizes=\[6, 500\] is not allowed: numbers of frames from 1 to the 36"):
        learning_curve.run_learning_curve(make_cfg(tmp_path, *files_overrides(emt, test=False), *mlruns, "learning_curve.sizes=[6,500]"))
    found = sweep.run_sweep(make_cfg(tmp_path, *files_overrides(emt, test=False), *mlruns, "sweep.param=delta", "sweep.values=[0.1,1.0]"))
    assert len(found.rows) == 2


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
