"""Learning curves and parameter sweeps: one model fitted at many points, every fit one nested MLflow run.

Both commands follow the same recipe, implemented once in ``run_points``:

1. plan a list of ``Point``s (model config + training/validation data + the CSV columns that place it);
2. fit and evaluate each with ``objective.score`` (which dispatches on ``model.kind``, so GAP and SA-GPR
   both work) under one MLflow parent run, one nested run per point;
3. write one CSV row per point and one figure, and log both on the parent run.

A point whose fit fails is recorded (nested run FAILED, CSV ``state=FAIL`` with the reason) and the others go
on, as in a study. ``learning_curve`` adds a power-law fit of the validation curve; ``sweep_param`` adds the
validation minimum and the overfitting region (see ``overfitting_steps``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator, NullFormatter
from omegaconf import DictConfig, OmegaConf

from hpo import config as hpo_config
from hpo.atomic import write_text
from hpo.config import ConfigError
from hpo.data import Datasets, load_datasets, subset_frames
from hpo.objective import classify, score, with_values
from hpo.plots import MODEL_NAMES, figure_title, log_axis_wanted, plt, save_figure
from hpo.study import StudyError, best_trial, load_study
from hpo.tracking import Tracker, flatten, provenance_tags

TIMESTAMP = "%Y%m%d-%H%M%S"  # as the fit command's working directories


# ---------------------------------------------------------------------------------------------------------
# Config views
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """One curve to draw: a metric of ``objective.score`` without its ``train_``/``val_`` prefix."""

    name: str
    label: str
    unit: str

    @property
    def train_key(self) -> str:
        return f"train_{self.name}"

    @property
    def val_key(self) -> str:
        return f"val_{self.name}"

    @property
    def axis_label(self) -> str:
        return f"{self.label} ({self.unit})"


def metric_specs(section: DictConfig, kind: str) -> list[MetricSpec]:
    """The ``metrics`` list of a config section (learning_curve, sweep, report) for one model kind."""
    if kind not in section.metrics:
        raise ConfigError(f"metrics has no entry for model kind {kind!r}; add one (name, label, unit)")
    return [MetricSpec(str(m.name), str(m.label), str(m.unit)) for m in section.metrics[kind]]


def reported_metrics(specs: list[MetricSpec], rows: list[dict], outdir: Path) -> list[MetricSpec]:
    """The specs the model actually reported (SA-GPR has no force metric, GAP no ``val_rmse``).

    Raises when no point could be fitted or none reported a configured metric: there is nothing to draw.
    """
    fitted = [row for row in rows if row["state"] == "COMPLETE"]
    if not fitted:
        failures = sorted({row["failure"] for row in rows})
        raise RuntimeError(f"every fit failed ({', '.join(failures)}); the reasons are in {outdir}/*/failure.txt and in MLflow")
    present = [s for s in specs if any(_finite(row.get(s.val_key)) for row in fitted)]
    if not present:
        reported = sorted(k for k in fitted[0] if k.startswith("val_"))
        raise ConfigError(f"metrics {[s.name for s in specs]} is not allowed: the model reports {reported} (drop the val_ prefix)")
    for spec in specs:
        if spec not in present:
            print(f"[hpo] note: no point reported {spec.val_key}; its panel is left out", flush=True)
    return present


def param_unit(section: DictConfig, kind: str, param: str) -> str:
    """The unit of a model parameter from ``param_units`` ('' for a pure number)."""
    units = section.param_units.get(kind) or {}
    return str(units.get(param, ""))


def param_axis_label(section: DictConfig, kind: str, param: str) -> str:
    """An axis label with the parameter's unit, or "(pure number)" so every axis says what it counts."""
    unit = param_unit(section, kind, param)
    return f"{param} ({unit})" if unit else f"{param} (pure number)"


def run_dir(section: DictConfig) -> Path:
    """``<section.dir>/<section.name or a timestamp>``: where one command's outputs go."""
    name = section.name or time.strftime(TIMESTAMP)
    return hpo_config.output_path(section.dir) / str(name)


