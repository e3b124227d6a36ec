"""Tests of hpo.analysis.learning_curve: real gap_fit on tiny data (workshop and own files), real MLflow store;
the power-law fit."""

from __future__ import annotations

import numpy as np
import pytest
import ase.io

from hpo.analysis import learning_curve
from hpo.config import ConfigError
from hpo.data import shared_frames

from helpers import PNG_MAGIC, files_overrides, make_cfg, parent_and_children, read_csv


@pytest.mark.slow
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


def test_power_law_fit_recovers_slope():
    n = np.array([50.0, 100.0, 200.0, 400.0])
    fit = learning_curve.fit_power_law(n, 3.0 * n**-0.5)
    assert fit.slope == pytest.approx(-0.5) and fit.at(800) == pytest.approx(3.0 * 800**-0.5)
    assert learning_curve.fit_power_law(np.array([50.0]), np.array([0.1])) is None


@pytest.mark.slow
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
