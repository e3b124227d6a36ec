"""Learning curves and parameter sweeps: real gap_fit on tiny data, real MLflow store."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from hpo.analysis import learning_curve, sweep
from hpo.config import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory) -> list[str]:
    """One MLflow store for the module: creating one costs seconds, and each test finds its runs by parent id."""
    root = tmp_path_factory.mktemp("mlruns")
    return [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_location={root}/artifacts"]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def parent_and_children(cfg, parent_run_id):
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return client, client.get_run(parent_run_id), children


def test_learning_curve_over_two_sizes(tiny_cfg, shared_mlflow):
    # fit_forces: the force panel, through quippy's calculator (trials default to energies only)
    cfg = tiny_cfg(*shared_mlflow, "learning_curve.sizes=[50,100]", "learning_curve.name=lc", "model.fit_forces=true")
    result = learning_curve.run_learning_curve(cfg)

    rows = read_csv(result.csv)
    assert [(r["size"], r["n_train"], r["state"]) for r in rows] == [("50", "10", "COMPLETE"), ("100", "14", "COMPLETE")]
    for key in ("train_energy_rmse", "val_energy_rmse", "train_force_rmse", "val_force_rmse", "fit_time_s"):
        assert all(float(r[key]) > 0 for r in rows), key
    assert all(int(r["model_bytes"]) > 0 for r in rows)
    assert result.figure.read_bytes().startswith(PNG_MAGIC)
    assert result.outdir.name == "lc" and result.csv.parent == result.outdir

    # The slope is the log-log least-squares line through the CSV's validation column; extrapolation to 2 x 14.
    n, val = np.array([10.0, 14.0]), np.array([float(r["val_energy_rmse"]) for r in rows])
    fit = result.fits["val_energy_rmse"]
    assert fit.slope == pytest.approx(np.polyfit(np.log(n), np.log(val), 1)[0])
    assert result.extrapolate_to == 28

    client, parent, children = parent_and_children(cfg, result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.tags["size"] for c in children) == ["100", "50"]
    assert all(c.info.status == "FINISHED" and "val_energy_rmse" in c.data.metrics for c in children)
    assert parent.data.metrics["slope.val_energy_rmse"] == pytest.approx(fit.slope)
    assert parent.data.metrics["extrapolated.val_energy_rmse"] == pytest.approx(fit.at(28))
    assert {"learning_curve.csv", "learning_curve.png", "config.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_sweep_marks_the_validation_minimum(tiny_cfg, shared_mlflow):
    cfg = tiny_cfg(*shared_mlflow, "sweep.param=default_sigma.energy", "sweep.values=[0.1,0.001,0.01]")
    result = sweep.run_sweep(cfg)

    rows = read_csv(result.csv)
    values = [float(r["default_sigma.energy"]) for r in rows]
    assert values == [0.001, 0.01, 0.1]  # sorted, whatever the order given
    val = [float(r["val_energy_rmse"]) for r in rows]
    best = int(np.argmin(val))
    assert result.minimum["val_energy_rmse"]["default_sigma.energy"] == values[best]
    assert result.minimum["val_energy_rmse"]["val_energy_rmse"] == pytest.approx(val[best])
    assert all(int(r["model_bytes"]) > 0 for r in rows)
    assert {r["overfitting"] for r in rows} <= {"True", "False"}
    assert result.figure.read_bytes().startswith(PNG_MAGIC)

    client, parent, children = parent_and_children(cfg, result.parent_run_id)
    assert len(children) == 3
    assert parent.data.params["min_at.val_energy_rmse"] == f"default_sigma.energy={values[best]}"
    assert {"sweep.csv", "sweep.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_sweep_of_unknown_parameter_is_refused_before_any_fit(tiny_cfg):
    cfg = tiny_cfg("sweep.param=default_sigma.energyy")
    with pytest.raises(ConfigError, match="sweep.param='default_sigma.energyy'"):
        sweep.run_sweep(cfg)
    cfg = tiny_cfg("sweep.param=n_max", "sweep.values=[0,2]")
    with pytest.raises(ConfigError, match="n_max"):
        sweep.run_sweep(cfg)


def test_overfitting_region_follows_the_flexible_direction():
    x = [0.001, 0.01, 0.1, 1.0]
    train = np.array([0.01, 0.05, 0.10, 1.0])  # falls as sigma shrinks (more flexible)
    val = np.array([0.09, 0.07, 0.08, 1.1])  # minimum at 0.01, rises again at 0.001
    assert sweep.overfitting_steps(x, train, val, "down") == [(0.01, 0.001)]
    # Seen the other way round (larger = more flexible) the same numbers hold no overfitting step.
    assert sweep.overfitting_steps(x, train, val, "up") == []
    # A failed point (NaN) is skipped, not treated as a rise.
    val_failed = np.array([0.09, np.nan, 0.08, 1.1])
    assert sweep.overfitting_steps(x, train, val_failed, "down") == [(0.1, 0.001)]


def test_power_law_fit_recovers_slope():
    n = np.array([50.0, 100.0, 200.0, 400.0])
    fit = learning_curve.fit_power_law(n, 3.0 * n**-0.5)
    assert fit.slope == pytest.approx(-0.5) and fit.at(800) == pytest.approx(3.0 * 800**-0.5)
    assert learning_curve.fit_power_law(np.array([50.0]), np.array([0.1])) is None
