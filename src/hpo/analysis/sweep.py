"""Parameter sweeps: training and validation error against one or two model parameters.

``python -m hpo sweep-param``: every other parameter fixed; the validation minimum is marked and, for a
1-D sweep, the overfitting region (see ``overfitting_steps``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf

from hpo import config as hpo_config
from hpo.analysis.fit_series import (
    MetricSpec, Point, config_and_model, _finite, column, metric_specs, param_axis_label, parent_tags, reported_metrics, run_dir,
    run_points, write_csv,
)
from hpo.errors import ConfigError
from hpo.data import Datasets, load_datasets
from hpo.models import kind
from hpo.models.base import has_dotted, with_values
from hpo.plots import figure_title, log_axis_wanted, plt, save_figure
from hpo.tracking import Tracker, flatten


@dataclass
class SweepResult:
    """What ``run_sweep`` wrote and found; ``minimum`` and ``overfitting`` are keyed by validation metric."""

    outdir: Path
    csv: Path
    figure: Path
    rows: list[dict]
    params: list[str]
    minimum: dict[str, dict[str, Any]]
    overfitting: dict[str, list[tuple[Any, Any]]]
    parent_run_id: str


def sweep_axes(cfg: DictConfig, model: dict) -> dict[str, list]:
    """The swept parameters and their values (numbers sorted ascending), checked against the model."""
    section = cfg.sweep
    if section.param2 is not None and section.param2 == section.param:
        raise ConfigError(f"sweep.param2={section.param2!r} is not allowed: a parameter other than sweep.param")
    axes = {}
    for key, values_key in (("param", "values"), ("param2", "values2")):
        param = section.get(key)
        if param is None:
            continue
        if not has_dotted(model, str(param)):
            raise ConfigError(
                f"sweep.{key}={param!r} is not allowed: a parameter of model {model['kind']!r}, one of {sorted(flatten(model))}"
            )
        values = OmegaConf.to_container(section[values_key], resolve=True) if section[values_key] is not None else None
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{values_key}={values!r} is not allowed: a non-empty list of values for {param}")
        axes[str(param)] = sorted(values) if all(_finite(v) for v in values) else values
    return axes


def sweep_points(model: dict, axes: dict[str, list], data: Datasets) -> list[Point]:
    """One point per combination of the swept values; every point's model is checked before any fit."""
    points = []
    for index, combo in enumerate(itertools.product(*axes.values())):
        coords = dict(zip(axes, combo))
        point_model = with_values(model, coords)
        try:
            hpo_config.check_model(point_model)
        except ConfigError as exc:
            raise ConfigError(f"sweep point {coords}: {exc}") from None
        points.append(Point(f"point_{index:03d}", coords, point_model, data))
    return points


def overfitting_steps(x: list, train: np.ndarray, val: np.ndarray, towards: str) -> list[tuple[Any, Any]]:
    """The overfitting region of a 1-D sweep, as (from, to) parameter intervals.

    Walk the points in the direction that makes the model more flexible (less regularised; ``towards`` is
    "up" when larger values are more flexible, "down" otherwise), skipping failed points. A step from one
    point to the next more flexible one is an overfitting step when the validation error rises while the
    training error still falls: the extra flexibility goes into fitting the training set, not the physics.
    The region is the union of those steps; a step where both errors rise is not counted (the fit got worse,
    e.g. ill-conditioned), nor one where both fall.
    """
    order = [i for i in np.argsort(np.asarray(x, dtype=float), kind="stable") if np.isfinite(train[i]) and np.isfinite(val[i])]
    if towards == "down":
        order = order[::-1]
    return [(x[a], x[b]) for a, b in zip(order, order[1:]) if val[b] > val[a] and train[b] < train[a]]


