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
from typing import Callable

import numpy as np
import optuna

from hpo import gap, metrics, plots, sparse_gap
from hpo.atomic import write_text
from hpo.cache import Cache
from hpo.config import ConfigError, SearchParam, check_model, get_dotted, set_dotted
from hpo.data import Datasets, subset_frames
from hpo.tracking import Tracker, flatten

# Trial metrics also kept on the Optuna trial (the rest are in MLflow): what reports, promotion
# rules and Pareto fronts read without a tracking server.
TRIAL_ATTR_METRICS = (
    "train_energy_rmse", "val_energy_rmse", "energy_rmse_ratio", "train_rmse", "val_rmse", "rmse_ratio",
    "fit_time_s", "eval_time_s", "md_ms_per_atom",
)
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


# Called after each fidelity rung with (training-set size, what the rung scored); True stops the trial.
RungReport = Callable[[int, Scored], bool]


class RungPruned(optuna.TrialPruned):
    """The pruner stopped the trial after a fidelity rung; ``scored`` is that rung's result."""

    reason = "pruned"

    def __init__(self, size: int, scored: Scored):
        super().__init__(f"pruned after the rung of {size} training frames")
        self.size = size
        self.scored = scored


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


def score(cfg, model: dict, data: Datasets, workdir: Path, report: RungReport | None = None) -> Scored:
    """Fit ``model`` on the training frames, evaluate it on both sets, write CSVs and a parity plot.

    With several ``study.fidelity_rungs`` the model is first fitted on nested
    random subsets of the training set (rung directories under ``workdir``);
    ``report(size, scored)`` is called after each and returns True to stop the
    trial there (raising ``RungPruned``). The last rung is the whole training set.
    """
    sizes = rung_sizes(cfg.study.fidelity_rungs, len(data.train))
    if len(sizes) > 1 and model["kind"] == "gap":
        check_gap_memory(model, data.train.frames)  # before the small rungs spend time on a doomed trial
    order = np.random.default_rng(cfg.study.seed).permutation(len(data.train))
    for size in sizes[:-1]:
        rung_dir = workdir / f"rung_{size:04d}"
        subset = subset_frames(data.train, np.sort(order[:size]), rung_dir / "train_subset.xyz")
        partial = score_model(cfg, model, Datasets(train=subset, val=data.val), rung_dir)
        if report is not None and report(size, partial):
            raise RungPruned(size, partial)
    scored = score_model(cfg, model, data, workdir)
    if report is not None and len(sizes) > 1:
        report(sizes[-1], scored)
    return scored


def rung_sizes(fractions, n_frames: int) -> list[int]:
    """Training-set sizes of the fidelity rungs (at least one frame each, the last all of them)."""
    return sorted({max(1, round(float(f) * n_frames)) for f in fractions})


def score_model(cfg, model: dict, data: Datasets, workdir: Path) -> Scored:
    if model["kind"] == "gap":
        return score_gap(cfg, model, data, workdir)
    from hpo.sagpr_trial import score_sagpr  # SA-GPR needs featomic; GAP runs need not import it

    return score_sagpr(cfg, model, data, workdir)


def check_gap_memory(model: dict, frames) -> None:
    n_sparse = gap.effective_n_sparse(model["n_sparse"], frames)
    estimate = gap.covariance_memory_bytes(n_sparse, frames)
    if estimate > model["memory_budget_gb"] * 1e9:
        raise MemoryBudgetExceeded(
            f"gap_fit would need about {estimate / 1e9:.1f} GB for its covariance matrices "
            f"(n_sparse={n_sparse}, {len(frames)} frames), over model.memory_budget_gb={model['memory_budget_gb']}",
            estimate,
        )


