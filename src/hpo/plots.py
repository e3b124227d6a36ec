"""Figures a chemist would rather look at than read. Every figure names data and model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hpo.atomic import atomic_write  # noqa: E402


def parity_plot(
    path: Path,
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    quantity: str,
    unit: str,
    title: str,
) -> Path:
    """Predicted vs reference for each named series (e.g. train, validation), with y = x."""
    fig, ax = plt.subplots(figsize=(5, 5))
    values = []
    for label, (true, pred) in series.items():
        rmse = float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(true)) ** 2)))
        ax.scatter(true, pred, s=12, alpha=0.7, label=f"{label} (RMSE {rmse:.3g} {unit})")
        values += [np.min(true), np.max(true), np.min(pred), np.max(pred)]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", lw=1, label="y = x")
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
