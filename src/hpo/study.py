"""The Optuna study behind ``python -m hpo optimize``.

Studies live in a database (SQLite by default), so running the same command
again resumes the study: ``study.n_trials`` counts finished trials over all
invocations, never attempts. Trial 0 is the model's default config, so every
study shows what the search gained over it.
"""

from __future__ import annotations

import gzip
import shutil
import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hpo import config as hpo_config
from hpo.config import SearchParam
from hpo.data import load_datasets
from hpo.objective import Objective, default_values
from hpo.tracking import Tracker, provenance_tags

HEARTBEAT_S = 30
GRACE_S = 90


class StudyError(RuntimeError):
    """The study cannot go on (storage, search space, failure rate)."""


def make_storage(url: str):
    """An Optuna storage for ``study.storage``; a trial whose worker died is failed after ``GRACE_S``."""
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url.removeprefix("journal:")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # Heartbeats are marked experimental since Optuna 2.8; they are how a killed worker's trial gets failed.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except Exception as exc:
        raise StudyError(
            f"study.storage={url!r} cannot be opened: {exc}. Use sqlite:///path/to/file.db, "
            "journal:/path/to/file.log, or an SQLAlchemy URL such as postgresql://user@host/db."
        ) from exc


def make_sampler(cfg, space: list[SearchParam]) -> optuna.samplers.BaseSampler:
    study = cfg.study
    if study.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=study.seed)
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=study.seed)
    grid = {}
    for param in space:
        if param.type == "categorical":
            grid[param.name] = list(param.choices)
        elif param.type == "int":
            grid[param.name] = sorted({int(round(v)) for v in _grid_points(param, study.grid_points)})
        else:
            grid[param.name] = list(_grid_points(param, study.grid_points))
    return optuna.samplers.GridSampler(grid, seed=study.seed)


def _grid_points(param: SearchParam, n: int):
    import numpy as np

    if param.log:
        return np.geomspace(param.low, param.high, n).tolist()
    return np.linspace(param.low, param.high, n).tolist()


def distribution(param: SearchParam):
    if param.type == "float":
        return FloatDistribution(param.low, param.high, log=param.log)
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), log=param.log)
    return CategoricalDistribution(list(param.choices))


