"""The study loop behind ``python -m hpo optimize``: workers, heartbeats, progress and the summary.

Running the same command again resumes the study: ``study.n_trials`` counts finished trials over
all invocations, never attempts. Trial 0 is the model's default config, so every study shows what
the search gained over it. SIGTERM (what a scheduler sends at its time limit) and Ctrl-C end the
current trial FAILED (reason ``interrupted``), close its MLflow run and the parent's, and exit with
128 + the signal (hpo.cli says so in one paragraph).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing
import os
import platform
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from hpo import config as hpo_config
from hpo import liveness, plots
from hpo.disk import disk_report, full_disk_text, no_space_left
from hpo.data import load_datasets
from hpo.data.check_command import preflight
from hpo.mlflow_ui import save_trials_view
from hpo.models import kind
from hpo.models.base import failure_reason
from hpo.progress import format_value, quiet
from hpo.redact import redact, redact_text, silence_run_urls
from hpo.search import study_record
from hpo.search.objective import Interrupted, Objective
from hpo.search.selection import best_trial, count, count_finished, default_trial, failure_verdict, primary
from hpo.search.space import default_values, outside_space, search_space
from hpo.search.optuna_private import heartbeat_enabled
from hpo.search.storage import StudyError, fail_dead_trials, fail_unstarted_trials, open_study, storage_of, study_lock
from hpo.tracking import Tracker, provenance_tags


@contextlib.contextmanager
def sigterm_interrupts():
    """Turn SIGTERM into ``Interrupted`` in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Progress:
    """Prints one line per ended trial: its value or failure, the count and the best so far."""

    def __init__(self, study_cfg, unit: str, heartbeat=None):
        self.study_cfg = study_cfg
        self.unit = f" {unit}" if unit else ""
        self.heartbeat = heartbeat
        self.started = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.heartbeat is not None:
            self.heartbeat()
        if trial.state == TrialState.COMPLETE:
            outcome = ", ".join(f"{v:.5g}" for v in trial.values) + self.unit
        elif "pruned_at_size" in trial.user_attrs:
            outcome = f"PRUNED after {trial.user_attrs['pruned_at_size']} frames ({trial.user_attrs.get(self.study_cfg.metric, float('nan')):.5g})"
        elif any(key.startswith("pruned_at_") for key in trial.user_attrs):  # a step of the kind's own fidelity
            key = next(key for key in trial.user_attrs if key.startswith("pruned_at_"))
            outcome = f"PRUNED after {key.removeprefix('pruned_at_')} {trial.user_attrs[key]} ({trial.user_attrs.get(self.study_cfg.metric, float('nan')):.5g})"
        else:
            outcome = f"{trial.state.name} ({trial.user_attrs.get('failure', 'error')})"
        if count(study, TrialState.COMPLETE):
            best_ = best_trial(study)
            best = f"{primary(best_):.5g}{self.unit} (trial {best_.number})"
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
    silence_run_urls()
    space = search_space(cfg)
    data = load_datasets(cfg)  # refuses unreadable, non-finite, leaking or uncovered data, naming file and frame
    model = hpo_config.model_params(cfg)  # after the data: parameters set to auto come from them
    hpo_config.check_data(cfg, data)
    checks = preflight(cfg)  # the data health checks (duplicates, outliers, forces), before any fit
    # both stores reachable before either is written to: a refused run leaves no empty study or experiment
    probe_database(str(cfg.study.storage), "study.storage")
    probe_database(str(cfg.tracking.tracking_uri), "tracking.tracking_uri")
    study = open_study(cfg, space, n_train=len(data.train))
    study_record.record(study, cfg)  # model kind and data: report, promote and curves read them back
    tracker = open_tracker(cfg)
    close_dead_invocations(study, tracker, cfg.study.grace_s)
    view = save_trials_view(tracker, cfg, [p.name for p in space], kind(cfg.model.kind).capped_params)
    print(f"[hpo] trials in MLflow: mlflow ui --backend-store-uri {redact(tracker.tracking_uri)} ; open {view}", flush=True)
    n_workers = cfg.study.n_workers
    tags = {
            **liveness.record(),
            **provenance_tags(),
            **data.hashes,
            "study": cfg.study.name,
            "storage": redact(cfg.study.storage),
            "run_type": "study",
            "sampler": cfg.study.sampler,
            "seed": cfg.study.seed,
            "model_kind": model["kind"],
            "threads": cfg.threads,
            "n_workers": n_workers,
            **checks,
    }
    with sigterm_interrupts(), study_run(tracker, cfg, tags) as (parent, joined):
        run_study(cfg, study, tracker, parent, data, model, space, joined)
    print(disk_report(cfg), flush=True)
    return study


