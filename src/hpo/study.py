"""The Optuna study behind ``python -m hpo optimize``.

Studies live in a database (SQLite by default), so running the same command
again resumes the study: ``study.n_trials`` counts finished trials over all
invocations, never attempts. Trial 0 is the model's default config, so every
study shows what the search gained over it.
"""

from __future__ import annotations

import datetime
import gzip
import shutil
import multiprocessing
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import is_heartbeat_enabled
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hpo import config as hpo_config
from hpo import plots
from hpo.atomic import creation_lock
from hpo.config import SearchParam
from hpo.data import load_datasets
from hpo.objective import Objective, default_values, rung_sizes
from hpo.tracking import Tracker, provenance_tags

CREATE_ATTEMPTS = 5
# What a storage says when another process is creating the same tables or study right now.
CREATION_RACE_SIGNS = ("already exists", "unique constraint", "duplicate", "database is locked")


class StudyError(RuntimeError):
    """The study cannot go on (storage, search space, failure rate)."""


def make_storage(url: str, heartbeat_s: int = 30, grace_s: int = 90):
    """An Optuna storage for ``study.storage``.

    A trial whose worker died stops sending heartbeats; after ``grace_s`` the
    next worker marks it failed and re-enqueues its parameters once.
    """
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
                # several worker processes write to one SQLite file: wait for the lock instead of failing
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except Exception as exc:
        raise StudyError(
            f"study.storage={url!r} cannot be opened: {exc}. Use sqlite:///path/to/file.db, "
            "journal:/path/to/file.log, or an SQLAlchemy URL such as postgresql://user@host/db."
        ) from exc


