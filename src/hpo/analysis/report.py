"""A study report: one self-contained HTML page per Optuna study, its figures also logged to MLflow.

``python -m hpo report`` reads study ``study.name`` from ``study.storage`` (nothing is fitted) and writes
``<report.dir>/<study>.html``. Every figure is a PNG embedded as a base64 data URI, so the page opens
offline, can be mailed or archived, and loads nothing from any server. The PNGs are also kept in
``<report.dir>/<study>/`` and logged, with the page, to one MLflow run named ``report-<study>``.

The page holds, in this order (the headings are ``SECTIONS``): the optimisation history with the default
trial marked, the parameter importances (fANOVA; skipped with a note for too few trials), a slice plot
(objective against each parameter), training against validation error of every finished trial with the
overfit ones flagged, the best trial's own figures (its parity plot), and a table of the top trials.
"""

from __future__ import annotations

import base64
import html
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from hpo import config as hpo_config
from hpo import plots
from hpo.analysis.fit_series import MetricSpec, metric_specs, param_axis_label
from hpo.safe_files import write_text
from hpo.errors import ConfigError
from hpo.data import load_datasets
from hpo.models import kind
from hpo.progress import format_value
from hpo.plots import data_line, figure_title, log_axis_wanted, plt, save_figure
from hpo.redact import redact
from hpo.search.study_record import config_for_study
from hpo.search.loop import fitted
from hpo.search.selection import best_trial, default_trial, primary
from hpo.search.storage import StudyError, load_study
from hpo.tracking import Tracker, provenance_tags

SECTIONS = {
    "history": "Optimisation history",
    "importance": "Parameter importances",
    "slice": "Slice plot",
    "train_val": "Training vs validation error",
    "best": "Best trial",
    "generalisation": "Validation, cross-validation and test",
    "pareto": "Accuracy vs cost (Pareto front)",
    "table": "Top trials",
}


@dataclass
class Section:
    """One part of the page: a heading, figures (PNG files) and/or a note or HTML table."""

    heading: str
    figures: list[Path]
    note: str = ""
    table_html: str = ""


@dataclass
class ReportResult:
    html: Path
    figures: list[Path]
    mlflow_run_id: str


def report(cfg: DictConfig) -> None:
    """``python -m hpo report``: the HTML report of study ``study.name``, composed for the study's own
    model kind and training size (``hpo.search.study_record``)."""
    write_report(cfg)


def write_report(cfg: DictConfig, overrides: list[str] | None = None) -> ReportResult:
    """Draw every figure of the study, write the self-contained page and log both to MLflow.

    ``overrides``: those ``cfg`` was composed with, to recompose it for the study's model kind and
    training size (default: the command line's; outside the CLI a config that disagrees with the study
    is refused)."""
    cfg = config_for_study(cfg, overrides=overrides)
    hpo_config.validate(cfg)
    name = str(cfg.study.name)
    study = load_study(cfg.study, name)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not finished:
        raise StudyError(f"study {name!r} in {cfg.study.storage} has no finished trial to report on")
    metric = study_metric(cfg)
    data = load_datasets(cfg)
    # The data of the config: run the report with the overrides the study was run with.
    training = f"{data.train.path.name} ({len(data.train)} frames)"
    data_text = data_line(training, data.val)
    title = figure_title(kind(cfg.model.kind).display_name, f"study {name}, {len(finished)} finished trials", training, data.val)
    figdir = hpo_config.output_path(cfg.report.dir) / name
    tracker = Tracker(cfg.tracking)
    sections = [
        Section(SECTIONS["history"], [history_figure(study, metric, figdir / "history.png", title)]),
        importance_section(cfg, study, finished, figdir / "importance.png", title),
        Section(SECTIONS["slice"], [slice_figure(cfg, study, finished, metric, figdir / "slice.png", title)]),
        train_val_section(cfg, study, finished, metric, figdir / "train_vs_validation.png", title),
        best_trial_section(cfg, best_trial(study)),
        generalisation_section(cfg, study, metric, tracker),
        Section(SECTIONS["table"], [], table_html=top_trials_table(cfg, study, metric)),
    ]
    if len(study.directions) > 1:
        pareto = plots.pareto_plot(figdir / "pareto_front.png", study, list(cfg.study.objectives), title)
        sections.insert(1, Section(SECTIONS["pareto"], [pareto]))
    page = hpo_config.output_path(cfg.report.dir) / f"{name}.html"
    write_text(page, render_page(cfg, study, finished, metric, data_description=data_text, sections=sections))
    figures = [path for section in sections for path in section.figures]
    tags = {**provenance_tags(), **data.hashes, "command": "report", "run_type": "report", "study": name, "storage": redact(cfg.study.storage)}
    with tracker.run(f"report-{name}", tags=tags) as run_id:
        tracker.log_artifacts(run_id, [*figures, page])
    print(f"[hpo] report of study {name!r}: {page} (MLflow run {run_id})", flush=True)
    return ReportResult(page, figures, run_id)


