"""Tests of hpo.analysis.sweep: the validation minimum and the overfitting region, real gap_fit, real MLflow store."""

from __future__ import annotations

import numpy as np
import pytest

from hpo.analysis import sweep
from hpo.config import ConfigError

from helpers import PNG_MAGIC, parent_and_children, read_csv


@pytest.mark.slow
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
