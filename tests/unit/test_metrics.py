"""Tests of hpo.metrics: the energy+force loss and its scales."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpo import metrics


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
