"""Tests of hpo.search.objective: a trial scored by k-fold cross-validation of training + validation."""

from __future__ import annotations

import numpy as np
import pytest

from hpo.config import model_params
from hpo.data import load_datasets
from hpo.search.objective import score


@pytest.mark.slow
def test_cross_validation_scores_folds_of_training_and_validation(tiny_cfg, tmp_path):
    cfg = tiny_cfg("study.cv_folds=3", "model.solver=gap_fit")  # gap_fit: its model has companion files
    data = load_datasets(cfg)
    scored = score(cfg, model_params(cfg), data, tmp_path / "cv")
    folds = sorted((tmp_path / "cv" / "cv").glob("fold_*"))
    assert len(folds) == 3
    # a fold keeps its numbers, not its model (nor gap_fit's sparseX companions) or frame copies
    assert not [f.name for fold in folds for f in fold.rglob("*") if f.name.startswith(("gap.xml", "train.xyz", "val.xyz"))]
    fold_rmse = []
    for fold in folds:
        rows = np.loadtxt(fold / "validation_errors.csv", delimiter=",", skiprows=1)
        fold_rmse.append(np.sqrt(np.mean((rows[:, 1] - rows[:, 0]) ** 2)))
    # every frame of training + validation is validated exactly once, and the metric is the folds' mean
    assert sum(len(np.loadtxt(f / "validation_errors.csv", delimiter=",", skiprows=1)) for f in folds) == len(data.train) + len(data.val)
    assert scored.metrics["val_energy_rmse"] == pytest.approx(np.mean(fold_rmse), rel=1e-9)
    assert scored.metrics["cv_std_val_energy_rmse"] == pytest.approx(np.std(fold_rmse), rel=1e-9)
    plain = score(tiny_cfg("model.solver=gap_fit"), model_params(cfg), data, tmp_path / "plain")
    assert scored.metrics["split_val_energy_rmse"] == pytest.approx(plain.metrics["val_energy_rmse"], rel=1e-9)