def study_metric(cfg: DictConfig) -> MetricSpec:
    """The ``report.metrics`` entry of the study's objective: its unit and its training counterpart."""
    specs = metric_specs(cfg.report)
    for spec in specs:
        if spec.val_key == cfg.study.metric:
            return spec
    raise ConfigError(
        f"study.metric={cfg.study.metric!r} has no entry in report.metrics (conf/figures/{cfg.model.kind}.yaml) "
        f"(entries: {[s.val_key for s in specs]}); add one with its label and unit"
    )


def minimizing(study: optuna.Study) -> bool:
    return study.directions[0] == optuna.study.StudyDirection.MINIMIZE


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def history_figure(study: optuna.Study, metric: MetricSpec, path: Path, title: str) -> Path:
    """Objective per trial with the best value so far; the default trial starred, failed trials ticked."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    numbers = np.array([t.number for t in finished])
    values = np.array([primary(t) for t in finished])
    best_so_far = (np.minimum if minimizing(study) else np.maximum).accumulate(values)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    ax.plot(numbers, values, "o", alpha=0.7, label="finished trial")
    ax.step(numbers, best_so_far, where="post", color="k", lw=1.2, label="best so far")
    default = default_trial(study)
    if default is not None:
        ax.plot([default.number], [primary(default)], "*", color="tab:red", ms=14, label=f"default (trial {default.number})")
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    if failed:
        # Failed trials have no value: tick them along the bottom so gaps in the numbering are explained.
        ax.plot(failed, [0.03] * len(failed), "x", color="grey", transform=ax.get_xaxis_transform(), label="failed trial")
    if log_axis_wanted(values):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"validation {metric.axis_label}")
    ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def importance_section(cfg: DictConfig, study: optuna.Study, finished: list[FrozenTrial], path: Path, title: str) -> Section:
    """fANOVA importances, or a note saying why there are none (too few trials, nothing varied)."""
    heading = SECTIONS["importance"]
    needed = cfg.report.min_trials_for_importance
    if len(finished) < needed:
        return Section(heading, [], note=f"Only {len(finished)} finished trials: importances need at least {needed} "
                                         "(report.min_trials_for_importance) to mean anything.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna warns about experimental arguments of its evaluators
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=cfg.study.seed)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator, target=primary)
    except (RuntimeError, ValueError) as exc:
        return Section(heading, [], note=f"Parameter importances could not be computed: {exc}")
    if not importances:
        return Section(heading, [], note="No parameter varied across the finished trials.")
    names = list(importances)[::-1]  # largest on top
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.8))
    ax.barh(names, [importances[n] for n in names], color="tab:blue", label=f"fANOVA, {len(finished)} trials")
    ax.set_xlabel("importance (fraction of objective variance explained)")
    ax.set_ylabel("parameter")
    ax.legend(fontsize=8)
    return Section(heading, [save_figure(fig, path, title)])


def slice_figure(cfg: DictConfig, study: optuna.Study, finished: list[FrozenTrial], metric: MetricSpec, path: Path, title: str) -> Path:
    """The objective against each parameter, coloured by trial number; default and best marked."""
    names = sorted({name for trial in finished for name in trial.params})
    ncols = min(3, max(len(names), 1))
    nrows = -(-max(len(names), 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.6 * nrows), squeeze=False, layout="constrained")
    best, default = best_trial(study), default_trial(study)
    # one diverged trial (tens of eV) would flatten every other point onto the axis
    log_values = log_axis_wanted(primary(t) for t in finished)
    for ax, name in zip(axes.flat, names):
        trials = [t for t in finished if name in t.params]
        dist = trials[0].distributions[name]
        categorical = isinstance(dist, CategoricalDistribution)
        position = axis_position(dist)
        x = [position(t.params[name]) for t in trials]
        points = ax.scatter(x, [primary(t) for t in trials], c=[t.number for t in trials], cmap="viridis", s=22, label="finished trial")
        for trial, style, label in ((default, "r*", "default"), (best, "kD", "best")):
            if trial is not None and name in trial.params:
                ax.plot([position(trial.params[name])], [primary(trial)], style, ms=10, mfc="none" if style == "kD" else None, label=label)
        if categorical:
            ax.set_xticks(range(len(dist.choices)), [str(c) for c in dist.choices])
        elif getattr(dist, "log", False):
            ax.set_xscale("log")
        if log_values:
            ax.set_yscale("log")
        ax.set_xlabel(param_axis_label(cfg.report, name))
        ax.set_ylabel(f"validation {metric.axis_label}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if names:
        fig.colorbar(points, ax=axes.ravel().tolist(), label="trial number")
    return save_figure(fig, path, title)


def axis_position(dist) -> Callable[[Any], float]:
    """Where a parameter value goes on an x axis: categorical choices at 0, 1, ... (named by ticks), numbers at themselves."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices).index
    return float


