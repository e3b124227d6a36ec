"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.search.storage import load_study

SHARED_WATER = Path(os.environ.get("HPO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "water"))

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