def run_sweep(cfg: DictConfig) -> SweepResult:
    """Fit the model at every value (or grid point) of the swept parameter(s); find the validation minimum."""
    cfg, model, source = config_and_model(cfg, "sweep")
    section = cfg.sweep
    data = load_datasets(cfg)
    model = hpo_config.fill_auto(model, cfg)
    axes = sweep_axes(cfg, model)
    hpo_config.check_data(cfg, data)
    points = sweep_points(model, axes, data)
    outdir = run_dir(section)
    tracker = Tracker(cfg.tracking)
    print(f"[hpo] sweep of {', '.join(axes)} ({len(points)} fits, other parameters: {source}) in {outdir}", flush=True)
    with tracker.run(f"sweep-{'-'.join(axes)}", tags=parent_tags(cfg, "sweep-param", points)) as parent:
        tracker.log_config(parent, cfg)
        tracker.log(parent, params={**flatten(model), **{f"sweep.{name}": values for name, values in axes.items()},
                                    "sweep.from_study": section.from_study, "model_source": source})
        rows = run_points(cfg, tracker, parent, points, outdir)
        specs = reported_metrics(metric_specs(section), rows, outdir)
        minimum, overfitting = summarise_sweep(cfg, axes, rows, specs)
        for key, found in minimum.items():
            tracker.log(parent, metrics={f"min.{key}": found[key]}, params={f"min_at.{key}": placed(found, axes)})
        for key, steps in overfitting.items():
            tracker.log(parent, params={f"overfitting_region.{key}": steps})
        for row, flagged in zip(rows, overfit_flags(rows, axes, overfitting, specs)):
            row["overfitting"] = flagged
        csv_path = write_csv(outdir / "sweep.csv", rows)
        swept = f"{' x '.join(axes)} swept; other parameters: {source}"
        title = figure_title(kind(model["kind"]).display_name, swept, f"{data.train.path.name} ({len(data.train)} frames)", data.val)
        if len(axes) == 1:
            figure = plot_sweep(outdir / "sweep.png", cfg, axes, rows, specs, minimum, overfitting, title)
        else:
            figure = plot_sweep_grid(outdir / "sweep.png", cfg, axes, rows, specs, minimum, title)
        tracker.log_artifacts(parent, [csv_path, figure])
    print(f"[hpo] sweep: {csv_path} and {figure} (MLflow run {parent})", flush=True)
    return SweepResult(outdir, csv_path, figure, rows, list(axes), minimum, overfitting, parent)


def summarise_sweep(
    cfg: DictConfig, axes: dict[str, list], rows: list[dict], specs: list[MetricSpec]
) -> tuple[dict[str, dict], dict[str, list]]:
    """The validation minimum of each metric, and for a 1-D sweep its overfitting region; both printed."""
    minimum, overfitting = {}, {}
    towards = (cfg.sweep.get("flexible_towards") or {}).get(next(iter(axes))) if len(axes) == 1 else None
    for spec in specs:
        val = column(rows, spec.val_key)
        best = rows[int(np.nanargmin(val))]
        minimum[spec.val_key] = {**{name: best[name] for name in axes}, spec.val_key: best[spec.val_key]}
        print(f"[hpo] {spec.val_key}: minimum {best[spec.val_key]:.4g} {spec.unit} at {placed(best, axes)}", flush=True)
        if towards is None:
            continue
        steps = overfitting_steps(axes[next(iter(axes))], column(rows, spec.train_key), val, str(towards))
        overfitting[spec.val_key] = steps
        if steps:
            print(f"[hpo] {spec.val_key}: overfitting (validation rises, training falls) between {steps}", flush=True)
    if len(axes) == 1 and towards is None:
        print(f"[hpo] note: sweep.flexible_towards has no direction for {next(iter(axes))}; no overfitting region", flush=True)
    return minimum, overfitting


def placed(values: dict, axes: dict[str, list]) -> str:
    """Where a point sits in the sweep, e.g. "n_max=2, default_sigma.energy=0.01"."""
    return ", ".join(f"{name}={values[name]}" for name in axes)


def overfit_flags(rows: list[dict], axes: dict[str, list], overfitting: dict[str, list], specs: list[MetricSpec]) -> list[bool]:
    """A row is flagged when it is the flexible end of an overfitting step of the first metric."""
    if not specs or specs[0].val_key not in overfitting:
        return [False] * len(rows)
    param = next(iter(axes))
    ends = {step[1] for step in overfitting[specs[0].val_key]}
    return [row[param] in ends for row in rows]