def check_space_matches(study: optuna.Study, space: list[SearchParam]) -> None:
    """Optuna refuses a changed distribution deep inside a trial; say which one changed, up front."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not finished:
        return
    recorded = finished[-1].distributions
    for param in space:
        old = recorded.get(param.name)
        new = distribution(param)
        if old is not None and type(old) is not type(new):
            raise StudyError(
                f"study {study.study_name!r} already sampled {param.name} as {old}, the config now asks for {new}. "
                "Optuna cannot change a parameter's kind inside a study: give a new study.name=... "
                "(or delete the old study) to search this space."
            )


def open_study(cfg, space: list[SearchParam]) -> optuna.Study:
    storage = make_storage(str(cfg.study.storage))
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=cfg.study.name,
            sampler=make_sampler(cfg, space),
            direction=cfg.study.direction,
            load_if_exists=True,
        )
    except Exception as exc:
        raise StudyError(f"study.storage={cfg.study.storage!r} cannot be opened: {exc}") from exc
    check_space_matches(study, space)
    return study


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


class Progress:
    """Prints one line per finished trial and stops the study when too many fail."""

    def __init__(self, n_trials: int, max_failure_rate: float, min_trials: int):
        self.n_trials = n_trials
        self.max_failure_rate = max_failure_rate
        self.min_trials = min_trials
        self.started = time.perf_counter()
        self.aborted: str | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = count(study, TrialState.COMPLETE)
        failed = count(study, TrialState.FAIL)
        if trial.state == TrialState.COMPLETE:
            outcome = f"{trial.value:.5g}"
        else:
            outcome = f"{trial.state.name} ({trial.user_attrs.get('failure', 'error')})"
        try:
            best = f"{study.best_value:.5g} (trial {study.best_trial.number})"
        except ValueError:
            best = "none yet"
        elapsed = time.perf_counter() - self.started
        print(
            f"[hpo] trial {trial.number}: {outcome} | finished {done}/{self.n_trials}, failed {failed} | "
            f"best {best} | {elapsed:.0f} s",
            flush=True,
        )
        attempts = done + failed
        if attempts >= self.min_trials and failed / attempts > self.max_failure_rate:
            self.aborted = (
                f"{failed} of {attempts} trials failed (study.max_failure_rate={self.max_failure_rate}); "
                f"last failure: {trial.user_attrs.get('failure_message', '?')[-500:]}"
            )
            study.stop()


def run(cfg) -> optuna.Study:
    """Resume or start the study of ``cfg`` until it holds ``study.n_trials`` finished trials."""
    hpo_config.validate(cfg)
    space = hpo_config.search_space(cfg)
    model = hpo_config.model_params(cfg)
    data = load_datasets(cfg)
    study = open_study(cfg, space)
    tracker = Tracker(cfg.tracking)
    workroot = hpo_config.output_path(cfg.experiments_dir) / cfg.study.name

    parent = tracker.start_run(
        f"optimize-{cfg.study.name}",
        tags={
            **provenance_tags(),
            **data.hashes,
            "study": cfg.study.name,
            "storage": cfg.study.storage,
            "sampler": cfg.study.sampler,
            "seed": cfg.study.seed,
            "model_kind": model["kind"],
            "threads": cfg.threads,
        },
    )
    tracker.log_config(parent, cfg)
    tracker.log(parent, params={"study.n_trials": cfg.study.n_trials, "dataset.train_size": cfg.dataset.train_size, "study.metric": cfg.study.metric})
    if cfg.study.enqueue_default:
        study.enqueue_trial(default_values(model, space), user_attrs={"is_default": True}, skip_if_exists=True)

    remaining = cfg.study.n_trials - count(study, TrialState.COMPLETE)
    print(
        f"[hpo] study {cfg.study.name!r} in {cfg.study.storage}: {count(study, TrialState.COMPLETE)} finished, "
        f"{max(remaining, 0)} to go; {len(data.train)} training / {len(data.val)} validation frames",
        flush=True,
    )
    progress = Progress(cfg.study.n_trials, cfg.study.max_failure_rate, cfg.study.min_trials_for_failure_rate)
    status = "FINISHED"
    try:
        if remaining > 0:
            study.optimize(
                Objective(cfg, model, space, data, tracker, parent, workroot),
                timeout=cfg.study.timeout_s,
                catch=(Exception,),
                callbacks=[optuna.study.MaxTrialsCallback(cfg.study.n_trials, states=(TrialState.COMPLETE,)), progress],
            )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        close_orphan_runs(study, tracker)
        if count(study, TrialState.COMPLETE):
            summarise(study, tracker, parent)
        tracker.end_run(parent, status if not progress.aborted else "FAILED")
    if progress.aborted:
        raise StudyError(progress.aborted)
    return study


def close_orphan_runs(study: optuna.Study, tracker: Tracker) -> None:
    """Trials of a killed worker end FAIL in Optuna; end their MLflow runs as KILLED, not RUNNING forever."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        run = tracker.client.get_run(run_id)
        if run.info.status == "RUNNING":
            tracker.log(run_id, tags={"state": "FAIL", "failure": "killed"})
            tracker.end_run(run_id, "KILLED")


def default_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("is_default"):
            return trial
    return None


def summarise(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> dict:
    """Print best vs default, log them on the parent run, and keep the best model (compressed)."""
    best = study.best_trial
    default = default_trial(study)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    overfit = sum(bool(t.user_attrs.get("overfit")) for t in finished)
    summary = {"best_value": best.value, "best_trial": best.number, "n_finished": len(finished), "n_overfit": overfit}
    lines = [f"[hpo] study {study.study_name!r}: {len(finished)} finished trials, {overfit} flagged overfit"]
    lines.append(f"  {'parameter':<24}{'best':>14}{'default':>14}")
    for name, value in best.params.items():
        base = default.params.get(name) if default else None
        lines.append(f"  {name:<24}{_fmt(value):>14}{_fmt(base):>14}")
    lines.append(f"  {'validation metric':<24}{_fmt(best.value):>14}{_fmt(default.value if default else None):>14}")
    if default is not None and default.value:
        gain = (default.value - best.value) / default.value
        summary.update(default_value=default.value, gain=gain)
        lines.append(f"  gain over the default: {100 * gain:.1f}% (trial {best.number} vs trial {default.number})")
    print("\n".join(lines), flush=True)
    tracker.log(parent_run_id, metrics={k: v for k, v in summary.items()}, tags={"best_trial": best.number})
    log_best_model(best, tracker)
    return summary


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def log_best_model(best: optuna.trial.FrozenTrial, tracker: Tracker) -> None:
    """Models are large (17 MB of XML at 200 frames): only the best one goes to MLflow, gzipped."""
    run_id = best.user_attrs.get("mlflow_run_id")
    files = [Path(p) for p in best.user_attrs.get("model_files", [])]
    if not run_id or not files or tracker.client.get_run(run_id).data.tags.get("model_logged") == "true":
        return
    for path in files:
        if path.is_file():
            packed = path.with_name(path.name + ".gz")
            with open(path, "rb") as source, gzip.open(packed, "wb") as target:
                shutil.copyfileobj(source, target)
            tracker.log_artifacts(run_id, [packed], "model")
    tracker.log(run_id, tags={"model_logged": "true"})

