"""Energies (and forces) as a model predicts them or the data hold them: the ``Predictions`` of kinds of
interatomic potentials (GAP, and any kind that learns energies), with their errors, CSV and parity plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpo import metrics, plots
from hpo.models.base import Predictions, TrialFailure


@dataclass
class EnergyPredictions(Predictions):
    """Energies per cell (eV), the atoms of each cell, forces per frame (eV/Å; None: not evaluated) and the
    posterior std of the energies (eV; None: the model keeps none)."""

    energies: np.ndarray
    n_atoms: np.ndarray
    forces: list[np.ndarray] | None = None
    std: np.ndarray | None = None

    quantity = "energy"
    overfit_stems = (("energy_rmse", "overfit"), ("force_rmse", "overfit_force"))

    @classmethod
    def of(cls, split) -> "EnergyPredictions":
        """The reference values of a ``FrameSet``."""
        return cls(np.asarray(split.energies), split.n_atoms, split.forces or None)

    def errors(self, prefix: str, truth: "EnergyPredictions") -> dict[str, float]:
        return metrics.energy_force_metrics(prefix, truth.energies, self.energies, truth.n_atoms, truth.forces, self.forces)

    def table(self, truth: "EnergyPredictions") -> str:
        return "true_energy_eV,predicted_energy_eV\n" + "".join(f"{t:.10f},{p:.10f}\n" for t, p in zip(truth.energies, self.energies))

    @classmethod
    def parity_plot(cls, path: Path, series: dict, title: str) -> Path:
        return plots.energy_parity_plot(path, {name: (truth.energies, pred.energies, truth.n_atoms) for name, (truth, pred) in series.items()}, title)

    def calibration_pairs(self, truth: "EnergyPredictions"):
        return None if self.std is None else (self.energies - truth.energies, self.std)


def energy_loss(weights: dict | None, found: dict[str, float], val: "EnergyPredictions", with_forces: bool,
                prefixes: tuple[str, ...] = ("train", "val")) -> dict[str, float]:
    """``train_loss`` and ``val_loss`` (``hpo.metrics.loss``; any ``prefixes``, e.g. ``test``) with the weights
    and scales of ``study.loss``; a null scale is the validation set's spread (``hpo.metrics.loss_scales``)."""
    weights = weights or {"energy_weight": 1.0, "force_weight": 1.0, "energy_scale": None, "force_scale": None}
    try:
        scales = metrics.loss_scales(val.energies, val.n_atoms, val.forces if with_forces else None, weights["energy_scale"], weights["force_scale"])
        return metrics.loss_metrics(found, weights, scales, prefixes)
    except ValueError as exc:
        raise TrialFailure("nan_metric", f"no loss: {exc}") from exc
