"""One trial: parameters in, a fitted model, its metrics and its MLflow record out.

``score`` fits and evaluates one model config through its kind (used by ``fit``, curves and every
trial), on nested subsets first when the study has fidelity rungs; ``Objective`` wraps it for
Optuna: it samples the parameters, opens the trial's child run, logs everything in one batch and
turns any failure into a recorded reason instead of a lost trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import shutil
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import optuna

from hpo import liveness, peak_memory
from hpo.safe_files import write_text
from hpo.data import Datasets, joined_frames, subset_frames
from hpo.disk import full_disk_text, no_space_left
from hpo.models import kind
from hpo.models.base import MemoryBudgetExceeded, OverBudget, Scored, TrialFailure, failure_reason, with_values
from hpo.search.fidelity import rung_sizes
from hpo.search.scoring import fit_and_score
from hpo.search.space import SearchParam, suggest
from hpo.search.storage import write_liveness
from hpo.tracking import NOTE_TAG, Tracker

# Called after each fidelity rung with (training-set size, what the rung scored); True stops the trial.
RungReport = Callable[[int, Scored], bool]
# Called by a fit after each step of its own fidelity (``ModelKind.fidelity``, e.g. an epoch) with the step and
# its validation metrics; raises ``StepPruned`` to stop the fit there.
StepReport = Callable[[int, dict[str, float]], None]


class RungPruned(optuna.TrialPruned):
    """The pruner stopped the trial after a fidelity rung; ``scored`` is that rung's result."""

    reason = "pruned"

    def __init__(self, size: int, scored: Scored):
        super().__init__(f"pruned after the rung of {size} training frames")
        self.size = size
        self.scored = scored


class StepPruned(optuna.TrialPruned):
    """The pruner stopped the fit after step ``step`` of the kind's fidelity (e.g. epoch 2); ``metrics``: that
    step's validation metrics."""

    reason = "pruned"

    def __init__(self, fidelity: str, step: int, metrics: dict[str, float]):
        super().__init__(f"pruned after {fidelity} {step}")
        self.fidelity = fidelity
        self.step = step
        self.metrics = metrics


def score(cfg, model: dict, data: Datasets, workdir: Path, report: RungReport | None = None,
          step_report: StepReport | None = None) -> Scored:
    """Fit ``model`` on the training frames, evaluate it on both sets, write CSVs and a parity plot.

    With several ``study.fidelity_rungs`` the model is first fitted on nested
    random subsets of the training set (rung directories under ``workdir``);
    ``report(size, scored)`` is called after each and returns True to stop the
    trial there (raising ``RungPruned``). The last rung is the whole training set.
    ``step_report`` goes to the fit on the whole training set (kinds with a fidelity of their own; not to the
    cross-validation folds, whose steps are not the trial's).
    """
    model_kind = kind(model["kind"])
    peak_memory.reset()
    sizes = rung_sizes(cfg.study.fidelity_rungs, len(data.train))
    if len(sizes) > 1:
        model_kind.preflight(model, data.train.frames)  # before the small rungs spend time on a doomed trial
    order = np.random.default_rng(cfg.study.seed).permutation(len(data.train))
    for size in sizes[:-1]:
        rung_dir = workdir / f"rung_{size:04d}"
        subset = subset_frames(data.train, np.sort(order[:size]), rung_dir / "train_subset.xyz")
        partial = fit_and_score(cfg, model_kind, model, dataclasses.replace(data, train=subset), rung_dir)
        if report is not None and report(size, partial):
            raise RungPruned(size, partial)
    scored = fit_and_score(cfg, model_kind, model, data, workdir, step_report)
    if cfg.study.cv_folds > 1:
        scored = cross_validated(cfg, model_kind, model, data, workdir, scored)
    if report is not None and len(sizes) > 1:
        report(sizes[-1], scored)
    # this process's peak over the whole trial (a fitting program run as a child process is not in it)
    return dataclasses.replace(scored, metrics={**scored.metrics, "peak_rss_gb": peak_memory.peak_bytes() / 1e9})


