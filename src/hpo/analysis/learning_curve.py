"""Learning curves: the same model fitted on training sets of growing size, with a power-law fit.

``python -m hpo learning-curve``: every fit validated on the same frames; the validation curve's
power law is extrapolated to ``learning_curve.extrapolate_factor`` times the largest training set.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter
from omegaconf import DictConfig

from hpo.analysis.fit_series import (
    MetricSpec, Point, config_and_model, _finite, column, metric_specs, parent_tags, reported_metrics, run_dir, run_points, write_csv,
)
from hpo.config import fill_auto
from hpo.data import Datasets, layout_of, load_datasets, subset_frames
from hpo.errors import ConfigError
from hpo.models import kind
from hpo.plots import figure_title, plt, save_figure
from hpo.tracking import Tracker, flatten


@dataclass(frozen=True)
class PowerLaw:
    """``error = prefactor * n ** slope``, fitted as a straight line in log-log space."""

    slope: float
    prefactor: float

    def at(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.prefactor * np.asarray(n, dtype=float) ** self.slope


def fit_power_law(n: np.ndarray, error: np.ndarray) -> PowerLaw | None:
    """Least squares in log-log space; None with fewer than two distinct sizes of finite, positive error."""
    keep = np.isfinite(error) & (error > 0) & (n > 0)
    if len(np.unique(n[keep])) < 2:
        return None
    slope, intercept = np.polyfit(np.log(n[keep]), np.log(error[keep]), 1)
    return PowerLaw(float(slope), float(np.exp(intercept)))


def curve_stats(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample standard deviation of ``y`` per distinct ``x`` (0 for a single repeat), failures dropped."""
    keep = np.isfinite(y)
    xs = np.unique(x[keep])
    groups = [y[keep & (x == value)] for value in xs]
    mean = np.array([g.mean() for g in groups])
    std = np.array([g.std(ddof=1) if len(g) > 1 else 0.0 for g in groups])
    return xs, mean, std


def with_train_size(cfg: DictConfig, size: int) -> DictConfig:
    """A copy of ``cfg`` that trains on the file of ``size``, so ``load_datasets`` can read it."""
    sized = copy.deepcopy(cfg)
    sized.dataset.train_size = size
    return sized


def learning_curve_points(cfg: DictConfig, model: dict, outdir: Path) -> tuple[list[Point], str]:
    """One point per size (nested files), or per size and repeat (random subsets of the largest file).

    Also returns the training data in words, for figure titles.
    """
    section = cfg.learning_curve
    sizes = sorted(int(s) for s in section.sizes)
    if not isinstance(section.repeats, int) or section.repeats < 1:
        raise ConfigError(f"learning_curve.repeats={section.repeats!r} is not allowed: an integer >= 1")
    if not layout_of(cfg.dataset).fixed_train_files:
        return own_data_points(cfg, model, outdir, sizes)
    known = sorted(int(k) for k in cfg.dataset.train_files)
    unknown = [s for s in sizes if s not in known]
    if not sizes or unknown:
        raise ConfigError(f"learning_curve.sizes={sizes} is not allowed: sizes from dataset.train_files {known}")
    by_size = {size: load_datasets(with_train_size(cfg, size)) for size in sizes}
    if section.repeats == 1:
        points = [
            Point(f"size_{size:04d}", {"size": size, "repeat": 0, "train_file": data.train.path.name}, model, data)
            for size, data in by_size.items()
        ]
        return points, "nested files " + ", ".join(f"{p.data.train.path.name} ({len(p.data.train)} frames)" for p in points)
    pool = by_size[sizes[-1]]
    # as many frames as the size's file holds, so repeats and nested files mean the same n
    points = nested_subsets(pool, {size: len(by_size[size].train) for size in sizes}, section.repeats, section.seed, model, outdir)
    return points, f"random subsets of {pool.train.path.name} ({len(pool.train)} frames), {section.repeats} per size"


def own_data_points(cfg: DictConfig, model: dict, outdir: Path, sizes: list[int]) -> tuple[list[Point], str]:
    """Own data (``dataset=files|pool``): seeded nested subsets of the training split, sizes in frames."""
    section = cfg.learning_curve
    pool = load_datasets(cfg)
    model = fill_auto(model, cfg)
    n = len(pool.train)
    if not sizes or sizes[0] < 1 or sizes[-1] > n:
        raise ConfigError(
            f"learning_curve.sizes={sizes} is not allowed: numbers of frames from 1 to the {n} training frames of "
            f"{pool.train.path.name}, e.g. \"learning_curve.sizes=[{max(1, n // 4)},{max(1, n // 2)},{n}]\""
        )
    points = nested_subsets(pool, {size: size for size in sizes}, section.repeats, section.seed, model, outdir)
    return points, f"random nested subsets of {pool.train.path.name} ({n} frames), {section.repeats} per size"


def nested_subsets(pool: Datasets, counts: dict[int, int], repeats: int, seed: int, model: dict, outdir: Path) -> list[Point]:
    """One point per size and repeat: ``counts[size]`` frames of ``pool.train``, validation unchanged.

    One random order per repeat, and each size takes its first frames: within a repeat the subsets are
    nested like the workshop's files, so the curve shows added data, not a new sample.
    """
    points = []
    for repeat, size in itertools.product(range(repeats), counts):
        name = f"size_{size:04d}_rep_{repeat}"
        order = np.random.default_rng(seed + repeat).permutation(len(pool.train))
        indices = np.sort(order[: counts[size]])
        train = subset_frames(pool.train, indices, outdir / name / "train_subset.xyz")
        coords = {"size": size, "repeat": repeat, "train_file": pool.train.path.name}
        points.append(Point(name, coords, model, replace(pool, train=train)))
    return points