@contextlib.contextmanager
def study_run(tracker: Tracker, cfg, tags: dict):
    """The study's MLflow parent run, shared by every invocation that works on the study at the same time (the
    jobs of a SLURM array, commands started by hand on one storage): the first opens it, the others join it
    (their trials nest under it); each lists itself in a ``job.<host>.<pid>`` tag, and the last to leave ends
    the run. Yields (run id, joined). An invocation that starts after the run ended opens a new one, as a
    resumed study does."""
    me = {"host": platform.node(), "pid": os.getpid(), "pid_start": liveness.process_start(os.getpid())}
    key = f"job.{me['host']}.{me['pid']}"
    with study_lock(str(cfg.study.storage), str(cfg.study.name)):  # two jobs starting together open one run
        run_id = running_study_run(tracker, str(cfg.study.name), cfg.study.grace_s)
        joined = run_id is not None
        if not joined:
            run_id = tracker.start_run(f"optimize-{cfg.study.name}", tags)
        tracker.log(run_id, tags={key: json.dumps({**me, "state": "running"})})
    if joined:
        print(f"[hpo] joining the study's MLflow run {run_id}, opened by another invocation that is still running", flush=True)
    status = "FINISHED"
    try:
        yield run_id, joined
    except (optuna.TrialPruned, KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(study_lock(str(cfg.study.storage), str(cfg.study.name)))
            except Exception:  # a study server that went down (the error on its way out says so): leave unlocked
                pass
            tracker.log(run_id, tags={key: json.dumps({**me, "state": status.lower()})})
            if not other_jobs_running(tracker, run_id, key, cfg.study.grace_s):
                tracker.end_run(run_id, status)


def running_study_run(tracker: Tracker, study_name: str, grace_s: float) -> str | None:
    """The RUNNING parent run of ``study_name`` whose process is alive (``hpo.liveness``), if any."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], "attributes.status = 'RUNNING' and tags.run_type = 'study'", max_results=1000
    )
    for run in runs:
        found = liveness.parse(run.data.tags)
        if run.data.tags.get("study") == study_name and found is not None and not liveness.gone(found, grace_s):
            return run.info.run_id
    return None


def other_jobs_running(tracker: Tracker, run_id: str, key: str, grace_s: float) -> bool:
    """Whether another job listed on the study run is still running: its state, and its process alive (the
    run's heartbeat, which every job's trials refresh, stands in for each job's on other hosts)."""
    tags = tracker.client.get_run(run_id).data.tags
    heartbeat = float(tags.get("heartbeat", 0) or 0)
    for name, value in tags.items():
        if not name.startswith("job.") or name == key:
            continue
        job = json.loads(value)
        if job.get("state") != "running":
            continue
        if not liveness.gone(liveness.Liveness(job["host"], int(job["pid"]), job.get("pid_start"), heartbeat), grace_s):
            return True
    return False


def open_tracker(cfg) -> Tracker:
    """The MLflow tracker of ``cfg``; a store that cannot be opened is a one-paragraph error without its password."""
    uri = str(cfg.tracking.tracking_uri)
    probe_database(uri, "tracking.tracking_uri")
    try:
        return Tracker(cfg.tracking)
    except Exception as exc:
        raise StudyError(
            f"tracking.tracking_uri={redact(uri)!r} cannot be opened: {redact_text(str(exc), uri)}"
        ) from None


def probe_database(uri: str, key: str) -> None:
    """Connect once to a database server URI (not SQLite, not an MLflow server): MLflow retries a failed
    connection 10 times with growing pauses (about 100 s) and hpo's Tracker 5 times over, so an
    unreachable database would take minutes to say so."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from hpo.search.storage import driver_module, install_hint

    scheme = uri.split(":", 1)[0].lower()
    if "://" not in uri or scheme.startswith(("sqlite", "http", "file", "databricks")):
        return
    try:
        engine = create_engine(uri, poolclass=NullPool)
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as exc:
        module = exc.name or driver_module(uri)
        raise StudyError(f"{key}={redact(uri)!r} needs a database driver that is not installed ({module}): {install_hint(uri, module)}") from None
    except Exception as exc:
        raise StudyError(f"{key}={redact(uri)!r} cannot be opened: {redact_text(str(exc), uri)}") from None


def close_dead_invocations(study: optuna.Study, tracker: Tracker, grace_s: float, signals: dict[int, str] | None = None) -> list[str]:
    """Close what processes of this study that died without ending it (SIGKILL, OOM killer, lost node)
    left open: their RUNNING trials FAIL with the reason, their trial and study runs KILLED. Judged by
    the liveness records, not by heartbeat age alone (``hpo.liveness``); ``signals``: pid -> the signal
    that ended it, where known. Returns the run ids closed."""
    failed = fail_dead_trials(study, grace_s, signals)
    reasons = {t.user_attrs["mlflow_run_id"]: reason for t, reason in failed if "mlflow_run_id" in t.user_attrs}
    for trial, reason in failed:
        print(f"[hpo] trial {trial.number} of a process that is gone: FAIL ({reason})", flush=True)
    closed = tracker.close_dead_runs(study.study_name, grace_s, reasons)
    if closed:
        print(f"[hpo] closed {len(closed)} MLflow run(s) of processes that are gone as KILLED: {', '.join(closed)}", flush=True)
    return closed


def run_study(cfg, study: optuna.Study, tracker: Tracker, parent: str, data, model: dict, space, joined: bool = False) -> None:
    """Everything ``run`` does inside the parent run: enqueue the default, run the workers, summarise.
    ``joined``: the run was opened by another invocation, which logged the config (MLflow params are write-once)."""
    n_workers = cfg.study.n_workers
    if not joined:
        tracker.log_config(parent, cfg)
        tracker.log_datasets(parent, {"training": data.train, "validation": data.val})
        tracker.log(parent, params={"study.n_trials": cfg.study.n_trials, "dataset.train_size": cfg.dataset.train_size, "study.metric": cfg.study.metric})
    if cfg.study.enqueue_default:
        defaults = default_values(model, space)
        study.enqueue_trial(defaults, user_attrs={"is_default": True}, skip_if_exists=True)
        outside = outside_space(defaults, space)
        if outside:
            print(f"[hpo] the hand-tuned default trial has {', '.join(outside)}: fitted as given, never proposed by the sampler", flush=True)

    remaining = cfg.study.n_trials - count_finished(study)
    print(
        f"[hpo] study {cfg.study.name!r} in {redact(cfg.study.storage)}: {count_finished(study)} finished, "
        f"{max(remaining, 0)} to go with {n_workers} worker(s); {len(data.train)} training / {len(data.val)} validation frames",
        flush=True,
    )
    try:
        if remaining > 0 and n_workers == 1:
            optimize(cfg, parent, data)
        elif remaining > 0:
            spawn = multiprocessing.get_context("spawn")
            container = OmegaConf.to_container(cfg, resolve=True)
            first = cfg.worker * n_workers  # worker numbers for the logs; draws are seeded per trial
            workers = [
                spawn.Process(target=_worker, args=(container, parent, first + i), name=f"hpo-worker-{first + i}")
                for i in range(n_workers)
            ]
            for worker in workers:
                worker.start()
            watch_workers(workers, study, tracker, cfg.study.grace_s)
    finally:
        close_orphan_runs(study, tracker)
        if count(study, TrialState.COMPLETE):
            summarise(study, tracker, parent, cfg)
    if failure_verdict(study, cfg.study):
        tracker.log(parent, tags={"failure": failure_reason("failure_rate")})
        raise StudyError(failure_verdict(study, cfg.study))


def watch_workers(workers: list, study: optuna.Study, tracker: Tracker, grace_s: float) -> None:
    """Wait for the worker processes; one ended by a signal (the OOM killer's SIGKILL) has its trial
    failed at once with that signal as the reason, while the other workers go on with the study."""
    from multiprocessing.connection import wait

    pending = {worker.sentinel: worker for worker in workers}
    while pending:
        try:
            ended = wait(list(pending))
        except KeyboardInterrupt:
            stop_workers(list(pending.values()))
            raise
        for sentinel in ended:
            worker = pending.pop(sentinel)
            worker.join()
            if worker.exitcode is not None and worker.exitcode < 0:
                name = signal.Signals(-worker.exitcode).name
                print(f"[hpo] {worker.name} (pid {worker.pid}) was killed by {name}; {len(pending)} worker(s) go on", flush=True)
                close_dead_invocations(study, tracker, grace_s, {worker.pid: name})


def stop_workers(workers: list) -> None:
    """SIGTERM to the workers still running when this process is interrupted (a signal to this process
    alone): each ends its trial FAIL interrupted instead of going on under a study run that has ended."""
    for worker in workers:
        if worker.is_alive():
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                os.kill(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.join()


def threads_per_worker(cfg) -> int:
    """``threads`` is the machine's budget: divide it among the workers."""
    return max(1, cfg.threads // cfg.study.n_workers)


def optimize(cfg, parent_run_id: str, data=None) -> None:
    """One worker's loop: run trials until the study holds ``n_trials`` finished ones.

    Before each trial the worker counts finished and running trials, so that
    several workers together stop at exactly ``n_trials`` finished ones; a
    running trial may still fail, so while others run the worker waits rather
    than leaves. Trials of dead workers are failed first (liveness records in
    every storage, and Optuna's heartbeats in RDB storages).
    """
    cfg = OmegaConf.merge(cfg, {"threads": threads_per_worker(cfg)})
    space = search_space(cfg, quiet=True)  # named once, by run()
    data = data if data is not None else load_datasets(cfg)
    model = hpo_config.model_params(cfg)  # after the data: parameters set to auto come from them
    study = open_study(cfg, space, n_train=len(data.train))
    tracker = Tracker(cfg.tracking)
    workroot = hpo_config.output_path(cfg.experiments_dir) / cfg.study.name
    objective = Objective(cfg, model, space, data, tracker, parent_run_id, workroot)
    progress = Progress(cfg.study, metric_unit(cfg), heartbeat=lambda: tracker.beat(parent_run_id))
    heartbeats = heartbeat_enabled(storage_of(study))  # Optuna's, RDB storages only; hpo's liveness records cover every storage
    deadline = time.monotonic() + (cfg.study.timeout_s or float("inf"))
    while time.monotonic() < deadline and not failure_verdict(study, cfg.study):
        refused = count_refused(study)
        if refused >= cfg.study.max_refused_trials:
            last = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))[-1].user_attrs.get("failure_message", "")
            raise StudyError(
                f"{refused} trials were refused before any fit (study.max_refused_trials={cfg.study.max_refused_trials}); "
                f"the search space or budgets leave nothing to fit. Last: {last}"
            )
        fail_dead_trials(study, cfg.study.grace_s)
        if heartbeats:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)
        fail_unstarted_trials(study, cfg.study.grace_s)
        # The study's lock is held from the count until this worker's trial is RUNNING (the objective's first
        # step lets it go): otherwise two invocations counting at once both start the last trial.
        with contextlib.ExitStack() as claim:
            claim.enter_context(study_lock(str(cfg.study.storage), str(cfg.study.name)))
            done, running = count_finished(study), count(study, TrialState.RUNNING)
            if done >= cfg.study.n_trials:
                break
            if done + running >= cfg.study.n_trials:
                claim.close()
                time.sleep(1.0)
                continue
            try:
                study.optimize(claimed(objective, claim), n_trials=1, catch=(Exception,), callbacks=[progress])
            except Exception as exc:  # outside a trial (the study's database): the disk is the one fault named here
                if not no_space_left(exc):
                    raise
                raise StudyError(_disk_full_advice(full_disk_text(exc, workroot))) from None
        if objective.disk_full:
            raise StudyError(_disk_full_advice(objective.disk_full))


def claimed(objective: Callable[[optuna.Trial], float], claim: contextlib.ExitStack) -> Callable[[optuna.Trial], float]:
    """``objective``, releasing ``claim`` (the study's lock) as soon as the trial it runs exists."""

    def run_claimed(trial: optuna.Trial) -> float:
        claim.close()
        return objective(trial)

    return run_claimed


def _disk_full_advice(where: str) -> str:
    return (f"{where}. The study stopped: every next trial would fail the same way; its database keeps what was done. "
            "Free space there (or set root= / experiments_dir= elsewhere) and run the same command: the study resumes.")


def count_refused(study: optuna.Study) -> int:
    """Trials pruned before any fit (over the memory budget): they cost nothing, but a study made only
    of them would loop for ever."""
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return sum(1 for t in pruned if not t.intermediate_values)


def metric_unit(cfg) -> str:
    """The unit of the study's metric, from the figures config (e.g. "eV per cell")."""
    for spec in cfg.figures.metrics:
        if f"val_{spec.name}" == cfg.study.metric:
            return str(spec.unit)
    return ""


def _worker(container: dict, parent_run_id: str, index: int) -> None:
    """Entry point of a worker process (module level, so ``spawn`` can import it)."""
    cfg = OmegaConf.create(container)
    quiet(bool(cfg.get("verbose", False)))  # a spawned process starts with Optuna's INFO lines on
    print(f"[hpo] worker {index} started (pid {os.getpid()}, {threads_per_worker(cfg)} thread(s))", flush=True)
    try:
        with sigterm_interrupts():
            optimize(cfg, parent_run_id)
    except KeyboardInterrupt as exc:  # the trial is recorded; the invoking process says it in one paragraph
        raise SystemExit(128 + signal.Signals[getattr(exc, "signal_name", "SIGINT")].value) from None


def close_orphan_runs(study: optuna.Study, tracker: Tracker) -> None:
    """Trials of a killed worker end FAIL in Optuna; end their MLflow runs as KILLED, not RUNNING forever."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        run = tracker.client.get_run(run_id)
        if run.info.status == "RUNNING":
            tracker.log(run_id, tags={"state": "FAIL", "failure": failure_reason(trial.user_attrs.get("failure", "killed"))})
            tracker.end_run(run_id, "KILLED")


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
    lines.append(f"  {'parameter':<24}{'best':>20}{'default':>20}")
    for name in best.params:
        lines.append(f"  {name:<24}{fitted(best, name):>20}{fitted(default, name):>20}")
    lines.append(f"  {'validation metric':<24}{format_value(primary(best)):>20}{format_value(primary(default) if default else None):>20}")
    if any("effective_params" in t.user_attrs for t in (best, default) if t is not None):
        capped = ", ".join(kind(cfg.model.kind).capped_params)
        lines.append(f"  (x <- y: fitted with x, y sampled; {kind(cfg.model.kind).display_name} caps {capped})")
    if default is not None and primary(default):
        gain = (primary(default) - primary(best)) / primary(default)
        summary.update(default_value=primary(default), gain=gain)
        lines.append(f"  gain over the default: {100 * gain:.1f}% (trial {best.number} vs trial {default.number})")
    if len(study.directions) > 1:
        front = sorted(study.best_trials, key=primary)
        summary["n_pareto"] = len(front)
        names = list(cfg.study.objectives)
        lines.append(f"  Pareto front ({len(front)} trials): " + ", ".join(names))
        lines += [f"    trial {t.number:<5}" + "".join(f"{format_value(v):>14}" for v in t.values) for t in front]
        path = hpo_config.output_path(cfg.experiments_dir) / study.study_name / "pareto_front.png"
        title = f"{kind(cfg.model.kind).display_name} study {study.study_name}: accuracy vs cost ({cfg.dataset.train_size} training frames)"
        tracker.log_artifacts(parent_run_id, [plots.pareto_plot(path, study, names, title)])
    print("\n".join(lines), flush=True)
    tracker.log(parent_run_id, metrics={k: v for k, v in summary.items()}, tags={"best_trial": best.number})
    log_best_model(best, tracker)
    return summary


def fitted(trial, name: str) -> str:
    """A trial's parameter as fitted, with the sampled value when the fit used another (``ModelKind.capped_params``)."""
    if trial is None or name not in trial.params:
        return "-"
    effective = trial.user_attrs.get("effective_params", {})
    if name in effective:
        return f"{format_value(effective[name])} <- {format_value(trial.params[name])}"
    return format_value(trial.params[name])


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

