"""MLflow records: one parent run per command, one nested child run per trial.

We use ``MlflowClient`` with explicit run ids instead of the fluent API: the
fluent API keeps the active run in process-global state, which loses the
parent when trials run in other threads or processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from hpo import liveness
from hpo.safe_files import creation_lock, sqlite_file
from hpo.models.base import failure_reason
from hpo.paths import SOURCE_CHECKOUT

PACKAGES = ("hpo", "optuna", "mlflow", "hydra-core", "ase", "quippy-ase", "numpy", "scikit-learn", "featomic")
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
CREATE_ATTEMPTS = 5
# MLflow 3's UI opens an experiment in its GenAI view (traces, sessions) or its model-training view (runs,
# metrics, parameters) by this experiment tag (values in the UI's ExperimentKind enum; the UI sets it itself
# when a user picks a view). Our experiments hold training runs only.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A run's description in the UI (the "Description" box of the run page).
NOTE_TAG = "mlflow.note.content"


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of hpo's stack and of the ``extra`` distributions (a model kind's own)."""
    versions = {}
    for name in (*PACKAGES, *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    """The commit of the source checkout hpo runs from; an installed hpo has none (its version is the
    ``version.hpo`` tag), and the working directory's repository, if any, is the user's, not hpo's."""
    if SOURCE_CHECKOUT is None:
        return "none (installed package)"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=SOURCE_CHECKOUT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=SOURCE_CHECKOUT, capture_output=True, text=True)
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def provenance_tags() -> dict[str, str]:
    tags = {f"version.{name}": version for name, version in package_versions().items()}
    tags["git_commit"] = git_commit()
    tags["host"] = platform.node()
    return tags


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {"a.b": value}, the spelling the search space uses (list items by index: "descriptors.0.cutoff")."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            flat.update(flatten({str(i): item for i, item in enumerate(value)}, name + "."))
        else:
            flat[name] = value
    return flat


def server_wait_bound_s() -> float:
    """How long MLflow's client retries a request to a tracking server that does not answer: urllib3's backoff
    (factor * 2^(n-1) from the second retry, at most 120 s each, plus up to the jitter) over MLflow's retries
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _BACKOFF_JITTER: 7, 2 and 1 s by default, about 250 s)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_BACKOFF_JITTER, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    factor, jitter = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(), MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get()
    retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    return float(sum(min(120.0, factor * 2 ** (n - 1)) if n > 1 else 0.0 for n in range(1, retries + 1)) + retries * jitter)


class ServerWaitNotice(logging.Filter):
    """While an MLflow tracking server does not answer, urllib3 logs a warning per retry ("Retrying
    (Retry(total=5, ...)) after connection broken by ..."): one line instead says that hpo waits and for how
    long at most, and one more when the server answers again (``answered``)."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.since: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Retrying"):
            return True
        if self.since is None:
            self.since = time.monotonic()
            print(f"[hpo] MLflow tracking server {self.url} is not answering; waiting for it up to about "
                  f"{server_wait_bound_s():.0f} s (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR)", flush=True)
        return False

    def answered(self) -> None:
        if self.since is not None:
            print(f"[hpo] MLflow tracking server {self.url} answered again after {time.monotonic() - self.since:.0f} s", flush=True)
            self.since = None


def _server_wait_notice(uri: str) -> ServerWaitNotice | None:
    """The process's notice (one filter on urllib3's logger, whose retry warnings do not name the server), told
    the tracking server ``uri`` in use; None for a local store."""
    if not uri.startswith(("http://", "https://")):
        return None
    from hpo.redact import redact_text

    pool = logging.getLogger("urllib3.connectionpool")
    notice = next((f for f in pool.filters if isinstance(f, ServerWaitNotice)), None)
    if notice is None:
        notice = ServerWaitNotice(uri)
        pool.addFilter(notice)
    notice.url = redact_text(uri, uri)
    return notice