def sweep_param(cfg: DictConfig) -> None:
    """``python -m hpo sweep-param``: training and validation error against one or two model parameters."""
    run_sweep(cfg)


def plot_sweep(
    path: Path,
    cfg: DictConfig,
    axes: dict[str, list],
    rows: list[dict],
    specs: list[MetricSpec],
    minimum: dict[str, dict],
    overfitting: dict[str, list],
    title: str,
) -> Path:
    """Training and validation error against the parameter, minimum marked, overfitting region shaded."""
    param, values = next(iter(axes.items()))
    numeric = all(_finite(v) for v in values)
    # Categorical values (e.g. covariance_type) are drawn at positions 0, 1, ... with their names as ticks.
    position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    x = np.array([position[row[param]] for row in rows])
    fig, panels = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 4.4), squeeze=False)
    for ax, spec in zip(panels[0], specs):
        for key, label, marker in ((spec.train_key, "training", "o"), (spec.val_key, "validation", "s")):
            y = column(rows, key)
            ax.plot(x[np.isfinite(y)], y[np.isfinite(y)], marker=marker, label=label)
        for i, (start, end) in enumerate(overfitting.get(spec.val_key, [])):
            ax.axvspan(position[start], position[end], color="tab:red", alpha=0.15,
                       label="overfitting: validation rises, training falls" if i == 0 else None)
        best = minimum[spec.val_key]
        ax.plot([position[best[param]]], [best[spec.val_key]], "k*", ms=13,
                label=f"validation minimum {best[spec.val_key]:.3g} at {best[param]}")
        if numeric and log_axis_wanted(values):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(list(position.values()), [str(v) for v in values])
        elif all(isinstance(v, int) for v in values):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # n_max=2.5 does not exist
        ax.set_xlabel(param_axis_label(cfg.sweep, param))
        ax.set_ylabel(spec.axis_label)
        ax.set_title(spec.label, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def plot_sweep_grid(
    path: Path,
    cfg: DictConfig,
    axes: dict[str, list],
    rows: list[dict],
    specs: list[MetricSpec],
    minimum: dict[str, dict],
    title: str,
) -> Path:
    """Heat maps of training and validation error over a 2-D grid (one row per metric), minimum starred."""
    (p1, v1), (p2, v2) = axes.items()
    fig, panels = plt.subplots(len(specs), 2, figsize=(10.5, 4.2 * len(specs)), squeeze=False)
    for row_axes, spec in zip(panels, specs):
        grids = {key: np.full((len(v2), len(v1)), np.nan) for key in (spec.train_key, spec.val_key)}
        for row in rows:
            for key, grid in grids.items():
                grid[v2.index(row[p2]), v1.index(row[p1])] = row[key] if _finite(row.get(key)) else np.nan
        low = np.nanmin([np.nanmin(g) for g in grids.values()])
        high = np.nanmax([np.nanmax(g) for g in grids.values()])
        for ax, (key, grid), label in zip(row_axes, grids.items(), ("training", "validation")):
            image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=low, vmax=high, aspect="auto")
            fig.colorbar(image, ax=ax, label=spec.axis_label)
            ax.set_xticks(range(len(v1)), [f"{v:.3g}" if _finite(v) else str(v) for v in v1])
            ax.set_yticks(range(len(v2)), [f"{v:.3g}" if _finite(v) else str(v) for v in v2])
            ax.set_xlabel(param_axis_label(cfg.sweep, p1))
            ax.set_ylabel(param_axis_label(cfg.sweep, p2))
            ax.set_title(f"{label} {spec.label}", fontsize=9)
            best = minimum[spec.val_key]
            ax.plot([v1.index(best[p1])], [v2.index(best[p2])], "r*", ms=14,
                    label=f"validation minimum {best[spec.val_key]:.3g}")
            ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path, title)
