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
from pathlib import Path

import pytest

from hpo.search import loop
from helpers import assert_intact


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_postgres(command: list[str]) -> list[str]:
    # the server refuses to run as root; Debian's package brings the postgres user
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres_url():
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
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(root / "log"), "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://hpo@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("mlflow server did not start within 120 s")
    try:
        yield url
    finally:
        os.killpg(process.pid, 9)
        process.wait()


def test_two_workers_on_postgres_and_mlflow_server(tiny_cfg, postgres_url, mlflow_server):
    cfg = tiny_cfg(
        "study.n_trials=4", "study.n_workers=2", "threads=2",
        f"study.storage={postgres_url}", f"tracking.tracking_uri={mlflow_server}", "tracking.artifact_location=null",
    )
    loop.run(cfg)
    assert_intact(cfg, 4)
