"""Figures a chemist would rather look at than read. Every figure names data and model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hpo.safe_files import atomic_write  # noqa: E402
from hpo.metrics import COMPONENTS, rmse  # noqa: E402

if TYPE_CHECKING:
    from hpo.data import FrameSet

FIGURE_DPI = 110


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
        error = rmse(np.asarray(pred) - np.asarray(true))
        ax.scatter(true, pred, s=12, alpha=0.7, label=f"{label} (RMSE {error:.3g} {unit})")
        values += [np.min(true), np.max(true), np.min(pred), np.max(pred)]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", lw=1, label="y = x")
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    plain_ticks(ax)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def energy_parity_plot(path: Path, series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], title: str) -> Path:
    """Energies per atom relative to the training set's mean reference energy per atom, in meV/atom.

    ``series``: label -> (reference energies, predicted energies, atoms per frame), eV per cell. Total
    energies of a cell are thousands of eV apart from zero and differ in the last digits: plotted raw,
    the axes carry an offset ("+2.1e4") and ticks nobody can read. The first series is the training one.
    """
    true0, _, atoms0 = next(iter(series.values()))
    mean = float(np.mean(np.asarray(true0) / np.asarray(atoms0)))
    relative = {
        label: (1e3 * (np.asarray(true) / np.asarray(atoms) - mean), 1e3 * (np.asarray(pred) / np.asarray(atoms) - mean))
        for label, (true, pred, atoms) in series.items()
    }
    return parity_plot(path, relative, "energy per atom − training mean", "meV/atom", f"{title}\ntraining mean {mean:.4f} eV/atom")


def plain_ticks(ax) -> None:
    """Tick labels as plain numbers: no offset ("+2.1e4") and no scientific multiplier on the axes."""
    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if isinstance(formatter, matplotlib.ticker.ScalarFormatter):
            formatter.set_useOffset(False)
            formatter.set_scientific(False)


def pareto_plot(path: Path, study, names: list[str], title: str, picked=None) -> Path:
    """Optuna's Pareto-front plot of a multi-objective study, with the promoted trial marked."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=names)
    if picked is not None:
        ax.plot(*picked.values[:2], "kD", ms=11, mfc="none", label=f"promoted (trial {picked.number})")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(ax.figure, path)


def md_plot(path: Path, time_fs, potential, kinetic, temperature, title: str) -> Path:
    """Total, potential and kinetic energy (relative to the start) and temperature against time."""
    potential, kinetic = np.asarray(potential), np.asarray(kinetic)
    total = potential + kinetic
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(time_fs, total - total[0], label="total")
    top.plot(time_fs, potential - potential[0], label="potential")
    top.plot(time_fs, kinetic - kinetic[0], label="kinetic")
    top.set_ylabel("energy - energy(t=0) (eV)")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=9)
    bottom.plot(time_fs, temperature, color="C3", label="temperature")
    bottom.set_xlabel("time (fs)")
    bottom.set_ylabel("temperature (K)")
    bottom.legend(fontsize=8)
    return save_figure(fig, path)


def tensor_components_plot(path: Path, time_fs, tensors: np.ndarray, title: str, unit: str = "a.u.") -> Path:
    """Every unique component of a (n, 3, 3) tensor series against time: diagonal above, off-diagonal below
    (they differ by tens of units, so one axis would flatten the off-diagonal ones)."""
    fig, (diagonal, off_diagonal) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for label, (i, j) in COMPONENTS.items():
        (diagonal if i == j else off_diagonal).plot(time_fs, tensors[:, i, j], label=label)
    for ax, what in ((diagonal, "diagonal"), (off_diagonal, "off-diagonal")):
        ax.set_ylabel(f"{what} polarizability ({unit})")
        ax.legend(fontsize=8, ncol=3)
    off_diagonal.set_xlabel("time (fs)")
    diagonal.set_title(title, fontsize=9)
    return save_figure(fig, path)


def tensor_parity_plot(path: Path, series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, unit: str = "a.u.") -> Path:
    """Predicted vs reference for each of the 6 unique components of (n, 3, 3) tensors, one panel each."""
    fig, axes = plt.subplots(2, 3, figsize=(11, 7))
    for ax, (name, (i, j)) in zip(axes.ravel(), COMPONENTS.items()):
        values = []
        for label, (true, pred) in series.items():
            t, p = true[:, i, j], pred[:, i, j]
            ax.scatter(t, p, s=10, alpha=0.7, label=f"{label} (RMSE {rmse(p - t):.3g})")
            values += [t.min(), t.max(), p.min(), p.max()]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], "k--", lw=1, label="y = x")
        ax.set_title(name)
        ax.set_xlabel(f"reference ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def data_line(training: str, val: FrameSet) -> str:
    """The data of a figure in words: training data as given, validation file and its frame count."""
    return f"training: {training}; validation: {val.path.name} ({len(val)} frames)"


def figure_title(model_name: str, source: str, training: str, val: FrameSet) -> str:
    """A title naming the model, where its parameters came from, and the data (file names and frame counts)."""
    return f"{model_name} ({source})\n{data_line(training, val)}"


def log_axis_wanted(values: Iterable[float]) -> bool:
    """A log axis when positive values span more than one decade."""
    values = np.asarray(list(values), dtype=float)
    return bool(values.size and np.all(values > 0) and values.max() / values.min() > 10)


def save_figure(fig, path: Path, title: str | None = None) -> Path:
    """Title, lay out and write a figure atomically as PNG, then free it (figures pile up in long runs)."""
    if title:
        fig.suptitle(title, fontsize=9, wrap=True)  # long file names must not run off narrow figures
    if fig.get_layout_engine() is None:  # figures with colorbars over several panels bring their own engine
        fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")
    plt.close(fig)
    return path