class Tracker:
    """The MLflow experiment of one config, and the runs we create in it."""

    def __init__(self, tracking_cfg):
        uri = str(tracking_cfg.tracking_uri)
        self.notice = _server_wait_notice(uri)
        if sqlite_file(uri) is not None:
            sqlite_file(uri).parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = uri
        for attempt in range(CREATE_ATTEMPTS):
            try:
                with creation_lock(uri):  # MlflowClient creates the schema of a new database
                    self.client = MlflowClient(tracking_uri=uri)
                    self.experiment_id = self._experiment(tracking_cfg.experiment, tracking_cfg.artifact_location)
                break
            except (MlflowException, SQLAlchemyError):
                # Processes on several machines race to create the server's schema; the loser retries.
                if attempt == CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(1.0 + attempt)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older hpo: open it on the runs too
                self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return experiment.experiment_id
        location = None
        if artifact_location and "://" not in str(artifact_location):
            location = Path(artifact_location).expanduser().resolve().as_uri()
        try:
            return self.client.create_experiment(
                name, artifact_location=location or artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:
            # Another worker created it between our lookup and our create.
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, name: str, tags: dict | None = None, parent_run_id: str | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self._answered()
        return run.info.run_id

    def _answered(self) -> None:
        """A request went through: if the server had stopped answering, say it is back."""
        if self.notice is not None:
            self.notice.answered()

    @contextlib.contextmanager
    def run(self, name: str, tags: dict | None = None, parent_run_id: str | None = None):
        """A run that always ends: FINISHED when the block completes, KILLED when it is pruned or
        interrupted (Ctrl-C, SIGTERM), FAILED on any other exception (re-raised). Yields the run id."""
        import optuna

        run_id = self.start_run(name, tags, parent_run_id)
        try:
            yield run_id
        except (optuna.TrialPruned, KeyboardInterrupt, SystemExit):
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None, tags: dict | None = None, step: int = 0) -> None:
        """Everything in one call: one request per value is ~10x slower on SQLite."""
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None and math.isfinite(float(v))
            ],
            params=[Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in (tags or {}).items()],
        )
        self._answered()

    def log_history(self, run_id: str, series: dict, steps) -> None:
        """Metrics with one value per step (e.g. along an MD trajectory), in batches of MLflow's 1000."""
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        found = [Metric(name, float(v), now, int(step)) for name, values in series.items() for v, step in zip(values, steps) if math.isfinite(float(v))]
        for start in range(0, len(found), 1000):
            self.client.log_batch(run_id, metrics=found[start : start + 1000])

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).exists():
                self.client.log_artifact(run_id, str(path), artifact_path)

    def log_config(self, run_id: str, cfg) -> None:
        """The resolved config of the command, so the run can be repeated exactly."""
        from omegaconf import OmegaConf

        from hpo.redact import redact_text

        # URLs in the config (study storage, tracking URI, download URL) may carry passwords
        urls = [str(OmegaConf.select(cfg, key, default="")) for key in ("study.storage", "tracking.tracking_uri")]
        self.client.log_text(run_id, redact_text(OmegaConf.to_yaml(cfg, resolve=True), *urls), "config.yaml")

    def log_datasets(self, run_id: str, sets: dict) -> None:
        """The data files a run saw as MLflow dataset inputs, so the UI's Dataset column names them: ``sets``
        maps a context (training, validation, test) to a ``hpo.data.FrameSet``. The digest is the file's sha256
        cut to 16 hex digits (MLflow keeps at most 36 characters); the profile counts frames and atoms."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [
            DatasetInput(
                Dataset(
                    name=frames.path.name,
                    digest=frames.sha256[:16],
                    source_type="local",
                    source=json.dumps({"uri": Path(frames.path).resolve().as_uri()}),
                    profile=json.dumps({"frames": len(frames), "atoms": int(sum(len(a) for a in frames.frames))}),
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)],
            )
            for context, frames in sets.items()
            if frames is not None
        ]
        self.client.log_inputs(run_id, datasets=inputs)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        self._answered()

    def beat(self, *run_ids: str) -> None:
        """Refresh the heartbeat of ``run_ids`` (one tag write each)."""
        now = f"{time.time():.0f}"
        for run_id in run_ids:
            try:
                self.client.set_tag(run_id, "heartbeat", now)
            except Exception:  # a missed heartbeat must not cost a trial
                pass

    def close_dead_runs(self, study: str, grace_s: float, reasons: dict[str, str] | None = None) -> list[str]:
        """End as KILLED every RUNNING run of ``study`` (study runs and their trial runs) whose process is gone
        by its liveness record (``hpo.liveness.gone``), however fresh its heartbeat. A trial run without a
        record of its own goes with its study run. ``reasons``: run id -> why its trial failed (the trial's
        record knows its peak memory). Returns the ids closed."""
        reasons = reasons or {}
        running = [
            run
            for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
            if run.data.tags.get("study") == study
        ]
        dead_parents = {
            run.info.run_id
            for run in running
            if "mlflow.parentRunId" not in run.data.tags and self._gone(run, grace_s)
        }
        closed = []
        for run in running:
            run_id, tags = run.info.run_id, run.data.tags
            if run_id in dead_parents:
                continue
            own = liveness.parse(tags)
            if (own is not None and liveness.gone(own, grace_s)) or (own is None and tags.get("mlflow.parentRunId") in dead_parents):
                reason = failure_reason(reasons.get(run_id) or liveness.killed_reason(own))
                self.log(run_id, tags={"state": "FAIL", "failure": reason})
                self.end_run(run_id, "KILLED")
                closed.append(run_id)
        for run_id in dead_parents:  # after their trials: a reader never sees a closed study with running trials
            self.log(run_id, tags={"failure": failure_reason("killed"), "closed_by": f"{platform.node()}:{os.getpid()}"})
            self.end_run(run_id, "KILLED")
            closed.append(run_id)
        return closed

    @staticmethod
    def _gone(run, grace_s: float) -> bool:
        found = liveness.parse(run.data.tags)
        return found is not None and liveness.gone(found, grace_s)
