"""Where studies live: Optuna storages, samplers, pruners, and opening (or resuming) a study.

A study persists in ``study.storage`` (SQLite by default, Optuna's JournalStorage for network file
systems, or any SQLAlchemy URL), so running the same command again resumes it. Every trial's draws
are seeded from the study seed and the trial's number, which the storage hands out once: resumed
and concurrent invocations never replay each other's draws, and a study is still reproducible.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hpo import liveness
from hpo.safe_files import creation_lock, sqlite_file
from hpo.models import kind
from hpo.models.base import failure_reason, get_dotted
from hpo.redact import redact, redact_text
from hpo.search.fidelity import rung_sizes
from hpo.search.optuna_private import sampler_rngs, storage_of, trial_id
from hpo.search.space import SearchParam, distribution, grid

CREATE_ATTEMPTS = 5
# What a storage says when another process is creating the same tables or study right now.
CREATION_RACE_SIGNS = ("already exists", "unique constraint", "duplicate", "database is locked")


class StudyError(RuntimeError):
    """The study cannot go on (storage, search space, failure rate)."""


# Pauses between reconnection attempts to a database server: doubling from the first to the last.
RECONNECT_FIRST_WAIT_S = 0.5
RECONNECT_LONGEST_WAIT_S = 8.0
_in_storage_call = threading.local()  # nested storage calls are retried by the outermost only
_outage_lock = threading.Lock()


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: Optuna wraps SQLAlchemy's errors) says the database connection
    is gone, as when the server restarts, rather than that the statement was wrong."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    seen: BaseException | None = exc
    for _ in range(10):  # a cause chain can loop through __context__
        if seen is None:
            return False
        if isinstance(seen, (OperationalError, InterfaceError)) or (isinstance(seen, DBAPIError) and seen.connection_invalidated):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ReconnectingRDBStorage(RDBStorage):
    """Optuna's RDB storage on a database server, surviving the server's restart: a call whose connection
    was lost is repeated with growing pauses for up to ``reconnect_s`` seconds (one line says so while
    waiting, one when the server is back), then the study stops with a StudyError naming the storage."""

    def __init__(self, url: str, reconnect_s: float, **kwargs):
        super().__init__(url, **kwargs)
        self.reconnect_s = reconnect_s
        self.outage_since: float | None = None

    def _reconnecting(self, call: Callable[[], Any]) -> Any:
        if getattr(_in_storage_call, "active", False):
            return call()
        _in_storage_call.active = True
        try:
            return self._retry_while_lost(call)
        finally:
            _in_storage_call.active = False

    def _retry_while_lost(self, call: Callable[[], Any]) -> Any:
        wait = RECONNECT_FIRST_WAIT_S
        deadline = time.monotonic() + self.reconnect_s
        while True:
            try:
                result = call()
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                self._announce_outage(exc)
                if time.monotonic() + wait > deadline:
                    raise StudyError(
                        f"study.storage={redact(self.url)!r} lost its connection and did not come back within "
                        f"study.reconnect_s={self.reconnect_s:g} s: {redact_text(first_line(exc), self.url)}"
                    ) from None
                time.sleep(wait)
                wait = min(2 * wait, RECONNECT_LONGEST_WAIT_S)
                continue
            self._announce_return()
            return result

    def _announce_outage(self, exc: BaseException) -> None:
        with _outage_lock:
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                print(
                    f"[hpo] study.storage {redact(self.url)} lost its connection ({redact_text(first_line(exc), self.url)}); "
                    f"reconnecting for up to {self.reconnect_s:g} s (study.reconnect_s)",
                    flush=True,
                )

    def _announce_return(self) -> None:
        if self.outage_since is None:
            return
        with _outage_lock:
            if self.outage_since is not None:
                print(f"[hpo] study.storage reconnected after {time.monotonic() - self.outage_since:.0f} s", flush=True)
                self.outage_since = None


def first_line(exc: BaseException) -> str:
    """The first line of what the database driver said (the innermost cause), without SQLAlchemy's links."""
    inner = exc
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    text = str(getattr(inner, "orig", None) or inner).strip()
    return text.splitlines()[0] if text else type(inner).__name__


def _reconnecting_method(name: str):
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return self._reconnecting(lambda: method(self, *args, **kwargs))

    return call


# Every method of RDBStorage that talks to the database (Optuna's cache calls some private ones).
for _name, _value in list(vars(RDBStorage).items()):
    if callable(_value) and not _name.startswith("__") and not isinstance(_value, (staticmethod, classmethod)):
        setattr(ReconnectingRDBStorage, _name, _reconnecting_method(_name))