# ---------------------------------------------------------------------------------------------------------
# The fixed model: defaults or a study's best trial
# ---------------------------------------------------------------------------------------------------------


def fixed_model(cfg: DictConfig, from_study: str | None) -> tuple[dict, str]:
    """The model config to hold fixed, and a phrase saying where its parameters came from.

    With ``from_study`` the best trial's parameters (dotted names, as sampled) replace the model defaults;
    parameters the study did not search keep their ``conf/model/`` value.
    """
    model = hpo_config.model_params(cfg)
    if not from_study:
        return model, "model defaults"
    study = load_study(str(cfg.study.storage), str(from_study))
    try:
        best = best_trial(study)
    except ValueError:
        raise StudyError(f"study {from_study!r} has no finished trial to take parameters from") from None
    try:
        model = with_values(model, best.params)
    except (KeyError, TypeError):
        raise ConfigError(
            f"from_study={from_study!r}: its parameters {sorted(best.params)} do not fit model {model['kind']!r}"
        ) from None
    hpo_config.check_model(model)
    return model, f"best trial {best.number} of study {from_study}"


# ---------------------------------------------------------------------------------------------------------
# Fitting many points under one parent run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One fit of a curve: its folder/run name, the CSV columns that place it, its model and data."""

    name: str
    coords: dict[str, Any]
    model: dict
    data: Datasets


def start_parent(cfg: DictConfig, tracker: Tracker, name: str, command: str, points: list[Point], params: dict) -> str:
    """The parent run of a command, tagged with provenance and the sha256 of every file it reads."""
    hashes = {}
    for point in points:
        hashes.update(point.data.hashes)
    run_id = tracker.start_run(
        name, tags={**provenance_tags(), **hashes, "command": command, "model_kind": cfg.model.kind, "threads": cfg.threads}
    )
    tracker.log_config(run_id, cfg)
    tracker.log(run_id, params=params)
    return run_id


def run_points(cfg: DictConfig, tracker: Tracker, parent_run_id: str, points: list[Point], outdir: Path) -> list[dict]:
    """Fit every point in ``outdir/<point.name>`` as a nested run; one row (coords, state, metrics) per point."""
    rows = []
    for index, point in enumerate(points, start=1):
        workdir = outdir / point.name
        n_train = len(point.data.train)
        run_id = tracker.start_run(
            point.name, tags={**point.coords, "n_train": n_train, "state": "RUNNING"}, parent_run_id=parent_run_id
        )
        row: dict[str, Any] = {**point.coords, "n_train": n_train, "state": "COMPLETE", "failure": ""}
        try:
            scored = score(cfg, point.model, point.data, workdir)
        except Exception as exc:  # a failed point is a result: record it and fit the others
            reason = classify(exc)
            write_text(workdir / "failure.txt", "".join(traceback.format_exception(exc)))
            tracker.log(run_id, tags={"state": "FAIL", "failure": reason, "failure_message": str(exc)[-5000:]})
            tracker.log_artifacts(run_id, [workdir / "failure.txt"])
            tracker.end_run(run_id, "FAILED")
            row.update(state="FAIL", failure=reason)
            print(f"[hpo] {point.name} ({index}/{len(points)}): FAILED ({reason}): {str(exc)[:300]}", flush=True)
        else:
            # Model size shows what a more flexible model costs on disk and in memory at prediction time.
            model_bytes = sum(size_on_disk(p) for p in scored.model_files)
            found = {**scored.metrics, "model_bytes": model_bytes, "n_train": n_train}
            tracker.log(run_id, params=scored.params, metrics=found, tags={**scored.tags, "state": "COMPLETE"})
            tracker.log_artifacts(run_id, scored.artifacts)
            tracker.end_run(run_id, "FINISHED")
            row.update(found)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in scored.metrics.items() if k.endswith("_rmse"))
            print(f"[hpo] {point.name} ({index}/{len(points)}): {shown}", flush=True)
        row.update(workdir=str(workdir), mlflow_run_id=run_id)
        rows.append(row)
    return rows


