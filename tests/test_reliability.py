"""Nothing is lost: parallel workers on one study, and a SIGKILL in the middle of a trial."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.search import loop, storage
from helpers import assert_intact, runs_of


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_share_one_study(tiny_cfg, tmp_path, storage):
    url = f"journal:{tmp_path}/study.log" if storage == "journal" else f"sqlite:///{tmp_path}/workers.db"
    cfg = tiny_cfg("study.n_trials=4", "study.n_workers=2", "threads=2", f"study.storage={url}")
    loop.run(cfg)
    study = assert_intact(cfg, 4)
    parents, children = runs_of(cfg)
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["threads"] for c in children} == {"1"}  # 2 threads shared by 2 workers
    assert len(study.trials) >= 4


def test_sigkill_mid_trial_then_resume(tiny_overrides, tiny_cfg, tmp_path):
    args = [*tiny_overrides, "study.n_trials=6", "study.n_workers=2", "study.heartbeat_s=1", "study.grace_s=5"]
    cfg = tiny_cfg(*args[len(tiny_overrides):])
    command = [sys.executable, "-m", "hpo", "optimize", *args]
    process = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    optuna_storage = storage.make_storage(str(cfg.study.storage), cfg.study.heartbeat_s, cfg.study.grace_s)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name=cfg.study.name, storage=optuna_storage)
        except KeyError:
            continue
        if len(study.get_trials(states=(TrialState.COMPLETE,))) >= 2 and study.get_trials(states=(TrialState.RUNNING,)):
            break
    else:
        pytest.fail("the study never had two finished trials and one running")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = optuna.load_study(study_name=cfg.study.name, storage=optuna_storage)
    finished_before = {t.number: t.value for t in before.get_trials(states=(TrialState.COMPLETE,))}
    killed = [t.number for t in before.get_trials(states=(TrialState.RUNNING,))]
    assert killed

    time.sleep(6)  # past the grace period: the killed trials are stale
    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = assert_intact(cfg, 6)
    for number, value in finished_before.items():
        assert study.trials[number].value == value  # finished trials intact
    for number in killed:
        assert study.trials[number].state == TrialState.FAIL
    _, children = runs_of(cfg)
    killed_runs = [c for c in children if c.data.tags["trial_number"] in {str(n) for n in killed}]
    assert killed_runs and all(c.info.status == "KILLED" for c in killed_runs)


def test_submitit_jobs_share_one_study(tiny_overrides, tiny_cfg, tmp_path):
    """Two `optimize` jobs through Hydra's submitit launcher (the local flavour of the SLURM one, the plugin from
    the test extra) on one study: one MLflow parent run, which both jobs list and every trial nests under."""
    command = [
        sys.executable, "-m", "hpo", "optimize", "--multirun", *tiny_overrides,
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "study.n_trials=4", "worker=0,1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = tiny_cfg("study.n_trials=4")
    study = assert_intact(cfg, 4)
    parents, children = runs_of(cfg)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    jobs = [json.loads(v) for k, v in parents[0].data.tags.items() if k.startswith("job.")]
    assert len(jobs) == 2 and {job["state"] for job in jobs} == {"finished"}
    assert "joining the study's MLflow run" in "".join(p.read_text() for p in (tmp_path / "experiments" / "hydra").rglob("*.out"))
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials)  # distinct seeds


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_worker_killed_mid_trial_fails_its_trial_and_the_study_goes_on(tiny_overrides, tiny_cfg, tmp_path):
    """Issue 25, item 3: the OOM killer's SIGKILL to one worker process (and its gap_fit) in the middle of a
    trial. The invocation reads the worker's exit status, fails the trial with the reason and the worker's
    peak memory, ends its run KILLED, never runs those parameters again, and finishes the study with the
    other worker."""
    extra = ["study.n_trials=4", "study.n_workers=2", "threads=2", "study.enqueue_default=false", "model.solver=gap_fit"]
    cfg = tiny_cfg(*extra)
    with open(tmp_path / "optimize.out", "w") as out, open(tmp_path / "optimize.err", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "hpo", "optimize", *tiny_overrides, *extra], cwd=tmp_path,
                                   start_new_session=True, stdout=out, stderr=err)
    optuna_storage = storage.make_storage(str(cfg.study.storage), cfg.study.heartbeat_s, cfg.study.grace_s)

    def trial_in_gap_fit():
        try:
            study = optuna.load_study(study_name=cfg.study.name, storage=optuna_storage)
        except KeyError:
            return None
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            workdir = trial.user_attrs.get("workdir")
            if "liveness" in trial.user_attrs and workdir and (Path(workdir) / "gap_fit.cmd").is_file():
                return trial
        return None

    deadline = time.time() + 300
    while not (victim := trial_in_gap_fit()):
        assert time.time() < deadline and process.poll() is None, "no trial ever ran gap_fit"
        time.sleep(0.2)
    worker = int(victim.user_attrs["liveness"]["pid"])
    assert worker != process.pid
    gap_fit = children_of(worker)
    os.kill(worker, signal.SIGKILL)
    for pid in gap_fit:  # the OOM killer takes the fit's memory with it; an orphaned gap_fit would run on
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    returncode = process.wait(timeout=600)
    printed = (tmp_path / "optimize.out").read_text()
    assert returncode == 0, (tmp_path / "optimize.err").read_text()[-3000:]
    study = assert_intact(cfg, 4)
    killed = study.trials[victim.number]
    reason = killed.user_attrs["failure"]
    assert killed.state == TrialState.FAIL
    assert reason.startswith("killed: SIGKILL, likely out of memory (peak ") and reason.endswith(" GB)"), reason
    assert f"(pid {worker}) was killed by SIGKILL" in printed
    assert not [t for t in study.trials if t.number != victim.number and t.params == victim.params]
    parents, children = runs_of(cfg)
    run = next(c for c in children if c.info.run_id == victim.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["failure"] == reason
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert not [r for r in parents + children if r.info.status == "RUNNING"]
    print(f"worker SIGKILL: trial {victim.number} FAIL ({reason}); {len(study.get_trials(states=(TrialState.COMPLETE,)))} "
          f"complete after, {len(study.trials)} trials in all; message: {[l for l in printed.splitlines() if 'killed by' in l]}")


def test_sigterm_to_the_invocation_stops_its_workers(tiny_overrides, tiny_cfg, tmp_path):
    """SIGTERM to the invoking process alone (not its group) while its worker processes run trials: it stops
    the workers, whose running trials end FAIL interrupted, ends every run, and says so in one paragraph with
    exit code 143; no worker or gap_fit is left running under a study run that has ended."""
    extra = ["study.n_trials=6", "study.n_workers=2", "threads=2", "study.enqueue_default=false", "model.solver=gap_fit"]
    cfg = tiny_cfg(*extra)
    with open(tmp_path / "optimize.out", "w") as out, open(tmp_path / "optimize.err", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "hpo", "optimize", *tiny_overrides, *extra], cwd=tmp_path,
                                   start_new_session=True, stdout=out, stderr=err)
    optuna_storage = storage.make_storage(str(cfg.study.storage), cfg.study.heartbeat_s, cfg.study.grace_s)

    def running_fits() -> list:
        try:
            study = optuna.load_study(study_name=cfg.study.name, storage=optuna_storage)
        except KeyError:
            return []
        return [t for t in study.get_trials(states=(TrialState.RUNNING,))
                if t.user_attrs.get("workdir") and (Path(t.user_attrs["workdir"]) / "gap_fit.cmd").is_file()]

    deadline = time.time() + 300
    while not (fits := running_fits()):
        assert time.time() < deadline and process.poll() is None, "no trial ever ran gap_fit"
        time.sleep(0.2)
    workers = {int(t.user_attrs["liveness"]["pid"]) for t in fits}
    gap_fits = [pid for worker in workers for pid in children_of(worker)]
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=300)
    stderr = (tmp_path / "optimize.err").read_text()
    assert returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith("hpo: ")][0].startswith("hpo: stopped by SIGTERM. ")
    study = optuna.load_study(study_name=cfg.study.name, storage=optuna_storage)
    interrupted = [t for t in study.get_trials(states=(TrialState.FAIL,)) if t.user_attrs.get("failure") == "interrupted"]
    assert interrupted and not study.get_trials(states=(TrialState.RUNNING,))
    parents, children = runs_of(cfg)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert not [r for r in parents + children if r.info.status == "RUNNING"]
    assert not [pid for pid in [*workers, *gap_fits] if Path(f"/proc/{pid}").exists()]
    print(f"SIGTERM to the invocation with 2 workers: exit code {returncode}; {len(study.get_trials(states=(TrialState.COMPLETE,)))} complete, "
          f"{len(interrupted)} FAIL interrupted; runs RUNNING afterwards: 0")