def score_gap(cfg, model: dict, data: Datasets, workdir: Path) -> Scored:
    model = copy.deepcopy(model)
    requested = model["n_sparse"]
    model["n_sparse"] = gap.effective_n_sparse(requested, data.train.frames)
    check_trial_params(model)
    check_gap_memory(model, data.train.frames)
    sets = {"train": data.train, "val": data.val}
    cache = Cache(model["descriptor_cache_dir"])
    environments: dict[tuple[str, str], sparse_gap.Environments] = {}
    # hpo.sparse_gap evaluates energies of dot-product kernels; forces and other kernels go through quippy.
    with_quippy = model["force_metrics"] or model["covariance_type"] != "dot_product"

    def compute_descriptors() -> None:
        if with_quippy:
            return
        for descriptor in gap.expected_descriptors(model, data.train.frames):
            for name, frames in sets.items():
                environments[name, sparse_gap.descriptor_key(descriptor)] = sparse_gap.environments(descriptor, frames.frames, cache)

    start = time.perf_counter()
    fitted = gap.fit(
        model, data.train.path, workdir, dict(cfg.dataset.e0), cfg.dataset.property_keys, cfg.threads, cfg.study.seed,
        while_fitting=compute_descriptors,
    )
    fit_wall = time.perf_counter() - start
    start = time.perf_counter()
    found, predicted = {}, {}
    if with_quippy:
        potential = gap.load(fitted.model_file)  # quippy's calculator: descriptor gradients give forces
        for name, frames in sets.items():
            predicted[name], forces = gap.predict(potential, frames.frames)
            forces = forces if model["force_metrics"] else None
            found.update(metrics.energy_force_metrics(name, frames.energies, predicted[name], frames.n_atoms, frames.forces, forces))
    else:
        fitted_model = sparse_gap.SparseGap.read(fitted.model_file)
        for name, frames in sets.items():
            found_here = {
                d: environments.get((name, sparse_gap.descriptor_key(d))) or sparse_gap.environments(d, frames.frames, cache)
                for d in fitted_model.descriptors
            }
            predicted[name] = fitted_model.energies(frames.frames, found_here)
            found.update(metrics.energy_force_metrics(name, frames.energies, predicted[name], frames.n_atoms))
    for name, frames in sets.items():
        write_text(
            workdir / f"{'validation' if name == 'val' else 'train'}_errors.csv",
            "true_energy_eV,predicted_energy_eV\n"
            + "".join(f"{t:.10f},{p:.10f}\n" for t, p in zip(frames.energies, predicted[name])),
        )
    if model["cost_frames"]:
        found["md_ms_per_atom"] = md_cost_ms_per_atom(fitted.model_file, data.val.frames[: model["cost_frames"]])
    eval_time = time.perf_counter() - start

    nan = [k for k, v in found.items() if not math.isfinite(v)]
    if nan:
        raise TrialFailure("nan_metric", f"non-finite metrics {nan} (the fit diverged)")
    tags = {"gap_fit_command": fitted.command_line}
    for quantity in ("energy", "force"):
        if f"val_{quantity}_rmse" in found:
            gap_, ratio, flag = metrics.overfitting(found[f"train_{quantity}_rmse"], found[f"val_{quantity}_rmse"], cfg.overfit_ratio)
            found[f"{quantity}_rmse_gap"], found[f"{quantity}_rmse_ratio"] = gap_, ratio
            tags["overfit" if quantity == "energy" else "overfit_force"] = str(flag).lower()
    # descriptor_wait_s: how long the trial waited for descriptors after gap_fit had finished.
    found.update(fit_time_s=fitted.fit_time_s, descriptor_wait_s=fit_wall - fitted.fit_time_s, eval_time_s=eval_time)

    title = f"GAP, {data.train.path.name} ({len(data.train)}) / {data.val.path.name} ({len(data.val)})"
    parity = plots.parity_plot(
        workdir / "parity_energy.png",
        {"train": (data.train.energies, predicted["train"]), "validation": (data.val.energies, predicted["val"])},
        "energy",
        "eV",
        title,
    )
    if model["descriptor_cache_dir"]:
        cache.trim(int(model["descriptor_cache_max_gb"] * 1e9))
    return Scored(
        metrics=found,
        params={**flatten(model), "n_sparse_requested": requested, "threads": cfg.threads},
        tags=tags,
        artifacts=[workdir / "gap_fit.cmd", workdir / "gap_fit.out", workdir / "gap_fit.err", workdir / "train_errors.csv", workdir / "validation_errors.csv", parity],
        model_files=[fitted.model_file],
    )


def md_cost_ms_per_atom(model_file: Path, frames) -> float:
    """Milliseconds per atom of one MD step (energies and forces with quippy's calculator), XML parsing excluded."""
    potential = gap.load(model_file)
    gap.predict(potential, frames[:1])  # the first call sets up quippy's buffers
    start = time.perf_counter()
    gap.predict(potential, frames)
    return (time.perf_counter() - start) * 1e3 / sum(len(atoms) for atoms in frames)


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

        def report(size: int, rung: Scored) -> bool:
            """Tell Optuna the rung's metric (step = training frames) and keep its metrics in MLflow's history."""
            trial.report(metric_value(rung.metrics, self.cfg.study.metric), step=size)
            self.tracker.log(run_id, metrics={**rung.metrics, "train_size": size}, step=size)
            return trial.should_prune()

        try:
            scored = score(self.cfg, model, self.data, workdir, report)
        except RungPruned as exc:
            trial.set_user_attr("pruned_at_size", exc.size)
            trial.set_user_attr(self.cfg.study.metric, metric_value(exc.scored.metrics, self.cfg.study.metric))
            self.tracker.log(
                run_id, params=exc.scored.params, tags={**exc.scored.tags, "state": "PRUNED", "pruned_at_size": exc.size}
            )
            self.tracker.log_artifacts(run_id, exc.scored.artifacts)
            self.tracker.end_run(run_id, "KILLED")
            raise
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
        values = [metric_value(scored.metrics, name) for name in self.cfg.study.objectives]
        kept = (*self.cfg.study.objectives, *TRIAL_ATTR_METRICS)
        for key in kept:
            if key in scored.metrics:
                trial.set_user_attr(key, scored.metrics[key])
        trial.set_user_attr("overfit", scored.tags.get("overfit") == "true")
        trial.set_user_attr("model_files", [str(p) for p in scored.model_files])
        self.tracker.log(run_id, params=scored.params, metrics=scored.metrics, tags={**scored.tags, "state": "COMPLETE"})
        self.tracker.log_artifacts(run_id, scored.artifacts)
        self.tracker.end_run(run_id, "FINISHED")
        return values[0] if len(values) == 1 else tuple(values)


def metric_value(metrics_: dict, key: str) -> float:
    value = metrics_.get(key)
    if value is None:
        raise KeyError(f"study.metric={key!r} is not a metric of this model; available: {sorted(metrics_)}")
    return float(np.asarray(value))
