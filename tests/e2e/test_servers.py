"""The cluster setup on loopback: an Optuna study in a real PostgreSQL server, runs in a real MLflow
tracking server, two worker processes sharing both. .ci/run installs Debian's postgresql package."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from optuna.trial import TrialState

from hpo.search import loop
from hpo.search.storage import StudyError, load_study

from helpers import assert_intact, free_port, runs_of

# server (pyproject.toml markers): PostgreSQL and MLflow tracking servers on 127.0.0.1
pytestmark = pytest.mark.server


def as_postgres(command: list[str]) -> list[str]:
    # the server refuses to run as root; Debian's package brings the postgres user
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Postgres:
    """A PostgreSQL server of a test's own, which the test may stop and start again."""

    url: str
    pg_ctl: list[str]
    options: str
    log: Path

    def stop(self) -> None:
        subprocess.run(as_postgres([*self.pg_ctl, "-m", "fast", "-w", "stop"]), check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run(as_postgres([*self.pg_ctl, "-o", self.options, "-w", "-l", str(self.log), "start"]), check=True, capture_output=True)


@pytest.fixture
def postgres():
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not binaries:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql; .ci/run does)")
    bin_dir = Path(binaries[-1])
    # not under pytest's tmp_path: that is private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="hpo-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    subprocess.run(as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "hpo"]), check=True, capture_output=True)
    server = Postgres(
        url=f"postgresql+psycopg2://hpo@127.0.0.1:{port}/postgres",
        pg_ctl=[str(bin_dir / "pg_ctl"), "-D", str(data)],
        options=f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
        log=root / "log",
    )
    server.start()
    try:
        yield server
    finally:
        subprocess.run(as_postgres([*server.pg_ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres):
    return postgres.url


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:port with its store under ``root``, answering once this returns."""
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root}/server.db",
            "--artifacts-destination", str(root / "server-artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.5)
    os.killpg(process.pid, 9)
    pytest.fail("mlflow server did not start within 120 s")


def stop_mlflow_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 9)
    process.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    process = start_mlflow_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(process)


def test_two_workers_on_postgres_and_mlflow_server(tiny_cfg, postgres_url, mlflow_server):
    cfg = tiny_cfg(
        "study.n_trials=4", "study.n_workers=2", "threads=2",
        f"study.storage={postgres_url}", f"tracking.tracking_uri={mlflow_server}", "tracking.artifact_location=null",
    )
    loop.run(cfg)
    assert_intact(cfg, 4)


def test_postgres_restart_mid_study(tiny_overrides, tiny_cfg, postgres, tmp_path):
    """The study's PostgreSQL server goes down after the first finished trial (pg_ctl stop
    -m fast: connections cut) and comes back once the study has said it is waiting. The study reconnects,
    finishes every trial, and leaves nothing RUNNING."""
    extra = ["study.n_trials=4", "study.heartbeat_s=1", "study.enqueue_default=false", "model.solver=gap_fit", f"study.storage={postgres.url}"]
    cfg = tiny_cfg(*extra)
    out = tmp_path / "optimize.out"
    with open(out, "w") as stdout, open(tmp_path / "optimize.err", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "hpo", "optimize", *tiny_overrides, *extra], cwd=tmp_path,
                                   start_new_session=True, stdout=stdout, stderr=stderr)

    def until(condition, what: str) -> None:
        deadline = time.time() + 300
        while not condition():
            assert time.time() < deadline and process.poll() is None, f"never saw {what}: {out.read_text()[-2000:]}"
            time.sleep(0.3)

    def finished_trials() -> int:
        try:
            return len(load_study(cfg.study).get_trials(states=(TrialState.COMPLETE,)))
        except StudyError:
            return 0

    until(lambda: finished_trials() >= 1, "a finished trial")
    postgres.stop()
    until(lambda: "lost its connection" in out.read_text(), "the line saying the study waits for its storage")
    postgres.start()
    returncode = process.wait(timeout=600)
    printed = out.read_text()
    assert returncode == 0, (tmp_path / "optimize.err").read_text()[-3000:]
    waiting = [line for line in printed.splitlines() if "study.storage" in line and "connect" in line]
    assert len([line for line in waiting if "lost its connection" in line]) == 1, waiting
    assert "reconnecting for up to 120 s (study.reconnect_s)" in waiting[0] and "hpo@127.0.0.1" in waiting[0]
    assert any("reconnected after" in line for line in waiting)
    study = assert_intact(cfg, 4)
    parents, children = runs_of(cfg)
    assert not [r for r in parents + children if r.info.status == "RUNNING"]
    print(f"PostgreSQL restart: {len(study.get_trials(states=(TrialState.COMPLETE,)))} complete after, {len(study.trials)} trials in all, "
          f"runs RUNNING afterwards: 0; messages: {waiting}")


def test_postgres_that_stays_down_stops_the_study_with_a_message(postgres, capsys):
    """The reconnection is bounded: past study.reconnect_s the storage gives up in one paragraph naming it."""
    from hpo.search.storage import make_storage

    storage = make_storage(postgres.url, 30, 90, reconnect_s=2)
    assert storage.get_all_studies() == []
    postgres.stop()
    with pytest.raises(StudyError) as raised:
        storage.get_all_studies()
    message = str(raised.value)
    assert message.startswith(f"study.storage={postgres.url!r} lost its connection and did not come back within study.reconnect_s=2 s: ")
    assert "\n" not in message
    assert capsys.readouterr().out.count("lost its connection") == 1


def test_mlflow_server_away_for_a_while_is_one_line_not_retry_spam(tmp_path, capfd, monkeypatch):
    """The tracking server stops while a trial logs its metrics; hpo says once that it waits
    (and for how long at most), urllib3's per-retry warnings stay out of the console, and the metrics arrive
    once the server is back."""
    import threading

    from omegaconf import OmegaConf

    from hpo.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # retries 1, 2, 4, 8 ... s apart: the test waits less
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    tracker = Tracker(OmegaConf.create({"tracking_uri": url, "experiment": "away", "artifact_location": None}))
    run_id = tracker.start_run("trial-0")
    stop_mlflow_server(server)
    logged = threading.Thread(target=tracker.log, args=(run_id,), kwargs={"metrics": {"val_loss": 0.25}})
    logged.start()
    time.sleep(3)  # a few of MLflow's retries fail meanwhile
    server = start_mlflow_server(tmp_path, port)
    try:
        logged.join(timeout=300)
        assert not logged.is_alive()
        assert tracker.client.get_run(run_id).data.metrics["val_loss"] == 0.25
    finally:
        stop_mlflow_server(server)
    out, err = capfd.readouterr()
    assert out.count("is not answering; waiting for it up to about") == 1, out
    assert f"MLflow tracking server {url} answered again after" in out
    assert "Retrying" not in out + err
    print("MLflow server away: " + " | ".join(line for line in out.splitlines() if "MLflow tracking server" in line))
