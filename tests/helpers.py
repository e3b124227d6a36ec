"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
import csv
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
import ase.io
import numpy as np
from omegaconf import OmegaConf

from hpo.search.storage import load_study
from hpo.config import load_config, output_overrides, CONF_DIR
from hpo.search.selection import primary

# as the dataset config finds them: HPO_DATA_DIR, else ../shared/data/water relative to the working directory
SHARED_WATER = Path(os.environ.get("HPO_DATA_DIR", "../shared/data/water")).resolve()

# Cheap GAP settings: a fit on 10 frames takes about a second.
TINY_GAP = ["model.n_max=2", "model.l_max=2", "model.n_sparse=20", "model.cutoff=3.0", "search=gap_small"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_shared_water() -> Path:
    """The workshop data directory; a test that needs it fails (never skips) when it is absent."""
    if not (SHARED_WATER / "gap_input_50.xyz").is_file():
        pytest.fail(f"water data not found in {SHARED_WATER}: set HPO_DATA_DIR to the folder with gap_input_50.xyz")
    return SHARED_WATER


def runs_of(cfg):
    """(parent runs, child runs) of the config's MLflow experiment."""
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def assert_intact(cfg, n_trials):
    """The study holds exactly ``n_trials`` finished trials, none RUNNING, and MLflow agrees run for run."""
    study = load_study(cfg.study)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == n_trials
    assert not study.get_trials(states=(TrialState.RUNNING,))
    _, children = runs_of(cfg)
    assert all(run.info.status in ("FINISHED", "FAILED", "KILLED") for run in children)
    finished_runs = {c.data.tags["trial_number"] for c in children if c.info.status == "FINISHED"}
    assert finished_runs == {str(t.number) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    return study


TINY_SAGPR = ["model=sagpr", "search=sagpr_small", "dataset.train_size=50", "model.n_max=2", "model.l_max=2", "model.nc=null", "model.rc=3.0"]


def tiny_params(**extra) -> dict:
    params = dict(
        descriptor="soap", l_max=2, n_max=2, atom_sigma=0.3, cutoff=3.0, cutoff_transition_width=0.5,
        central_weight=1.0, n_sparse=12, delta=0.5, covariance_type="dot_product", zeta=2,
        sparse_method="cur_points", default_sigma=dict(energy=0.01, force=0.5, virial=0.0, hessian=0.0),
        sparse_jitter=1e-8, fit_timeout_s=120,
    )
    params.update(extra)
    return params


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def parent_and_children(cfg, parent_run_id):
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return client, client.get_run(parent_run_id), children


def rewrite(path: Path, change) -> None:
    frames = ase.io.read(path, ":")
    change(frames)
    ase.io.write(path, frames, format="extxyz")


def set_position(frame, atom, axis, value):
    def change(frames):
        frames[frame].positions[atom, axis] = value

    return change


def assert_nothing_left(root: Path) -> None:
    """No study database, no MLflow store, no trial directory under the test's output tree."""
    assert not (root / "experiments").exists(), sorted(p.name for p in (root / "experiments").rglob("*"))
    assert not (root / "mlruns").exists()


# gap.yaml reads its own-data defaults (fit_forces, metric) from the dataset group: resolved here without one
GAP_PARAMS = OmegaConf.to_container(
    OmegaConf.create({"experiments_dir": "experiments", "dataset": {}, "model": OmegaConf.load(CONF_DIR / "model" / "gap.yaml")}), resolve=True
)["model"]


SAGPR_PARAMS = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "sagpr.yaml"))["model"]


ROOT = Path(__file__).resolve().parents[1]


def hpo_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "hpo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ranked(cfg):
    study = load_study(cfg.study)
    return sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=primary)


def default_of(cfg):
    return next(t for t in ranked(cfg) if t.user_attrs.get("is_default"))


def model_file(trial) -> Path:
    return Path(trial.user_attrs["model_files"][0])


def last_check_run(cfg):
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.run_type = 'data_check'", order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0]


def files_overrides(paths: dict[str, Path], prefix: str = "", test: bool = True) -> list[str]:
    out = ["dataset=files", f"dataset.train={paths[prefix + 'train']}", f"dataset.val={paths[prefix + 'val']}"]
    return out + ([f"dataset.test={paths[prefix + 'test']}"] if test else [])


def make_cfg(tmp_path: Path, *overrides: str):
    tiny = [] if "model=sagpr" in overrides else TINY_GAP
    return load_config([*output_overrides(tmp_path), *tiny, *overrides])


def stretched(atoms: ase.Atoms, by_A: float) -> ase.Atoms:
    """One O-H bond of ``atoms`` pulled ``by_A`` further apart along itself: a geometry no training frame has."""
    out = atoms.copy()
    h = int(np.flatnonzero(out.numbers == 1)[0])
    o = int(np.flatnonzero(out.numbers == 8)[np.argmin(out.get_distances(h, np.flatnonzero(out.numbers == 8), mic=True))])
    bond = out.get_distance(o, h, mic=True, vector=True)
    out.positions[h] += by_A * bond / np.linalg.norm(bond)
    return out
