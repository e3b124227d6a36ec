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


def loss_scales(
    energies: np.ndarray,
    n_atoms: np.ndarray,
    forces: list[np.ndarray] | None,
    energy_scale: float | None = None,
    force_scale: float | None = None,
) -> tuple[float, float | None]:
    """The scales of ``loss``: given ones kept, ``None`` ones measured on a set (the validation set).

    Energy: standard deviation of the energy per atom (eV/atom); force: standard deviation of all force
    components (eV/Angstrom), None when the set has no forces. Raises ValueError for a zero scale
    (one frame, or identical values): the loss would divide by it; set the scale in the config instead.
    """
    if energy_scale is None:
        energy_scale = float(np.std(np.asarray(energies, dtype=float) / np.asarray(n_atoms, dtype=float)))
        if not energy_scale > 0:
            raise ValueError("the validation energies per atom have zero spread: set study.loss.energy_scale (eV/atom)")
    if force_scale is None and forces:
        force_scale = float(np.std(np.concatenate([np.ravel(f) for f in forces])))
        if not force_scale > 0:
            raise ValueError("the validation force components have zero spread: set study.loss.force_scale (eV/Angstrom)")
    return float(energy_scale), (float(force_scale) if force_scale is not None else None)


def loss(
    energy_rmse_per_atom: float,
    force_rmse: float | None,
    energy_weight: float,
    force_weight: float,
    energy_scale: float,
    force_scale: float | None,
) -> float:
    """sqrt((w_E (rmse_E / s_E)^2 + w_F (rmse_F / s_F)^2) / (w_E + w_F)).

    A weighted mean of the squared scaled errors, square-rooted: 1.0 is a model as good as predicting the
    mean (for the default scales, the standard deviations of the set), 0 a perfect one. The force term and
    its weight are left out when ``force_rmse`` or ``force_scale`` is None (forces not evaluated) or
    ``force_weight`` is 0; an energy weight of 0 leaves out the energy term likewise.
    """
    terms = []
    if energy_weight > 0:
        terms.append((energy_weight, energy_rmse_per_atom / energy_scale))
    if force_weight > 0 and force_rmse is not None and force_scale is not None:
        terms.append((force_weight, force_rmse / force_scale))
    if not terms:
        raise ValueError("the loss has no term: energy_weight is 0 and no force error is evaluated")
    return float(np.sqrt(sum(w * x**2 for w, x in terms) / sum(w for w, _ in terms)))


def loss_metrics(
    found: dict[str, float], weights: dict, scales: tuple[float, float | None], prefixes: tuple[str, ...] = ("train", "val")
) -> dict[str, float]:
    """``train_loss`` / ``val_loss`` (:func:`loss`; any ``prefixes``) of the ``{prefix}_energy_rmse_per_atom``
    and ``{prefix}_force_rmse`` in ``found``, plus the scales used (``loss_energy_scale``, ``loss_force_scale``)."""
    energy_scale, force_scale = scales
    out = {"loss_energy_scale": energy_scale}
    if force_scale is not None:
        out["loss_force_scale"] = force_scale
    for prefix in prefixes:
        if f"{prefix}_energy_rmse_per_atom" in found:
            out[f"{prefix}_loss"] = loss(
                found[f"{prefix}_energy_rmse_per_atom"],
                found.get(f"{prefix}_force_rmse"),
                float(weights["energy_weight"]),
                float(weights["force_weight"]),
                energy_scale,
                force_scale,
            )
    return out