def size_on_disk(path: Path) -> int:
    """Bytes of a model file, or of every file in a model folder (an SA-GPR model is a folder)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


@contextlib.contextmanager
def ended_on_error(tracker: Tracker, run_id: str):
    """End the parent run FAILED (KILLED on Ctrl-C) if the block raises, so no run stays RUNNING forever."""
    try:
        yield
    except KeyboardInterrupt:
        tracker.end_run(run_id, "KILLED")
        raise
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise


def finish_parent(tracker: Tracker, run_id: str, rows: list[dict], artifacts: list[Path]) -> None:
    """Log the CSV and figure; the parent fails only when no point could be fitted."""
    tracker.log_artifacts(run_id, artifacts)
    tracker.end_run(run_id, "FINISHED" if any(r["state"] == "COMPLETE" for r in rows) else "FAILED")


def write_csv(path: Path, rows: list[dict]) -> Path:
    """One row per point; columns in first-seen order, so the placing columns come first."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def column(rows: list[dict], key: str) -> np.ndarray:
    """A metric over the rows, NaN where a point failed or lacks it."""
    return np.array([float(row[key]) if _finite(row.get(key)) else np.nan for row in rows])


# ---------------------------------------------------------------------------------------------------------
# Learning curve
# ---------------------------------------------------------------------------------------------------------


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
    known = sorted(int(k) for k in cfg.dataset.train_files)
    unknown = [s for s in sizes if s not in known]
    if not sizes or unknown:
        raise ConfigError(f"learning_curve.sizes={sizes} is not allowed: sizes from dataset.train_files {known}")
    if not isinstance(section.repeats, int) or section.repeats < 1:
        raise ConfigError(f"learning_curve.repeats={section.repeats!r} is not allowed: an integer >= 1")
    by_size = {size: load_datasets(with_train_size(cfg, size)) for size in sizes}
    if section.repeats == 1:
        points = [
            Point(f"size_{size:04d}", {"size": size, "repeat": 0, "train_file": data.train.path.name}, model, data)
            for size, data in by_size.items()
        ]
        return points, "nested files " + ", ".join(f"{p.data.train.path.name} ({len(p.data.train)} frames)" for p in points)
    pool = by_size[sizes[-1]]
    points = []
    for repeat, size in itertools.product(range(section.repeats), sizes):
        name = f"size_{size:04d}_rep_{repeat}"
        # One random order per repeat, and each size takes its first frames: within a repeat the subsets are
        # nested like the files, so the curve shows added data, not a new sample. As many frames as the
        # size's file holds, so repeats and nested files mean the same n.
        order = np.random.default_rng(section.seed + repeat).permutation(len(pool.train))
        indices = np.sort(order[: len(by_size[size].train)])
        train = subset_frames(pool.train, indices, outdir / name / "train_subset.xyz")
        coords = {"size": size, "repeat": repeat, "train_file": pool.train.path.name}
        points.append(Point(name, coords, model, Datasets(train=train, val=pool.val)))
    return points, f"random subsets of {pool.train.path.name} ({len(pool.train)} frames), {section.repeats} per size"


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
    hpo_config.validate(cfg)
    section = cfg.learning_curve
    model, source = fixed_model(cfg, section.from_study)
    outdir = run_dir(section)
    points, training = learning_curve_points(cfg, model, outdir)
    tracker = Tracker(cfg.tracking)
    parent = start_parent(
        cfg,
        tracker,
        f"learning-curve-{outdir.name}",
        "learning-curve",
        points,
        {**flatten(model), "learning_curve.sizes": list(section.sizes), "learning_curve.repeats": section.repeats,
         "learning_curve.from_study": section.from_study, "model_source": source},
    )
    print(f"[hpo] learning curve of {MODEL_NAMES.get(model['kind'], model['kind'])} ({source}): {len(points)} fits in {outdir}", flush=True)
    with ended_on_error(tracker, parent):
        rows = run_points(cfg, tracker, parent, points, outdir)
        specs = reported_metrics(metric_specs(section, model["kind"]), rows, outdir)
        extrapolate_to = int(section.extrapolate_factor * np.nanmax(column(rows, "n_train")))
        fits = validation_power_laws(rows, specs, extrapolate_to)
        log_learning_curve(tracker, parent, rows, specs, fits, extrapolate_to)
        csv_path = write_csv(outdir / "learning_curve.csv", rows)
        title = figure_title(model["kind"], source, training, points[0].data.val)
        figure = plot_learning_curve(outdir / "learning_curve.png", rows, specs, fits, extrapolate_to, title)
    finish_parent(tracker, parent, rows, [csv_path, figure])
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