def make_sampler(cfg, space: list[SearchParam], worker: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; worker ``i`` of a parallel study draws from seed ``study.seed + i``,
    so workers sharing a study do not suggest the same parameters."""
    study = cfg.study
    seed = study.seed + worker
    if study.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=study.tpe.n_startup_trials, multivariate=study.tpe.multivariate
        )
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {}
    for param in space:
        if param.type == "categorical":
            grid[param.name] = list(param.choices)
        elif param.type == "int":
            grid[param.name] = sorted({int(round(v)) for v in _grid_points(param, study.grid_points)})
        else:
            grid[param.name] = list(_grid_points(param, study.grid_points))
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(cfg, n_train: int) -> optuna.pruners.BasePruner:
    """The configured pruner; its resource is the number of training frames of a fidelity rung."""
    study = cfg.study
    if study.pruner == "none":
        return optuna.pruners.NopPruner()
    sizes = rung_sizes(study.fidelity_rungs, n_train)
    if study.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=sizes[0], reduction_factor=int(study.reduction_factor))
    return optuna.pruners.HyperbandPruner(min_resource=sizes[0], max_resource=sizes[-1], reduction_factor=int(study.reduction_factor))


def _grid_points(param: SearchParam, n: int):
    import numpy as np

    if param.log:
        return np.geomspace(param.low, param.high, n).tolist()
    return np.linspace(param.low, param.high, n).tolist()


def distribution(param: SearchParam):
    if param.type == "float":
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=int(param.step or 1))
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


def open_study(cfg, space: list[SearchParam], worker: int = 0, n_train: int | None = None) -> optuna.Study:
    """Create or resume the study of ``cfg``; ``n_train`` (training frames) sizes the pruner's rungs."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with creation_lock(str(cfg.study.storage)):
                storage = make_storage(str(cfg.study.storage), cfg.study.heartbeat_s, cfg.study.grace_s)
                study = optuna.create_study(
                    storage=storage,
                    study_name=cfg.study.name,
                    sampler=make_sampler(cfg, space, worker),
                    pruner=make_pruner(cfg, n_train or int(cfg.dataset.train_size)),
                    directions=directions(cfg),
                    load_if_exists=True,
                )
            break
        except Exception as exc:
            # Invocations on other machines (server storages) race to create the same tables or study;
            # the loser retries.
            racing = any(sign in str(exc).lower() for sign in CREATION_RACE_SIGNS)
            if attempt == CREATE_ATTEMPTS - 1 or not racing:
                raise StudyError(f"study.storage={cfg.study.storage!r} cannot be opened: {exc}") from exc
            time.sleep(1.0 + attempt)
    check_space_matches(study, space)
    return study


def load_study(storage_url: str, study_name: str) -> optuna.Study:
    """Load a study that must exist; the error lists the studies the storage does hold."""
    storage = make_storage(storage_url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
        raise StudyError(f"no study named {study_name!r} in {storage_url}; it holds {names or 'no studies'}") from None


def directions(cfg) -> list[str]:
    """``study.direction`` for the first objective (the validation metric); costs are minimised."""
    return [cfg.study.direction] + ["minimize"] * (len(cfg.study.objectives) - 1)


def primary(trial: optuna.trial.FrozenTrial) -> float:
    """The trial's validation metric: its only value, or the first of a multi-objective study."""
    return trial.values[0]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial with the best validation metric (in a multi-objective study: the front's most accurate)."""
    if len(study.directions) == 1:
        return study.best_trial
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    return min(study.best_trials, key=lambda t: sign * primary(t))


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``study.n_trials``: complete ones and those a pruner stopped after a rung.

    Trials pruned before any fit (over the memory budget) cost nothing and do not count.
    """
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return count(study, TrialState.COMPLETE) + sum(1 for t in pruned if t.intermediate_values)


class Progress:
    """Prints one line per ended trial: its value or failure, the count and the best so far."""

    def __init__(self, study_cfg):
        self.study_cfg = study_cfg
        self.started = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE:
            outcome = ", ".join(f"{v:.5g}" for v in trial.values)
        elif "pruned_at_size" in trial.user_attrs:
            outcome = f"PRUNED after {trial.user_attrs['pruned_at_size']} frames ({trial.user_attrs.get(self.study_cfg.metric, float('nan')):.5g})"
        else:
            outcome = f"{trial.state.name} ({trial.user_attrs.get('failure', 'error')})"
        if count(study, TrialState.COMPLETE):
            best_ = best_trial(study)
            best = f"{primary(best_):.5g} (trial {best_.number})"
        else:
            best = "none yet"
        print(
            f"[hpo] trial {trial.number}: {outcome} | finished {count_finished(study)}/{self.study_cfg.n_trials}, "
            f"failed {count(study, TrialState.FAIL)} | best {best} | {time.perf_counter() - self.started:.0f} s",
            flush=True,
        )


def run(cfg) -> optuna.Study:
    """Resume or start the study of ``cfg`` until it holds ``study.n_trials`` finished trials.

    With ``study.n_workers`` > 1 the trials run in that many processes (quippy
    holds the GIL, so threads would not help), all sharing the one storage and
    the one MLflow parent run created here before any worker starts: concurrent
    first creation of the databases races.
    """
    hpo_config.validate(cfg)
    space = hpo_config.search_space(cfg)
    model = hpo_config.model_params(cfg)
    data = load_datasets(cfg)
    study = open_study(cfg, space, n_train=len(data.train))
    tracker = Tracker(cfg.tracking)
    n_workers = cfg.study.n_workers
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
            "n_workers": n_workers,
        },
    )
    tracker.log_config(parent, cfg)
    tracker.log(parent, params={"study.n_trials": cfg.study.n_trials, "dataset.train_size": cfg.dataset.train_size, "study.metric": cfg.study.metric})
    if cfg.study.enqueue_default:
        study.enqueue_trial(default_values(model, space), user_attrs={"is_default": True}, skip_if_exists=True)

    remaining = cfg.study.n_trials - count_finished(study)
    print(
        f"[hpo] study {cfg.study.name!r} in {cfg.study.storage}: {count_finished(study)} finished, "
        f"{max(remaining, 0)} to go with {n_workers} worker(s); {len(data.train)} training / {len(data.val)} validation frames",
        flush=True,
    )
    status = "FINISHED"
    try:
        if remaining > 0 and n_workers == 1:
            optimize(cfg, parent, data, worker=cfg.worker * n_workers)
        elif remaining > 0:
            spawn = multiprocessing.get_context("spawn")
            container = OmegaConf.to_container(cfg, resolve=True)
            first = cfg.worker * n_workers  # a distinct sampler seed for every worker of every invocation
            workers = [
                spawn.Process(target=_worker, args=(container, parent, first + i), name=f"hpo-worker-{first + i}")
                for i in range(n_workers)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        close_orphan_runs(study, tracker)
        verdict = failure_verdict(study, cfg.study)
        if count(study, TrialState.COMPLETE):
            summarise(study, tracker, parent, cfg)
        tracker.end_run(parent, "FAILED" if verdict else status)
    if verdict:
        raise StudyError(verdict)
    return study


def storage_of(study: optuna.Study):
    return study._storage  # Optuna exposes no public accessor; needed for the heartbeat check


def threads_per_worker(cfg) -> int:
    """``threads`` is the machine's budget: divide it among the workers."""
    return max(1, cfg.threads // cfg.study.n_workers)


def optimize(cfg, parent_run_id: str, data=None, worker: int = 0) -> None:
    """One worker's loop: run trials until the study holds ``n_trials`` finished ones.

    Before each trial the worker counts finished and running trials, so that
    several workers together stop at exactly ``n_trials`` finished ones; a
    running trial may still fail, so while others run the worker waits rather
    than leaves. Trials of dead workers are failed first (heartbeats).
    """
    cfg = OmegaConf.merge(cfg, {"threads": threads_per_worker(cfg)})
    space = hpo_config.search_space(cfg)
    model = hpo_config.model_params(cfg)
    data = data if data is not None else load_datasets(cfg)
    study = open_study(cfg, space, worker, n_train=len(data.train))
    tracker = Tracker(cfg.tracking)
    workroot = hpo_config.output_path(cfg.experiments_dir) / cfg.study.name
    objective = Objective(cfg, model, space, data, tracker, parent_run_id, workroot)
    progress = Progress(cfg.study)
    # Journal storage has no heartbeats: a killed worker's trial there stays RUNNING and is not waited for.
    heartbeats = is_heartbeat_enabled(storage_of(study))
    deadline = time.monotonic() + (cfg.study.timeout_s or float("inf"))
    while time.monotonic() < deadline and not failure_verdict(study, cfg.study):
        if heartbeats:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)
            fail_unstarted_trials(study, cfg.study.grace_s)
        done, running = count_finished(study), count(study, TrialState.RUNNING)
        if done >= cfg.study.n_trials or (done + running >= cfg.study.n_trials and not heartbeats):
            break
        if done + running >= cfg.study.n_trials:
            time.sleep(1.0)
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[progress])


def fail_unstarted_trials(study: optuna.Study, grace_s: float) -> None:
    """Fail RUNNING trials whose worker died before the objective started.

    Optuna only fails trials that have sent a heartbeat; a worker killed between
    creating a trial and its first heartbeat leaves it RUNNING forever. The
    objective's first act is to set ``mlflow_run_id``, after the heartbeat
    thread has started, so a trial without it after ``grace_s`` never ran.
    """
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if "mlflow_run_id" not in trial.user_attrs and started and (now - started).total_seconds() > grace_s:
            storage_of(study).set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _worker(container: dict, parent_run_id: str, index: int) -> None:
    """Entry point of a worker process (module level, so ``spawn`` can import it)."""
    cfg = OmegaConf.create(container)
    print(f"[hpo] worker {index} started (pid {os.getpid()}, {threads_per_worker(cfg)} thread(s))", flush=True)
    optimize(cfg, parent_run_id, worker=index)


def failure_verdict(study: optuna.Study, study_cfg) -> str | None:
    """A message when more than ``max_failure_rate`` of the ended trials failed, else None."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    attempts = len(failed) + count(study, TrialState.COMPLETE)
    if attempts < study_cfg.min_trials_for_failure_rate or len(failed) / attempts <= study_cfg.max_failure_rate:
        return None
    reasons = Counter(t.user_attrs.get("failure", "killed") for t in failed)
    last = failed[-1].user_attrs.get("failure_message", "")[-500:]
    return (
        f"{len(failed)} of {attempts} trials failed (study.max_failure_rate={study_cfg.max_failure_rate}); "
        f"reasons: {dict(reasons)}; last failure: {last}"
    )


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


def cheapest_within(study: optuna.Study, within: float, cost: str) -> optuna.trial.FrozenTrial:
    """The finished trial of lowest ``cost`` (a trial metric) whose validation metric is within
    ``within`` (a fraction) of the best: trade a little accuracy for a cheaper model."""
    best = primary(best_trial(study))
    minimize = study.directions[0] == optuna.study.StudyDirection.MINIMIZE
    bound = best + abs(best) * within if minimize else best - abs(best) * within
    close = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if (primary(t) <= bound if minimize else primary(t) >= bound) and cost in t.user_attrs
    ]
    if not close:
        raise StudyError(f"no finished trial of study {study.study_name!r} records {cost!r}; pick another cost metric")
    return min(close, key=lambda t: (t.user_attrs[cost], primary(t)))


def summarise(study: optuna.Study, tracker: Tracker, parent_run_id: str, cfg) -> dict:
    """Print best vs default, log them on the parent run, and keep the best model (compressed).

    A multi-objective study also gets its Pareto front printed and plotted.
    """
    best = best_trial(study)
    default = default_trial(study)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    overfit = sum(bool(t.user_attrs.get("overfit")) for t in finished)
    summary = {"best_value": primary(best), "best_trial": best.number, "n_finished": len(finished), "n_overfit": overfit}
    lines = [f"[hpo] study {study.study_name!r}: {len(finished)} finished trials, {overfit} flagged overfit"]
    lines.append(f"  {'parameter':<24}{'best':>14}{'default':>14}")
    for name, value in best.params.items():
        base = default.params.get(name) if default else None
        lines.append(f"  {name:<24}{_fmt(value):>14}{_fmt(base):>14}")
    lines.append(f"  {'validation metric':<24}{_fmt(primary(best)):>14}{_fmt(primary(default) if default else None):>14}")
    if default is not None and primary(default):
        gain = (primary(default) - primary(best)) / primary(default)
        summary.update(default_value=primary(default), gain=gain)
        lines.append(f"  gain over the default: {100 * gain:.1f}% (trial {best.number} vs trial {default.number})")
    if len(study.directions) > 1:
        front = sorted(study.best_trials, key=primary)
        summary["n_pareto"] = len(front)
        names = list(cfg.study.objectives)
        lines.append(f"  Pareto front ({len(front)} trials): " + ", ".join(names))
        lines += [f"    trial {t.number:<5}" + "".join(f"{_fmt(v):>14}" for v in t.values) for t in front]
        path = hpo_config.output_path(cfg.experiments_dir) / study.study_name / "pareto_front.png"
        title = f"{plots.MODEL_NAMES[cfg.model.kind]} study {study.study_name}: accuracy vs cost ({cfg.dataset.train_size} training frames)"
        tracker.log_artifacts(parent_run_id, [plots.pareto_plot(path, study, names, title)])
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

