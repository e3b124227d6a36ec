"""`hpo dashboard` end to end: optuna-dashboard served on the study storage, stopped by Ctrl-C; a missing
storage is refused."""

from __future__ import annotations

import pytest
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import optuna

from helpers import ROOT, free_port, hpo_cli

# server (pyproject.toml markers): the optuna-dashboard server
pytestmark = pytest.mark.server


def test_dashboard_serves_the_study_storage(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="water-demo", storage=storage)
    study.optimize(lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2, n_trials=3)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen(
        [sys.executable, "-m", "hpo", "dashboard", f"study.storage={storage}", f"dashboard.port={port}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 600  # a hang guard, not a timing: a loaded machine starts it slowly
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "dashboard did not answer in 600 s"
                time.sleep(0.5)
        summary = next(s for s in studies if s["study_name"] == "water-demo")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10) as response:
            assert len(json.load(response)["trials"]) == 3
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            out, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            out, err = server.communicate()
    assert f"http://127.0.0.1:{port}/dashboard" in out, err[-2000:]
    assert "dashboard stopped" in out and server.returncode == 0, err[-2000:]

    missing = tmp_path / "none.db"
    result = hpo_cli("dashboard", f"study.storage=sqlite:///{missing}", cwd=tmp_path)
    assert result.returncode == 2 and "run `python -m hpo optimize` first" in result.stderr
    assert not missing.exists()
