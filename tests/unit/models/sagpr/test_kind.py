"""Tests of hpo.models.sagpr.kind: SA-GPR scored by k-fold cross-validation through the generic path."""

from __future__ import annotations

import numpy as np
import pytest

from hpo.config import model_params
from hpo.data import load_datasets, read_tensors
from hpo.metrics import COMPONENTS
from hpo.search.objective import score


@pytest.mark.slow
def test_sagpr_cross_validation_validates_every_frame_once(sagpr_cfg, tmp_path):
    """study.cv_folds: the same generic path as GAP; every training + validation frame is validated by
    exactly one fold, and the trial's val_rmse is the folds' mean."""
    cfg = sagpr_cfg("study.cv_folds=4")
    data = load_datasets(cfg)
    scored = score(cfg, model_params(cfg), data, tmp_path / "cv")
    folds = sorted((tmp_path / "cv" / "cv").glob("fold_*"))
    assert len(folds) == 4
    # a fold keeps its numbers, not its model or frame copies (they would multiply a study's disk use by k+1)
    assert not any((fold / "model").exists() or (fold / "train.xyz").exists() for fold in folds)
    rows = [np.loadtxt(fold / "validation_errors.csv", delimiter=",", skiprows=1, ndmin=2) for fold in folds]
    validated = np.concatenate([r[:, :6] for r in rows])
    index = tuple(np.array(list(COMPONENTS.values())).T)
    pool = np.concatenate([read_tensors(s.frames, "Polarizability", s.path.name, 0.1)[:, index[0], index[1]] for s in (data.train, data.val)])
    assert len(validated) == len(pool) == len(data.train) + len(data.val)
    # the same frames, each once: sort both by their components
    np.testing.assert_allclose(validated[np.lexsort(validated.T)], pool[np.lexsort(pool.T)], atol=1e-7)
    fold_rmse = [np.sqrt(np.mean((r[:, 6:] - r[:, :6]) ** 2)) for r in rows]
    assert scored.metrics["val_rmse"] == pytest.approx(np.mean(fold_rmse), rel=1e-6)
    assert scored.metrics["cv_std_val_rmse"] == pytest.approx(np.std(fold_rmse), rel=1e-6)
    assert scored.metrics["cv_folds"] == 4 and scored.metrics["split_val_rmse"] != scored.metrics["val_rmse"]


PER_COMPONENT = {f"val_rmse_{c}" for c in ("xx", "xy", "xz", "yy", "yz", "zz")}
