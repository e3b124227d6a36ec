"""One trial: parameters in, a fitted model, its metrics and its MLflow record out.

``score`` fits and evaluates one model config (used by ``fit`` and by every
trial); ``Objective`` wraps it for Optuna: it samples the parameters, opens the
trial's child run, logs everything in one batch and turns any failure into a
recorded reason instead of a lost trial.
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna

from hpo import gap, metrics, plots
from hpo.atomic import write_text
from hpo.config import ConfigError, SearchParam, check_model, get_dotted, set_dotted
from hpo.data import Datasets
from hpo.tracking import Tracker, flatten

FAILURE_REASONS = ("gap_fit_error", "timeout", "missing_model", "memory_budget", "nan_metric", "invalid_params", "error")


def check_trial_params(model: dict) -> None:
    """The sampled parameters must be as valid as the config's (gap_fit exits 0 on some that are not)."""
    try:
        check_model(model)
    except ConfigError as exc:
        raise TrialFailure("invalid_params", str(exc)) from exc


class MemoryBudgetExceeded(optuna.TrialPruned):
    """Refused before the fit: the estimated peak memory is over budget (pruned, not failed)."""

    reason = "memory_budget"

    def __init__(self, message: str, estimate_bytes: int):
        super().__init__(message)
        self.estimate_bytes = estimate_bytes