def train_val_section(cfg: DictConfig, study: optuna.Study, finished: list[FrozenTrial], metric: MetricSpec, path: Path, title: str) -> Section:
    """Validation against training error of every finished trial; overfit trials (user_attr overfit) flagged."""
    heading = SECTIONS["train_val"]
    trials = [t for t in finished if _number(t.user_attrs.get(metric.train_key))]
    if not trials:
        return Section(heading, [], note=f"No finished trial recorded {metric.train_key}.")
    train = np.array([t.user_attrs[metric.train_key] for t in trials])
    val = np.array([primary(t) for t in trials])
    overfit = np.array([bool(t.user_attrs.get("overfit")) for t in trials])
    fig, ax = plt.subplots(figsize=(5.8, 5.2))
    ax.scatter(train[~overfit], val[~overfit], s=24, label="finished trial")
    ax.scatter(train[overfit], val[overfit], s=40, marker="x", color="tab:red", label=f"overfit (val/train > {cfg.overfit_ratio})")
    best = best_trial(study)
    if any(t.number == best.number for t in trials):
        ax.plot([best.user_attrs[metric.train_key]], [primary(best)], "kD", ms=10, mfc="none", label=f"best (trial {best.number})")
    span = np.array([min(train.min(), val.min()), max(train.max(), val.max())])
    ax.plot(span, span, "k--", lw=1, label="validation = training")
    ax.plot(span, cfg.overfit_ratio * span, ":", color="tab:red", lw=1, label=f"validation = {cfg.overfit_ratio} x training")
    if np.all(span > 0):
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"training {metric.axis_label}")
    ax.set_ylabel(f"validation {metric.axis_label}")
    ax.legend(fontsize=7)
    return Section(heading, [save_figure(fig, path, title)])


def best_trial_section(cfg: DictConfig, best: FrozenTrial) -> Section:
    """The best trial's own figures (its parity plot), found in its working directory."""
    heading = f"{SECTIONS['best']} (trial {best.number})"
    workdir = best.user_attrs.get("workdir")
    found = []
    if workdir and Path(workdir).is_dir():
        for pattern in cfg.report.best_trial_figures:
            found += sorted(Path(workdir).glob(str(pattern)))
    note = "" if found else f"No figure matching {list(cfg.report.best_trial_figures)} in the trial's working directory {workdir}."
    return Section(heading, found, note=note)