def cross_validated(cfg, model_kind, model: dict, data: Datasets, workdir: Path, scored: Scored) -> Scored:
    """``scored`` (the fit on the training set, whose model is kept) with every validation metric replaced by
    its mean over ``study.cv_folds`` folds of the training + validation frames (the test set stays out).

    The split's own value stays as ``split_val_*``, the spread over folds as ``cv_std_val_*``. Cheap with
    the numpy GAP solver: every fold reuses the cached descriptors of its frames.
    """
    k = int(cfg.study.cv_folds)
    pool = joined_frames([data.train, data.val], workdir / "cv" / "pool.xyz")
    order = np.random.default_rng(cfg.study.seed).permutation(len(pool))
    folds = np.array_split(order, k)
    per_fold = []
    for index, fold in enumerate(folds):
        fold_dir = workdir / "cv" / f"fold_{index}"
        rest = np.sort(np.setdiff1d(order, fold))
        # replace, not a new Datasets: the folds keep the data's own property keys and e0
        split = dataclasses.replace(
            data, train=subset_frames(pool, rest, fold_dir / "train.xyz"), val=subset_frames(pool, np.sort(fold), fold_dir / "val.xyz")
        )
        fold_scored = fit_and_score(cfg, model_kind, model, split, fold_dir)
        per_fold.append(fold_scored.metrics)
        # only the fold's numbers are kept (its CSVs and plots stay): a fold's model and frame copies
        # (39 MB per fold for the workshop's SA-GPR) would make a 20-trial study's folder 4.6 GB. A file's
        # companions go with it (gap_fit writes gap.xml.sparseX.* beside gap.xml).
        for path in [*fold_scored.model_files, fold_dir / "train.xyz", fold_dir / "val.xyz"]:
            for found in Path(path).parent.glob(glob.escape(Path(path).name) + "*"):
                if found.is_dir():
                    shutil.rmtree(found)
                else:
                    found.unlink()
    found = dict(scored.metrics)
    for key in [k_ for k_ in found if k_.startswith("val_")]:
        values = [m[key] for m in per_fold if key in m]
        if len(values) == k:
            found[f"split_{key}"] = found[key]
            found[key] = float(np.mean(values))
            found[f"cv_std_{key}"] = float(np.std(values))
    found["cv_folds"] = k
    return Scored(found, scored.params, scored.tags, scored.artifacts, scored.model_files)


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM from a scheduler, Ctrl-C) ends the trial and the study; ``signal_name`` says which."""

    def __init__(self, signal_name: str):
        super().__init__(f"signal {signal_name}")
        self.signal_name = signal_name


# What quippy's Fortran wrappers (f90wrap) raise, as a RuntimeError, when Ctrl-C arrives inside a call.
FORTRAN_INTERRUPT = "Interrupt occured"


def as_interrupt(exc: BaseException) -> BaseException:
    """``exc``, or ``Interrupted`` when it is Ctrl-C caught inside quippy's Fortran: a RuntimeError would
    fail one trial and let the study go on, where the user asked it to stop."""
    if isinstance(exc, RuntimeError) and str(exc).startswith(FORTRAN_INTERRUPT):
        return Interrupted("SIGINT")
    return exc


def classify(exc: BaseException) -> str:
    """The failure reason recorded for an exception that ended a fit."""
    if no_space_left(exc):
        return "disk_full"
    if isinstance(exc, TrialFailure):
        return exc.reason
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, (ValueError, TypeError)):
        return "invalid_params"
    if isinstance(exc, MemoryError):
        return "memory_budget"
    return "error"


class Objective:
    """The Optuna objective: one call = one trial = one nested MLflow run.

    The run ends FINISHED, KILLED (pruned, interrupted) or FAILED through ``Tracker.run``; the
    branches below only record why.
    """

    def __init__(self, cfg, model: dict, space: list[SearchParam], data: Datasets, tracker: Tracker, parent_run_id: str, workroot: Path):
        self.cfg = cfg
        self.model = model
        self.space = space
        self.data = data
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.workroot = workroot
        self.model_kind = kind(model["kind"])
        # Set when a trial failed for a full disk: every next trial would too, so the loop stops with this.
        self.disk_full: str | None = None

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        write_liveness(trial)  # first: a RUNNING trial without a record after study.grace_s never started
        values = suggest(trial, self.space)
        model = with_values(self.model, values)
        workdir = self.workroot / f"trial_{trial.number:04d}"
        tags = {"trial_number": trial.number, "study": trial.study.study_name, "state": "RUNNING", "run_type": "trial", **liveness.record()}
        with self.tracker.run(f"trial-{trial.number}", tags=tags, parent_run_id=self.parent_run_id) as run_id, liveness.beating(
            lambda: self.beat(trial, run_id), self.cfg.study.heartbeat_s
        ):
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("workdir", str(workdir))
            self.tracker.log_datasets(run_id, {"training": self.data.train, "validation": self.data.val})

            def report(size: int, rung: Scored) -> bool:
                """Tell Optuna the rung's metric (step = training frames) and keep its metrics in MLflow's history."""
                trial.report(metric_value(rung.metrics, self.cfg.study.metric), step=size)
                self.tracker.log(run_id, metrics={**rung.metrics, "train_size": size}, step=size)
                return trial.should_prune()

            reached = [0]  # the last step a fit of the kind's own fidelity reported

            def report_step(step: int, found: dict[str, float]) -> None:
                """A step of the kind's own fidelity (e.g. an epoch): its metrics into MLflow's history (step = the
                step) and, when they hold the study's metric, into Optuna as the intermediate value at that step."""
                reached[0] = step
                self.tracker.log(run_id, metrics=found, step=step)
                if self.cfg.study.metric in found:
                    trial.report(float(found[self.cfg.study.metric]), step=step)
                    if trial.should_prune():
                        raise StepPruned(self.model_kind.fidelity, step, found)

            try:
                scored = score(self.cfg, model, self.data, workdir, report, report_step)
            except StepPruned as exc:
                trial.set_user_attr(f"pruned_at_{exc.fidelity}", exc.step)
                trial.set_user_attr(self.cfg.study.metric, metric_value(exc.metrics, self.cfg.study.metric))
                self.tracker.log(run_id, params=values, tags={"state": "PRUNED", f"pruned_at_{exc.fidelity}": exc.step})
                self.tracker.log_artifacts(run_id, self.model_kind.failure_artifacts(workdir))
                raise
            except RungPruned as exc:
                trial.set_user_attr("pruned_at_size", exc.size)
                trial.set_user_attr(self.cfg.study.metric, metric_value(exc.scored.metrics, self.cfg.study.metric))
                self.tracker.log(run_id, params=exc.scored.params, tags={**exc.scored.tags, "state": "PRUNED", "pruned_at_size": exc.size})
                self.tracker.log_artifacts(run_id, exc.scored.artifacts)
                raise
            except OverBudget as exc:
                trial.set_user_attr("failure", failure_reason(exc.reason))
                trial.set_user_attr("failure_message", str(exc))
                if isinstance(exc, MemoryBudgetExceeded):
                    trial.set_user_attr("memory_estimate_bytes", exc.estimate_bytes)
                self.tracker.log(
                    run_id,
                    params=values,
                    metrics=exc.metrics,
                    tags={"state": "PRUNED", "failure": exc.reason, "failure_message": str(exc)},
                )
                raise
            except BaseException as raised:
                exc = as_interrupt(raised)
                reason = failure_reason(classify(exc))
                if reason == "disk_full":
                    self.disk_full = f"trial {trial.number}: {full_disk_text(exc, self.workroot)}"
                    exc = TrialFailure("disk_full", f"{self.disk_full}: {exc}")
                trial.set_user_attr("failure", reason)
                trial.set_user_attr("failure_message", str(exc)[-2000:])
                with contextlib.suppress(OSError):  # the disk may be full: the record goes to Optuna and MLflow anyway
                    write_text(workdir / "failure.txt", "".join(traceback.format_exception(raised)))
                note = f"Trial {trial.number} of study {trial.study.study_name} failed ({reason}): {str(exc)[-1000:]}"
                self.tracker.log(run_id, params=values, tags={"state": "FAIL", "failure": reason, "failure_message": str(exc)[-5000:], NOTE_TAG: note})
                self.tracker.log_artifacts(run_id, [*self.model_kind.failure_artifacts(workdir), workdir / "failure.txt"])
                if exc is not raised and reason != "disk_full":
                    raise exc from raised
                raise
            objectives = [metric_value(scored.metrics, name) for name in self.cfg.study.objectives]
            metric = self.cfg.study.metric
            # with study.cv_folds the split's own value and the spread over folds, for reports beside the CV mean
            for key in (*self.cfg.study.objectives, *self.model_kind.trial_metrics, f"split_{metric}", f"cv_std_{metric}", "cv_folds"):
                if key in scored.metrics:
                    trial.set_user_attr(key, scored.metrics[key])
            trial.set_user_attr("overfit", scored.tags.get("overfit") == "true")
            # values the fit used where they differ from the sampled ones (ModelKind.capped_params)
            effective = {k: scored.params[k] for k in values if k in scored.params and scored.params[k] != values[k]}
            if effective:
                trial.set_user_attr("effective_params", effective)
            trial.set_user_attr("model_files", [str(p) for p in scored.model_files])
            note = trial_note(self.cfg, self.model_kind, trial.number, trial.study.study_name, scored, values)
            # at the last step reported (0 without a fidelity of the kind's own): the history ends with the model's figures
            self.tracker.log(run_id, params=scored.params, metrics=scored.metrics, tags={**scored.tags, "state": "COMPLETE", NOTE_TAG: note},
                             step=reached[0])
            self.tracker.log_artifacts(run_id, scored.artifacts)
        return objectives[0] if len(objectives) == 1 else tuple(objectives)

    def beat(self, trial: optuna.Trial, run_id: str) -> None:
        """Show life on the trial (with the peak memory a later invocation reports if this process is
        killed), its run and the study run."""
        write_liveness(trial)
        self.tracker.beat(run_id, self.parent_run_id)