class TrialFailure(RuntimeError):
    """A trial that cannot produce a metric, with a reason from ``FAILURE_REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Scored:
    """What one fit produced: metrics, flags and the files worth keeping."""

    metrics: dict[str, float]
    params: dict[str, object]
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    model_files: list[Path] = field(default_factory=list)


def suggest(trial: optuna.Trial, space: list[SearchParam]) -> dict[str, object]:
    """Sample every dimension of the search space; names are dotted model paths."""
    values = {}
    for param in space:
        if param.type == "float":
            values[param.name] = trial.suggest_float(param.name, param.low, param.high, log=param.log, step=param.step)
        elif param.type == "int":
            step = int(param.step or 1)
            values[param.name] = trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log, step=step)
        else:
            values[param.name] = trial.suggest_categorical(param.name, list(param.choices))
    return values


def with_values(model: dict, values: dict[str, object]) -> dict:
    """The model config with the sampled values put in; everything else keeps its default."""
    merged = copy.deepcopy(model)
    for name, value in values.items():
        set_dotted(merged, name, value)
    return merged


def default_values(model: dict, space: list[SearchParam]) -> dict[str, object]:
    return {param.name: get_dotted(model, param.name) for param in space}


def score(cfg, model: dict, data: Datasets, workdir: Path) -> Scored:
    """Fit ``model`` on the training frames, evaluate it on both sets, write CSVs and a parity plot."""
    if model["kind"] == "gap":
        return score_gap(cfg, model, data, workdir)
    from hpo.sagpr_trial import score_sagpr  # SA-GPR needs featomic; GAP runs need not import it

    return score_sagpr(cfg, model, data, workdir)


def score_gap(cfg, model: dict, data: Datasets, workdir: Path) -> Scored:
    model = copy.deepcopy(model)
    requested = model["n_sparse"]
    model["n_sparse"] = gap.effective_n_sparse(requested, data.train.frames)
    check_trial_params(model)
    estimate = gap.covariance_memory_bytes(model["n_sparse"], data.train.frames)
    if estimate > model["memory_budget_gb"] * 1e9:
        raise MemoryBudgetExceeded(
            f"gap_fit would need about {estimate / 1e9:.1f} GB for its covariance matrices "
            f"(n_sparse={model['n_sparse']}, {len(data.train)} frames), over model.memory_budget_gb={model['memory_budget_gb']}",
            estimate,
        )
    fitted = gap.fit(model, data.train.path, workdir, dict(cfg.dataset.e0), cfg.dataset.property_keys, cfg.threads, cfg.study.seed)

    start = time.perf_counter()
    potential = gap.load(fitted.model_file)  # one parse of the XML for both sets
    found, predicted = {}, {}
    for name, frames in (("train", data.train), ("val", data.val)):
        energies, forces = gap.predict(potential, frames.frames)
        found.update(
            metrics.energy_force_metrics(name, frames.energies, energies, frames.n_atoms, frames.forces, forces)
        )
        write_text(
            workdir / f"{'validation' if name == 'val' else 'train'}_errors.csv",
            "true_energy_eV,predicted_energy_eV\n"
            + "".join(f"{t:.10f},{p:.10f}\n" for t, p in zip(frames.energies, energies)),
        )
        predicted[name] = energies
    eval_time = time.perf_counter() - start
    train_pred, val_pred = predicted["train"], predicted["val"]

    nan = [k for k, v in found.items() if not math.isfinite(v)]
    if nan:
        raise TrialFailure("nan_metric", f"non-finite metrics {nan} (the fit diverged)")
    flags = {}
    for quantity in ("energy", "force"):
        gap_, ratio, flags[quantity] = metrics.overfitting(
            found[f"train_{quantity}_rmse"], found[f"val_{quantity}_rmse"], cfg.overfit_ratio
        )
        found[f"{quantity}_rmse_gap"], found[f"{quantity}_rmse_ratio"] = gap_, ratio
    found.update(fit_time_s=fitted.fit_time_s, eval_time_s=eval_time)

    title = f"GAP, {data.train.path.name} ({len(data.train)}) / {data.val.path.name} ({len(data.val)})"
    parity = plots.parity_plot(
        workdir / "parity_energy.png",
        {"train": (data.train.energies, train_pred), "validation": (data.val.energies, val_pred)},
        "energy",
        "eV",
        title,
    )
    return Scored(
        metrics=found,
        params={**flatten(model), "n_sparse_requested": requested, "threads": cfg.threads},
        tags={"overfit": str(flags["energy"]).lower(), "overfit_force": str(flags["force"]).lower(), "gap_fit_command": fitted.command_line},
        artifacts=[workdir / "gap_fit.cmd", workdir / "gap_fit.out", workdir / "gap_fit.err", workdir / "train_errors.csv", workdir / "validation_errors.csv", parity],
        model_files=[fitted.model_file],
    )


def classify(exc: BaseException) -> str:
    if isinstance(exc, (TrialFailure, gap.GapFitError)):
        return exc.reason
    if isinstance(exc, (ValueError, TypeError)):
        return "invalid_params"
    if isinstance(exc, MemoryError):
        return "memory_budget"
    return "error"


class Objective:
    """The Optuna objective: one call = one trial = one nested MLflow run."""

    def __init__(
        self,
        cfg,
        model: dict,
        space: list[SearchParam],
        data: Datasets,
        tracker: Tracker,
        parent_run_id: str,
        workroot: Path,
    ):
        self.cfg = cfg
        self.model = model
        self.space = space
        self.data = data
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.workroot = workroot

    def __call__(self, trial: optuna.Trial) -> float:
        values = suggest(trial, self.space)
        model = with_values(self.model, values)
        workdir = self.workroot / f"trial_{trial.number:04d}"
        run_id = self.tracker.start_run(
            f"trial-{trial.number}",
            tags={"trial_number": trial.number, "study": trial.study.study_name, "state": "RUNNING"},
            parent_run_id=self.parent_run_id,
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("workdir", str(workdir))
        try:
            scored = score(self.cfg, model, self.data, workdir)
        except MemoryBudgetExceeded as exc:
            trial.set_user_attr("failure", exc.reason)
            trial.set_user_attr("failure_message", str(exc))
            trial.set_user_attr("memory_estimate_bytes", exc.estimate_bytes)
            self.tracker.log(
                run_id,
                params=values,
                metrics={"memory_estimate_gb": exc.estimate_bytes / 1e9},
                tags={"state": "PRUNED", "failure": exc.reason, "failure_message": str(exc)},
            )
            self.tracker.end_run(run_id, "KILLED")
            raise
        except Exception as exc:
            reason = classify(exc)
            trial.set_user_attr("failure", reason)
            trial.set_user_attr("failure_message", str(exc)[-2000:])
            write_text(workdir / "failure.txt", "".join(traceback.format_exception(exc)))
            self.tracker.log(
                run_id,
                params=values,
                tags={"state": "FAIL", "failure": reason, "failure_message": str(exc)[-5000:]},
            )
            self.tracker.log_artifacts(run_id, [workdir / "gap_fit.err", workdir / "gap_fit.out", workdir / "failure.txt"])
            self.tracker.end_run(run_id, "FAILED")
            raise
        value = metric_value(scored.metrics, self.cfg.study.metric)
        for key in (self.cfg.study.metric, "train_energy_rmse", "val_energy_rmse", "energy_rmse_ratio", "val_rmse", "train_rmse", "rmse_ratio"):
            if key in scored.metrics:
                trial.set_user_attr(key, scored.metrics[key])
        trial.set_user_attr("overfit", scored.tags.get("overfit") == "true")
        trial.set_user_attr("model_files", [str(p) for p in scored.model_files])
        self.tracker.log(run_id, params=scored.params, metrics=scored.metrics, tags={**scored.tags, "state": "COMPLETE"})
        self.tracker.log_artifacts(run_id, scored.artifacts)
        self.tracker.end_run(run_id, "FINISHED")
        return float(value)


def metric_value(metrics_: dict, key: str) -> float:
    value = metrics_.get(key)
    if value is None:
        raise KeyError(f"study.metric={key!r} is not a metric of this model; available: {sorted(metrics_)}")
    return float(np.asarray(value))