def generalisation_section(cfg: DictConfig, study: optuna.Study, metric: MetricSpec, tracker: Tracker) -> Section:
    """The promoted trial (else the best) and the hand-tuned default side by side: the validation split's
    value, the mean over ``study.cv_folds`` folds of training + validation (when the study cross-validated)
    and the test error recorded by the study's latest promotion (the test split is read by promote only)."""
    heading = SECTIONS["generalisation"]
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.run_type = 'promote' and tags.study = '{study.study_name}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    promoted = runs[0] if runs and runs[0].data.tags.get("trial", "").isdigit() else None
    test_key = "test_" + metric.name
    by_number = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    rows = []
    if promoted is not None and int(promoted.data.tags["trial"]) in by_number:
        rows.append(("promoted", by_number[int(promoted.data.tags["trial"])], promoted.data.metrics.get(test_key)))
    else:
        rows.append(("best", best_trial(study), None))
    default = default_trial(study)
    if default is not None:
        rows.append(("hand-tuned default", default, promoted.data.metrics.get("default_" + test_key) if promoted else None))
    unit = f" ({metric.unit})" if metric.unit else ""
    header = ["model", "trial", f"validation split{unit}", f"cross-validation mean ± std{unit}", f"test{unit}"]
    body = []
    for label, trial, test in rows:
        folds = trial.user_attrs.get("cv_folds")
        split = trial.user_attrs.get(f"split_{metric.val_key}", primary(trial)) if folds else primary(trial)
        cv = f"{format_value(primary(trial))} ± {format_value(trial.user_attrs.get(f'cv_std_{metric.val_key}'))} ({int(folds)} folds)" if folds else "not run (study.cv_folds=1)"
        cells = [label, trial.number, format_value(split), cv, format_value(test) if test is not None else "not promoted yet"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    note = "" if promoted else "No promotion of this study yet: test errors are recorded by promote."
    return Section(heading, [], note=note, table_html=f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>")


# ---------------------------------------------------------------------------------------------------------
# Table and page
# ---------------------------------------------------------------------------------------------------------


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def top_trials_table(cfg: DictConfig, study: optuna.Study, metric: MetricSpec) -> str:
    """The ``report.top_n`` best finished trials: value, training error, their ratio, flags and parameters."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(finished, key=primary, reverse=not minimizing(study))[: cfg.report.top_n]
    params = sorted({name for trial in ranked for name in trial.params})
    header = ["trial", f"validation {metric.label} ({metric.unit})", f"training {metric.label} ({metric.unit})",
              "ratio val/train", "overfit", "default", *params]
    rows = []
    for trial in ranked:
        train = trial.user_attrs.get(metric.train_key)
        ratio = primary(trial) / train if _number(train) and train > 0 else None
        cells = [trial.number, primary(trial), train, ratio, bool(trial.user_attrs.get("overfit")),
                 bool(trial.user_attrs.get("is_default")), *(fitted(trial, p) for p in params)]
        rows.append("<tr>" + "".join(f"<td>{html.escape(format_value(c))}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"


def embed_png(path: Path) -> str:
    """An <img> whose source is the PNG itself, so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">'


STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
img { max-width: 100%; display: block; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: right; }
th { background: #eee; }
.note { color: #555; font-style: italic; }
"""


def render_page(
    cfg: DictConfig, study: optuna.Study, finished: list[FrozenTrial], metric: MetricSpec, data_description: str, sections: list[Section]
) -> str:
    """The whole page as one string: summary, then each section with its embedded figures."""
    trials = study.get_trials(deepcopy=False)
    best, default = best_trial(study), default_trial(study)
    summary = [
        f"storage: {redact(cfg.study.storage)}",
        f"model: {cfg.model.kind}; {data_description}",
        f"objective: {cfg.study.metric} ({metric.unit}), {study.directions[0].name.lower()}",
        f"trials: {len(finished)} finished, {sum(t.state == TrialState.FAIL for t in trials)} failed, {len(trials)} in all; "
        f"{sum(bool(t.user_attrs.get('overfit')) for t in finished)} flagged overfit",
        f"best: {primary(best):.5g} {metric.unit} (trial {best.number})",
    ]
    if default is not None:
        gain = (primary(default) - primary(best)) / primary(default) if primary(default) else float("nan")
        summary.append(f"default: {primary(default):.5g} {metric.unit} (trial {default.number}); gain over the default {100 * gain:.1f}%")
    summary.append(f"written {time.strftime('%Y-%m-%d %H:%M:%S')} by hpo report")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Study report: {html.escape(study.study_name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Study report: {html.escape(study.study_name)}</h1>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary) + "</ul>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        parts += [embed_png(path) for path in section.figures]
        if section.table_html:
            parts.append(section.table_html)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