def make_storage(url: str, heartbeat_s: int, grace_s: int, reconnect_s: float = 120):
    """An Optuna storage for ``study.storage``.

    A trial whose worker died stops sending heartbeats; after ``grace_s`` the
    next worker marks it failed. It is not run again: a worker killed without
    warning was most likely killed for memory, and the same parameters would be
    again. Journal storage has no heartbeats: ``fail_dead_trials`` (hpo's own
    liveness record, in every storage) covers it.
    """
    # The directory was checked by hpo.config.validate: it exists, or it is inside experiments_dir.
    database = sqlite_file(url) or (Path(url.removeprefix("journal:")).expanduser() if url.startswith("journal:") else None)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url.removeprefix("journal:")).expanduser()
            return JournalStorage(JournalFileBackend(str(path)))
        with warnings.catch_warnings():
            # Heartbeats are marked experimental since Optuna 2.8; they are how a killed worker's trial gets failed.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if url.startswith("sqlite"):
                return RDBStorage(
                    url,
                    # several worker processes write to one SQLite file: wait for the lock instead of failing
                    engine_kwargs={"connect_args": {"timeout": 60}},
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace_s,
                )
            return ReconnectingRDBStorage(
                url,
                reconnect_s,
                # a pooled connection the server closed (restart) is replaced before use, not failed on
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
            )
    except ImportError as exc:
        # Optuna re-raises a driver's ImportError without its name: the URL names the driver
        module = exc.name or driver_module(url)
        raise StudyError(
            f"study.storage={redact(url)!r} needs a database driver that is not installed ({module}): {install_hint(url, module)}"
        ) from None
    except Exception as exc:
        raise StudyError(
            f"study.storage={redact(url)!r} cannot be opened: {redact_text(str(exc), url)}. Use sqlite:///path/to/file.db, "
            "journal:/path/to/file.log, or an SQLAlchemy URL such as postgresql://user@host/db."
        ) from exc


# Python module of a database driver -> what pip installs it as.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient", "pymysql": "pymysql", "pg8000": "pg8000"}


def driver_module(url: str) -> str | None:
    """The Python module SQLAlchemy loads for ``url`` (``postgresql://`` -> psycopg on SQLAlchemy 2.1, psycopg2 before)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        return {"psycopg2": "psycopg2", "psycopg": "psycopg", "mysqldb": "MySQLdb"}.get(parsed.get_driver_name(), parsed.get_driver_name())
    except Exception:
        return None


def install_hint(url: str, module: str | None) -> str:
    """What to install for the driver ``module`` of a storage URL."""
    if url.startswith("postgresql") and module in (None, "psycopg2", "psycopg"):
        return "pip install 'hpo[postgres]' (psycopg and psycopg2, the drivers of postgresql:// URLs)"
    package = DRIVER_PACKAGES.get(module or "", module)
    extra = " or use a plain postgresql:// URL with pip install 'hpo[postgres]'" if url.startswith("postgresql") else ""
    return f"pip install {package} (the driver this URL names){extra}"


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The seed of one trial's draws: the same study seed and trial number give the same draws."""
    text = f"hpo-trial-seed:{study_seed}:{trial_number}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def trial_seeded(sampler: optuna.samplers.BaseSampler, study_seed: int) -> optuna.samplers.BaseSampler:
    """``sampler`` reseeded before every trial with ``trial_seed(study_seed, trial.number)``."""
    original = sampler.before_trial

    def before_trial(study, trial) -> None:
        seed = trial_seed(study_seed, trial.number)
        for rng in sampler_rngs(sampler):
            rng.rng.seed(seed)
        original(study, trial)

    sampler.before_trial = before_trial
    return sampler


def study_lock(url: str, name: str):
    """Hold a lock that every invocation on study ``name`` in storage ``url`` takes, across processes and, for
    server and journal storages, machines: an flock next to an SQLite database or a journal file (shared file
    systems that honour flock), a PostgreSQL advisory lock on a server. Other servers (MySQL): no lock."""
    import contextlib

    from hpo.safe_files import file_lock as flocked

    @contextlib.contextmanager
    def advisory():
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(url, poolclass=NullPool)
        key = int.from_bytes(hashlib.sha256(f"hpo-study:{name}".encode()).digest()[:8], "big", signed=True)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:
            engine.dispose()

    database = sqlite_file(url)
    if database is not None:
        return flocked(database.with_name(database.name + f".{hashlib.sha256(name.encode()).hexdigest()[:12]}.lock"))
    if url.startswith("journal:"):
        return flocked(Path(url.removeprefix("journal:") + ".hpo-lock").expanduser())
    if url.split(":", 1)[0].split("+", 1)[0] == "postgresql":
        return advisory()
    return contextlib.nullcontext()


def make_sampler(cfg, space: list[SearchParam]) -> optuna.samplers.BaseSampler:
    """The configured sampler, its draws seeded per trial (``trial_seed``)."""
    study = cfg.study
    if study.sampler == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=study.seed, n_startup_trials=study.tpe.n_startup_trials, multivariate=study.tpe.multivariate,
                constant_liar=study.tpe.constant_liar,
            )
    elif study.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=study.seed)
    else:
        sampler = optuna.samplers.GridSampler(grid(space, study.grid_points), seed=study.seed)
    return trial_seeded(sampler, study.seed)


