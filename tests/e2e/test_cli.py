"""hpo.cli end to end (`python -m hpo ...` in a subprocess): a bad input or config exits 2 with one paragraph and
no traceback before any fit, leaving nothing behind; an unknown command gets the nearest one; passwords in
URLs are never printed nor stored."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import numpy as np

from hpo.config import ConfigError, load_config, output_overrides

from helpers import assert_nothing_left, hpo_cli, rewrite, set_position

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow


def test_cli_reports_bad_input_in_one_paragraph(tiny_overrides, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "optimize", *tiny_overrides, "model.n_max=0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith("hpo: model.n_max=0 is not allowed: an integer >= 1")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "experiments").exists()  # nothing partial written


def test_unknown_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hpo", "optimise"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "unknown command 'optimise'" in done.stderr


PLANTED = "PLANTED-s3cr3t"


TRAIN, VAL = "gap_input_50.xyz", "gap_validate.xyz"


def hpo_command(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpo", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("fit", ["model=sagpr", "model.l_max=0"], "hpo: model.l_max=0 is not allowed: an integer >= 1"),
        ("optimize", ["model.solver=gap_fit", "model.fit_forces=true", "model.cutoff=100.0"], "hpo: model.cutoff=100.0 is not allowed for this data"),
        ("optimize", ["study.storage=sqlite:////nonexistent/dir/optuna.db"], "is not allowed: a database in an existing directory"),
        ("fit", ["model.force_metrics=true"], "hpo: model.force_metrics is now model.fit_forces"),
    ],
    ids=["fit-sagpr-l_max-0", "optimize-cutoff-100", "optimize-storage-dir-missing", "fit-renamed-key"],
)
def test_cli_exits_2_before_any_fit(tiny_overrides, tiny_data, tmp_path, command, extra, message):
    base = [f"dataset.data_dir={tiny_data}", *output_overrides(tmp_path)] if "model=sagpr" in extra else tiny_overrides
    done = hpo_command(command, *base, *extra, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_left(tmp_path)


def test_cli_bad_data_exits_2(tiny_overrides, data_copy, tmp_path):
    rewrite(data_copy / VAL, set_position(1, 2, 0, np.nan))
    done = hpo_command("optimize", *tiny_overrides, f"dataset.data_dir={data_copy}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "hpo: gap_validate.xyz, frame 1: non-finite positions (atom 2): nan; every value must be a finite number"
    assert_nothing_left(tmp_path)


def test_password_in_storage_url_never_printed(tiny_overrides, tmp_path):
    url = f"postgresql://alice:{PLANTED}@127.0.0.1:1/db"
    done = hpo_command("optimize", *tiny_overrides, f"study.storage={url}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "study.storage='postgresql://alice:***@127.0.0.1:1/db' cannot be opened" in done.stderr
    assert "Traceback" not in done.stderr
    assert PLANTED not in done.stdout + done.stderr
    assert not (tmp_path / "mlruns").exists()


@contextlib.contextmanager
def closing_server():
    """A port on 127.0.0.1 that accepts every connection and closes it at once (a database server that never
    answers); yields (port, a function returning the connections accepted so far)."""
    accepted = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.settimeout(0.2)
        stop = threading.Event()

        def serve():
            while not stop.is_set():
                try:
                    connection, _ = server.accept()
                except OSError:
                    continue
                accepted.append(time.monotonic())
                connection.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield server.getsockname()[1], lambda: len(accepted)
        finally:
            stop.set()
            thread.join()


def test_password_in_tracking_uri_never_printed(tiny_overrides, tmp_path, monkeypatch):
    with closing_server() as (port, connections):
        url = f"postgresql://alice:{PLANTED}@127.0.0.1:{port}/db"
        done = hpo_command("optimize", *tiny_overrides, f"tracking.tracking_uri={url}", cwd=tmp_path, timeout=900)
        attempts = connections()
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"tracking.tracking_uri='postgresql://alice:***@127.0.0.1:{port}/db' cannot be opened" in done.stderr
    # hpo connects once (libpq may open a second connection to retry without SSL), not MLflow's 10 retries
    # times hpo Tracker's 5
    assert 1 <= attempts <= 2, attempts
    assert PLANTED not in done.stdout + done.stderr
    assert_nothing_left(tmp_path)  # the study was not created either


def test_planted_password_found_nowhere_after_a_study(tiny_overrides, tmp_path):
    """A URL with a password in a config value hpo logs (the download URL, unused: the data are local)
    appears in no output, no database byte and no artifact; the config.yaml artifact shows it redacted."""
    done = hpo_command(
        "optimize", *tiny_overrides, "study.n_trials=1", f"dataset.download_url='https://alice:{PLANTED}@example.invalid/{{file}}'",
        cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert PLANTED not in done.stdout + done.stderr
    assert "View run" not in done.stdout
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "optuna.db" for p in files)
    leaks = [str(p) for p in files if PLANTED.encode() in p.read_bytes()]
    assert not leaks
    configs = [p for p in files if p.name == "config.yaml"]
    assert configs and "https://alice:***@example.invalid/{file}" in configs[0].read_text()


def test_config_mistakes_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"study\.n_trial is not a key of the study config \(did you mean study\.n_trials\?\)"):
        load_config(["+study.n_trial=5"])
    with pytest.raises(ConfigError, match="did you mean model.cutoff"):
        load_config(["+model.cutof=3.0"])
    # open mappings take new keys
    assert load_config(["+dataset.e0.C=-1.0"]).dataset.e0.C == -1.0
    assert "delta" in load_config(["+search.space.delta={type:float,low:0.1,high:2.0}"]).search.space

    added = hpo_cli("optimize", "+study.n_trial=5", cwd=tmp_path)
    assert added.returncode == 2, added.stderr[-2000:]
    assert "did you mean study.n_trials?" in added.stderr and "Traceback" not in added.stderr
    command = hpo_cli("optimise", cwd=tmp_path)
    assert command.returncode == 2
    assert "unknown command 'optimise'; did you mean optimize?" in command.stderr
