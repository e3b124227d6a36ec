"""Is a model's predictive std honest? z-scores of its errors, coverage of its intervals, a fitted scale.

A GP's std (``hpo.models.gap.posterior.Posterior``, ``SAGPR.predict(return_std=True)``) is the latent
function's posterior std under the kernel's prior amplitude (delta for GAP, the kernel's own scale for
SA-GPR), which the fit does not tune: it says where the model is unsure, relative to elsewhere, and its
absolute size can be off by a common factor. On the validation split:

- z = error / std; for honest std z has unit RMS, and |z| <= 1 (2) holds for 68.3% (95.4%) of the errors;
- ``fit_scale``: the factor s that makes the z-scores of error / (s std) unit RMS (the maximum-likelihood
  scale of a Gaussian with variances s^2 std^2), recorded and applied to every std reported afterwards;
- on the test split, the coverage with s applied says whether the calibration transfers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

NOMINAL = {1: math.erf(1 / math.sqrt(2)), 2: math.erf(2 / math.sqrt(2))}  # 0.683, 0.954


def fit_scale(errors: np.ndarray, std: np.ndarray) -> float:
    """s with mean((error / (s std))^2) = 1: the factor honest std are off by (maximum likelihood)."""
    z = _z(errors, std)
    return float(np.sqrt(np.mean(z**2))) if len(z) else float("nan")


def _z(errors: np.ndarray, std: np.ndarray) -> np.ndarray:
    errors, std = np.ravel(errors).astype(float), np.ravel(std).astype(float)
    keep = np.isfinite(errors) & np.isfinite(std) & (std > 0)
    return errors[keep] / std[keep]


def summary(prefix: str, errors: np.ndarray, std: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """``{prefix}_z_rms``, ``_z_mean``, ``_coverage_1std``, ``_coverage_2std`` of error / (scale std)."""
    z = _z(errors, std) / scale
    if not len(z):
        return {}
    return {
        f"{prefix}_z_rms": float(np.sqrt(np.mean(z**2))),
        f"{prefix}_z_mean": float(np.mean(z)),
        f"{prefix}_coverage_1std": float(np.mean(np.abs(z) <= 1)),
        f"{prefix}_coverage_2std": float(np.mean(np.abs(z) <= 2)),
    }


def calibrate(quantity: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], plot: Path | None = None, title: str = "") -> tuple[float, dict[str, float]]:
    """The scale fitted on ``splits["val"]`` and, for every split, the z-statistics before (``{split}_{quantity}_raw``)
    and after it is applied (``{split}_{quantity}``); with ``plot`` a calibration figure. Returns (scale, metrics)."""
    errors, std = splits["val"]
    scale = fit_scale(errors, std)
    metrics = {f"{quantity}_std_scale": scale}
    for name, (e, s) in splits.items():
        metrics.update(summary(f"{name}_{quantity}_raw", e, s))
        metrics.update(summary(f"{name}_{quantity}", e, s, scale))
    if plot is not None and math.isfinite(scale):
        calibration_plot(plot, splits, scale, title or quantity)
    return scale, metrics


def calibration_plot(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], scale: float, title: str) -> Path:
    """Left: observed against nominal coverage of central intervals (the diagonal: honest std), with the
    validation-fitted scale applied. Right: the z-scores' histogram against the unit normal."""
    from hpo.plots import plt, save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 4.0))
    nominal = np.linspace(0.0, 1.0, 101)
    quantiles = np.sqrt(2.0) * _erfinv(nominal)
    for name, (e, s) in splits.items():
        z = np.abs(_z(e, s) / scale)
        if not len(z):
            continue
        left.plot(nominal, [np.mean(z <= q) for q in quantiles], label=f"{name} ({len(z)})")
        right.hist(_z(e, s) / scale, bins=30, density=True, histtype="step", label=name)
    left.plot([0, 1], [0, 1], "k--", lw=0.8, label="honest")
    left.set_xlabel("nominal coverage of the central interval")
    left.set_ylabel("observed coverage")
    left.legend(fontsize=8)
    x = np.linspace(-4, 4, 200)
    right.plot(x, np.exp(-x**2 / 2) / np.sqrt(2 * np.pi), "k--", lw=0.8, label="unit normal")
    right.set_xlabel(f"z = error / ({scale:.3g} x std)")
    right.legend(fontsize=8)
    return save_figure(fig, path, f"{title}: std x {scale:.3g} (fitted on validation)")


def _erfinv(p: np.ndarray) -> np.ndarray:
    from scipy.special import erfinv

    return erfinv(np.clip(p, 0.0, 1.0 - 1e-12))
