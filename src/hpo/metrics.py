"""Error metrics of a fitted model and the overfitting signal."""

from __future__ import annotations

import numpy as np


# The 6 unique components of a symmetric 3x3 tensor and their (row, column).
COMPONENTS = {"xx": (0, 0), "xy": (0, 1), "xz": (0, 2), "yy": (1, 1), "yz": (1, 2), "zz": (2, 2)}


def rmse(error: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(error))))


def mae(error: np.ndarray) -> float:
    return float(np.mean(np.abs(error)))


def energy_force_metrics(
    prefix: str,
    true_energy: np.ndarray,
    pred_energy: np.ndarray,
    n_atoms: np.ndarray,
    true_forces: list[np.ndarray] | None = None,
    pred_forces: list[np.ndarray] | None = None,
) -> dict[str, float]:
    """RMSE and MAE of energies (per cell and per atom) and force components, keys ``{prefix}_...``."""
    error = pred_energy - true_energy
    metrics = {
        f"{prefix}_energy_rmse": rmse(error),
        f"{prefix}_energy_mae": mae(error),
        f"{prefix}_energy_rmse_per_atom": rmse(error / n_atoms),
        f"{prefix}_energy_mae_per_atom": mae(error / n_atoms),
    }
    if true_forces and pred_forces is not None:
        force_error = np.concatenate([p - t for p, t in zip(pred_forces, true_forces)]).ravel()
        metrics[f"{prefix}_force_rmse"] = rmse(force_error)
        metrics[f"{prefix}_force_mae"] = mae(force_error)
    return metrics


def overfitting(train_rmse: float, val_rmse: float, ratio_threshold: float) -> tuple[float, float, bool]:
    """The gap val - train, the ratio val / train, and whether the ratio passes ``ratio_threshold``.

    A model whose ratio is high explains its training data much better than
    data it has not seen: it is overfit.
    """
    ratio = val_rmse / train_rmse if train_rmse > 0 else float("inf")
    return val_rmse - train_rmse, ratio, bool(ratio > ratio_threshold)