@dataclass
class CurveResult:
    """What ``run_learning_curve`` wrote and found."""

    outdir: Path
    csv: Path
    figure: Path
    rows: list[dict]
    fits: dict[str, PowerLaw]
    extrapolate_to: int
    parent_run_id: str


def run_learning_curve(cfg: DictConfig) -> CurveResult:
    """Fit the fixed model at every training size and fit a power law to the validation curve."""
    cfg, model, source = config_and_model(cfg, "learning_curve")
    section = cfg.learning_curve
    outdir = run_dir(section)
    points, training = learning_curve_points(cfg, model, outdir)
    tracker = Tracker(cfg.tracking)
    display = kind(model["kind"]).display_name
    print(f"[hpo] learning curve of {display} ({source}): {len(points)} fits in {outdir}", flush=True)
    with tracker.run(f"learning-curve-{outdir.name}", tags=parent_tags(cfg, "learning-curve", points)) as parent:
        tracker.log_config(parent, cfg)
        tracker.log(parent, params={**flatten(model), "learning_curve.sizes": list(section.sizes), "learning_curve.repeats": section.repeats,
                                    "learning_curve.from_study": section.from_study, "model_source": source})
        rows = run_points(cfg, tracker, parent, points, outdir)
        specs = reported_metrics(metric_specs(section), rows, outdir)
        extrapolate_to = int(section.extrapolate_factor * np.nanmax(column(rows, "n_train")))
        fits = validation_power_laws(rows, specs, extrapolate_to)
        log_learning_curve(tracker, parent, rows, specs, fits, extrapolate_to)
        csv_path = write_csv(outdir / "learning_curve.csv", rows)
        title = figure_title(display, source, training, points[0].data.val)
        figure = plot_learning_curve(outdir / "learning_curve.png", rows, specs, fits, extrapolate_to, title)
        tracker.log_artifacts(parent, [csv_path, figure])
    print(f"[hpo] learning curve: {csv_path} and {figure} (MLflow run {parent})", flush=True)
    return CurveResult(outdir, csv_path, figure, rows, fits, extrapolate_to, parent)


def validation_power_laws(rows: list[dict], specs: list[MetricSpec], extrapolate_to: int) -> dict[str, PowerLaw]:
    """Power law of each validation curve (mean over repeats per size), printed with its extrapolation."""
    n_train = column(rows, "n_train")
    fits = {}
    for spec in specs:
        sizes, mean, _ = curve_stats(n_train, column(rows, spec.val_key))
        fit = fit_power_law(sizes, mean)
        if fit is None:
            print(f"[hpo] {spec.val_key}: fewer than two sizes fitted, no power law", flush=True)
            continue
        fits[spec.val_key] = fit
        print(
            f"[hpo] {spec.val_key}: power-law slope {fit.slope:.3f} (log-log fit over n_train {int(sizes.min())}-{int(sizes.max())}); "
            f"extrapolated to n_train={extrapolate_to}: {fit.at(extrapolate_to):.4g} {spec.unit}",
            flush=True,
        )
    return fits


def log_learning_curve(
    tracker: Tracker, run_id: str, rows: list[dict], specs: list[MetricSpec], fits: dict[str, PowerLaw], extrapolate_to: int
) -> None:
    """Slopes and extrapolations on the parent run, and the curve as metrics stepped by n_train (charted by the MLflow UI)."""
    for key, fit in fits.items():
        tracker.log(run_id, metrics={f"slope.{key}": fit.slope, f"extrapolated.{key}": float(fit.at(extrapolate_to))})
    tracker.log(run_id, params={"extrapolated_n_train": extrapolate_to})
    for row in rows:
        tracker.log(run_id, metrics={s.val_key: row.get(s.val_key) for s in specs if _finite(row.get(s.val_key))}, step=int(row["n_train"]))


def learning_curve(cfg: DictConfig) -> None:
    """``python -m hpo learning-curve``: validation error against training set size, with a power-law fit."""
    run_learning_curve(cfg)


def plot_learning_curve(
    path: Path, rows: list[dict], specs: list[MetricSpec], fits: dict[str, PowerLaw], extrapolate_to: int, title: str
) -> Path:
    """Log-log training and validation error against training frames, one panel per metric."""
    fig, axes = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 4.4), squeeze=False)
    n_train = column(rows, "n_train")
    for ax, spec in zip(axes[0], specs):
        for key, label, marker in ((spec.train_key, "training", "o"), (spec.val_key, "validation", "s")):
            xs, mean, std = curve_stats(n_train, column(rows, key))
            ax.errorbar(xs, mean, yerr=std if std.any() else None, marker=marker, capsize=3, label=label)
        fit = fits.get(spec.val_key)
        if fit is not None:
            xs = np.geomspace(np.nanmin(n_train), extrapolate_to, 50)
            ax.plot(xs, fit.at(xs), "k--", lw=1, label=f"validation power law, slope {fit.slope:.2f}")
            ax.plot([extrapolate_to], [fit.at(extrapolate_to)], "k*", ms=11,
                    label=f"extrapolated to {extrapolate_to}: {fit.at(extrapolate_to):.3g} {spec.unit}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # ticks at the sizes fitted (and the extrapolation), written out: 3x10^2 labels collide
        ticks = sorted({int(n) for n in n_train[np.isfinite(n_train)]} | {int(extrapolate_to)})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training set size (frames)")
        ax.set_ylabel(spec.axis_label)
        ax.set_title(spec.label, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)