def make_pruner(cfg, n_train: int) -> optuna.pruners.BasePruner:
    """The configured pruner; its resource is the number of training frames of a fidelity rung, or, for a kind
    whose fidelity is a step of its own (``ModelKind.fidelity``), that step: from 1 to the model's budget."""
    study = cfg.study
    if study.pruner == "none":
        return optuna.pruners.NopPruner()
    budget = kind(cfg.model.kind).fidelity_budget
    if budget is not None:
        low, high = 1, int(get_dotted(cfg.model, budget))
    else:
        sizes = rung_sizes(study.fidelity_rungs, n_train)
        low, high = sizes[0], sizes[-1]
    if study.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=low, reduction_factor=int(study.reduction_factor))
    return optuna.pruners.HyperbandPruner(min_resource=low, max_resource=high, reduction_factor=int(study.reduction_factor))


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


def open_study(cfg, space: list[SearchParam], n_train: int | None = None) -> optuna.Study:
    """Create or resume the study of ``cfg``; ``n_train`` (training frames) sizes the pruner's rungs."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with creation_lock(str(cfg.study.storage)):
                storage = make_storage(str(cfg.study.storage), cfg.study.heartbeat_s, cfg.study.grace_s, cfg.study.reconnect_s)
                study = optuna.create_study(
                    storage=storage,
                    study_name=cfg.study.name,
                    sampler=make_sampler(cfg, space),
                    pruner=make_pruner(cfg, n_train or int(cfg.dataset.train_size)),
                    directions=directions(cfg),
                    load_if_exists=True,
                )
            break
        except Exception as exc:
            # Invocations on other machines (server storages) race to create the same tables or study;
            # the loser retries.
            racing = any(sign in str(exc).lower() for sign in CREATION_RACE_SIGNS)
            if isinstance(exc, StudyError) and (attempt == CREATE_ATTEMPTS - 1 or not racing):
                raise
            if attempt == CREATE_ATTEMPTS - 1 or not racing:
                raise StudyError(
                    f"study.storage={redact(str(cfg.study.storage))!r} cannot be opened: {redact_text(str(exc), str(cfg.study.storage))}"
                ) from exc
            time.sleep(1.0 + attempt)
    check_space_matches(study, space)
    return study


def load_study(study_cfg, study_name: str | None = None) -> optuna.Study:
    """Load study ``study_name`` (default ``study.name``) that must exist; the error lists those the storage holds."""
    storage_url = str(study_cfg.storage)
    study_name = study_name or str(study_cfg.name)
    storage = make_storage(storage_url, study_cfg.heartbeat_s, study_cfg.grace_s, study_cfg.reconnect_s)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
        raise StudyError(f"no study named {study_name!r} in {redact(storage_url)}; it holds {names or 'no studies'}") from None


def directions(cfg) -> list[str]:
    """``study.direction`` for the first objective (the validation metric); costs are minimised."""
    return [cfg.study.direction] + ["minimize"] * (len(cfg.study.objectives) - 1)


# The trial's user attribute holding its liveness record (``hpo.liveness``).
LIVENESS_ATTR = "liveness"


def write_liveness(trial: optuna.Trial) -> None:
    """Record who runs ``trial``, that it is alive now, and this process's peak memory so far."""
    trial.set_user_attr(LIVENESS_ATTR, liveness.with_memory(liveness.record()))


def fail_dead_trials(study: optuna.Study, grace_s: float, signals: dict[int, str] | None = None) -> list[tuple[optuna.trial.FrozenTrial, str]]:
    """Fail every RUNNING trial whose process is gone by its liveness record (``hpo.liveness.gone``), with
    the reason ``killed: SIGKILL, likely out of memory (peak X GB)``; ``signals``: pid -> the signal that
    ended it, when known (a worker process's exit status). In any storage, however fresh the trial's
    heartbeat. Returns the trials failed here, with their reasons."""
    storage = storage_of(study)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        found = liveness.parse(trial.user_attrs.get(LIVENESS_ATTR) or {})
        if found is None or not liveness.gone(found, grace_s):
            continue
        reason = failure_reason(liveness.killed_reason(found, (signals or {}).get(found.pid, "SIGKILL")))
        try:
            storage.set_trial_user_attr(trial_id(trial), "failure", reason)
            storage.set_trial_user_attr(trial_id(trial), "failure_message", f"process {found.pid} on {found.host} ended without ending its trial ({reason})")
            storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)
        except RuntimeError:  # another invocation failed it first (Optuna's UpdateFinishedTrialError)
            continue
        failed.append((trial, reason))
    return failed


def fail_unstarted_trials(study: optuna.Study, grace_s: float) -> None:
    """Fail RUNNING trials whose worker died before the objective started.

    A worker killed between creating a trial and the objective's first act (writing the trial's
    liveness record) leaves a trial no heartbeat or record will ever end: after ``grace_s`` it never ran.
    """
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if LIVENESS_ATTR not in trial.user_attrs and started and (now - started).total_seconds() > grace_s:
            try:
                storage_of(study).set_trial_state_values(trial_id(trial), TrialState.FAIL)
            except RuntimeError:
                continue



