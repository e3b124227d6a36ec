"""What a chemist sees: the MLflow records the UI opens on, the dashboard, config mistakes caught,
commands that take the model from the study, the console and the figures."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from hpo import plots
from hpo.config import ConfigError, load_config
from hpo.mlflow_ui import TRIAL_FILTER, TRIALS_VIEW
from hpo.progress import Bar
from hpo.search import loop, origin
from hpo.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, NOTE_TAG, Tracker

from helpers import runs_of

ROOT = Path(__file__).resolve().parents[1]


def hpo_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "hpo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def test_study_records_what_the_ui_and_readers_need(tiny_cfg, tiny_overrides, tmp_path, capsys):
    # 14 training frames hold 112 H environments: n_sparse=200 is fitted as 112
    overrides = ("dataset.train_size=100", "study.n_trials=2", "model.n_sparse=200")
    cfg = tiny_cfg(*overrides)
    study = loop.run(cfg)
    out = capsys.readouterr().out

    # the study's own record
    assert study.user_attrs == {"model_kind": "gap", "dataset": "water", "train_size": 100, "cv_folds": 1}
    # effective n_sparse next to the requested one, units on the trial lines, disk use at the end
    default = next(t for t in study.trials if t.user_attrs.get("is_default"))
    assert default.params["n_sparse"] == 200 and default.user_attrs["effective_params"] == {"n_sparse": 112}
    assert "112 <- 200" in out
    assert "[hpo] trial 0: " in out and " eV per cell | finished 1/2" in out
    assert "model.descriptor_cache_dir" in out and "descriptor_cache_max_gb=1 GB" in out
    assert "viewStateShareKey=hpo-trials&workflowType=machine_learning" in out

    # MLflow: experiment kind, saved trials view, run types, descriptions
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert "tags.run_type = 'trial'" in experiment.tags[NOTE_TAG]  # the experiment's description
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{TRIALS_VIEW}"])
    state = json.loads(view["state"])
    assert state["searchFilter"] == TRIAL_FILTER == "tags.run_type = 'trial'"
    assert "metrics.`val_energy_rmse`" in state["selectedColumns"] and "params.`n_sparse_requested`" in state["selectedColumns"]
    parents, children = runs_of(cfg)
    assert [p.data.tags["run_type"] for p in parents] == ["study"]
    trials = client.search_runs([experiment.experiment_id], filter_string=TRIAL_FILTER)
    assert {r.info.run_id for r in trials} == {c.info.run_id for c in children} and len(trials) == 2
    note = next(r for r in trials if r.data.tags["trial_number"] == str(default.number)).data.tags[NOTE_TAG]
    assert "validation energy RMSE" in note and "eV per cell" in note and "meV/atom" in note
    assert "n_sparse: 112 as fitted (200 requested" in note

    # an experiment made before hpo tagged the kind gets the tag when next opened
    client.create_experiment("older", artifact_location=(tmp_path / "older").as_uri())
    Tracker(load_config([*tiny_overrides, "tracking.experiment=older"]).tracking)
    assert client.get_experiment_by_name("older").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    # A reader composes its config from the record: no dataset.train_size=100 needed, a conflict refused.
    name = study.study_name
    base = [*tiny_overrides, f"study.name={name}"]
    again = origin.config_for_study(load_config(base), overrides=base)
    assert again.dataset.train_size == 100 and again.study.name == name
    with pytest.raises(ConfigError, match="was run with dataset.train_size=100, but the command gives dataset.train_size=50"):
        origin.config_for_study(load_config([*base, "dataset.train_size=50"]), overrides=[*base, "dataset.train_size=50"])
    with pytest.raises(ConfigError, match="compose the config with them"):  # outside the CLI nothing is recomposed silently
        origin.config_for_study(load_config(base))

    # a study of another kind: model=sagpr is composed in, and study.name stays the study's
    other = optuna.create_study(study_name="water-sagpr-demo", storage=str(cfg.study.storage))
    other.set_user_attr("model_kind", "sagpr")
    with pytest.raises(ConfigError, match="overrides do not fit it: Could not override 'model.n_sparse'"):
        origin.config_for_study(load_config([*tiny_overrides, "study.name=water-sagpr-demo"]), overrides=[*tiny_overrides, "study.name=water-sagpr-demo"])
    plain = [o for o in tiny_overrides if not o.startswith(("model.", "search="))]
    composed = origin.config_for_study(load_config([*plain, "study.name=water-sagpr-demo"]), overrides=[*plain, "study.name=water-sagpr-demo"])
    assert composed.model.kind == "sagpr" and composed.study.name == "water-sagpr-demo" and composed.study.metric == "val_rmse"
    with pytest.raises(ConfigError, match="was run with model=sagpr"):
        origin.config_for_study(load_config([*plain, "model=gap"]), "water-sagpr-demo", overrides=[*plain, "model=gap"])
    assert origin.kind_of_params({"reg0", "nc"}) == "sagpr" and origin.kind_of_params({"n_sparse"}) == "gap"

    # the report command, given only the study's name, reads training size and model from the study
    result = hpo_cli("report", *[o for o in tiny_overrides], f"study.name={name}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was run with dataset.train_size=100" in result.stdout
    assert "[I " not in result.stdout + result.stderr  # no Optuna INFO lines
    assert "Warning" not in result.stderr, result.stderr[-3000:]


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
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "dashboard did not answer in 120 s"
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


def test_progress_bar_on_a_terminal_and_in_a_log():
    log = io.StringIO()
    with Bar(4, "[hpo] NVE MD", "steps", stream=log, tty=False, every_s=3600) as bar:
        for _ in range(4):
            bar.update()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[hpo] NVE MD: 1/4 steps (25%)") and lines[-1].startswith("[hpo] NVE MD: 4/4 steps (100%)")
    assert len(lines) == 2 and "\r" not in log.getvalue()  # one line per every_s, and the last

    tty = io.StringIO()
    with Bar(2, "MD", "steps", stream=tty, tty=True) as bar:
        bar.update()
        bar.update()
    assert tty.getvalue().count("\r") == 3 and "[" + "#" * Bar.WIDTH + "] 2/2 steps" in tty.getvalue()
    assert tty.getvalue().endswith("\n")


def test_energy_parity_is_per_atom_relative_with_plain_ticks(tmp_path):
    atoms = np.full(5, 12)
    true = -5600.0 + np.linspace(0, 0.5, 5)  # eV per cell: thousands of eV, differing in the last digits
    path = plots.energy_parity_plot(tmp_path / "parity_energy.png", {"train": (true, true + 0.01, atoms), "validation": (true, true - 0.02, atoms)}, "t")
    assert path.is_file()
    fig, ax = plt.subplots()
    ax.plot([20000.001, 20000.002], [1e-4, 2e-4])
    plots.plain_ticks(ax)
    fig.canvas.draw()
    assert ax.xaxis.get_major_formatter().get_offset() == "" and ax.yaxis.get_major_formatter().get_offset() == ""
    plt.close(fig)