def trial_note(cfg, model_kind, number: int, study_name: str, scored: Scored, values: dict) -> str:
    """The run's description in the MLflow UI: the trial's key metrics with units, then its parameters."""
    found = scored.metrics
    lines = [f"Trial {number} of study {study_name} ({len(values)} sampled parameters)."]
    for spec in cfg.figures.metrics:
        val, train = found.get(f"val_{spec.name}"), found.get(f"train_{spec.name}")
        if val is None:
            continue
        line = f"- validation {spec.label}: {val:.4g} {spec.unit}"
        if train is not None:
            line += f" (training {train:.4g} {spec.unit}" + (f", ratio {val / train:.2f}" if train else "") + ")"
        lines.append(line)
    if scored.tags.get("overfit") == "true":
        lines.append(f"- flagged overfit: validation/training above {cfg.overfit_ratio}")
    if "val_energy_rmse_per_atom" in found:
        lines.append(f"- validation energy RMSE per atom: {1000 * found['val_energy_rmse_per_atom']:.3g} meV/atom")
    for key, label, unit in (("fit_time_s", "fit time", "s"), ("md_ms_per_atom", "MD cost", "ms per atom per step")):
        if key in found:
            lines.append(f"- {label}: {found[key]:.3g} {unit}")
    for name in model_kind.capped_params:
        effective, requested = scored.params.get(name), scored.params.get(f"{name}_requested")
        if requested is not None and effective != requested:
            lines.append(f"- {name}: {effective} as fitted ({requested} requested; capped by {model_kind.display_name})")
    if values:
        lines.append("- parameters: " + ", ".join(f"{k}={_short(v)}" for k, v in values.items()))
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metric_value(metrics_: dict, key: str) -> float:
    value = metrics_.get(key)
    if value is None:
        raise KeyError(f"study.metric={key!r} is not a metric of this model; available: {sorted(metrics_)}")
    return float(np.asarray(value))