# ---------------------------------------------------------------------------------------------------------
# Parameter sweep
# ---------------------------------------------------------------------------------------------------------


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
        if not hpo_config.has_dotted(model, str(param)):
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
    hpo_config.validate(cfg)
    section = cfg.sweep
    model, source = fixed_model(cfg, section.from_study)
    axes = sweep_axes(cfg, model)
    data = load_datasets(cfg)
    points = sweep_points(model, axes, data)
    outdir = run_dir(section)
    tracker = Tracker(cfg.tracking)
    parent = start_parent(
        cfg,
        tracker,
        f"sweep-{'-'.join(axes)}",
        "sweep-param",
        points,
        {**flatten(model), **{f"sweep.{name}": values for name, values in axes.items()},
         "sweep.from_study": section.from_study, "model_source": source},
    )
    print(f"[hpo] sweep of {', '.join(axes)} ({len(points)} fits, other parameters: {source}) in {outdir}", flush=True)
    with ended_on_error(tracker, parent):
        rows = run_points(cfg, tracker, parent, points, outdir)
        specs = reported_metrics(metric_specs(section, model["kind"]), rows, outdir)
        minimum, overfitting = summarise_sweep(cfg, model["kind"], axes, rows, specs)
        for key, found in minimum.items():
            tracker.log(parent, metrics={f"min.{key}": found[key]}, params={f"min_at.{key}": placed(found, axes)})
        for key, steps in overfitting.items():
            tracker.log(parent, params={f"overfitting_region.{key}": steps})
        for row, flagged in zip(rows, overfit_flags(rows, axes, overfitting, specs)):
            row["overfitting"] = flagged
        csv_path = write_csv(outdir / "sweep.csv", rows)
        swept = f"{' x '.join(axes)} swept; other parameters: {source}"
        title = figure_title(model["kind"], swept, f"{data.train.path.name} ({len(data.train)} frames)", data.val)
        if len(axes) == 1:
            figure = plot_sweep(outdir / "sweep.png", cfg, model["kind"], axes, rows, specs, minimum, overfitting, title)
        else:
            figure = plot_sweep_grid(outdir / "sweep.png", cfg, model["kind"], axes, rows, specs, minimum, title)
    finish_parent(tracker, parent, rows, [csv_path, figure])
    print(f"[hpo] sweep: {csv_path} and {figure} (MLflow run {parent})", flush=True)
    return SweepResult(outdir, csv_path, figure, rows, list(axes), minimum, overfitting, parent)


def summarise_sweep(
    cfg: DictConfig, kind: str, axes: dict[str, list], rows: list[dict], specs: list[MetricSpec]
) -> tuple[dict[str, dict], dict[str, list]]:
    """The validation minimum of each metric, and for a 1-D sweep its overfitting region; both printed."""
    minimum, overfitting = {}, {}
    towards = cfg.sweep.flexible_towards.get(kind, {}).get(next(iter(axes))) if len(axes) == 1 else None
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
    kind: str,
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
        ax.set_xlabel(param_axis_label(cfg.sweep, kind, param))
        ax.set_ylabel(spec.axis_label)
        ax.set_title(spec.label, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def plot_sweep_grid(
    path: Path,
    cfg: DictConfig,
    kind: str,
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
            ax.set_xlabel(param_axis_label(cfg.sweep, kind, p1))
            ax.set_ylabel(param_axis_label(cfg.sweep, kind, p2))
            ax.set_title(f"{label} {spec.label}", fontsize=9)
            best = minimum[spec.val_key]
            ax.plot([v1.index(best[p1])], [v2.index(best[p2])], "r*", ms=14,
                    label=f"validation minimum {best[spec.val_key]:.3g}")
            ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path, title)
