"""`hpo optimize` end to end in real processes on real stores: nothing lost, nothing repeated, no run left
RUNNING. SIGTERM/SIGINT mid-trial or inside quippy, SIGKILL then resume (the dead parent run is closed by
the next invocation), invocations and workers at once on one study (SQLite, journal, submitit), a full disk,
--multirun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
import shutil
import contextlib

import pytest
from optuna.trial import TrialState
import optuna

from hpo.search import loop, storage
from hpo.search.storage import StudyError, load_study

from helpers import runs_of, assert_intact

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow


def optimize_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "hpo", "optimize", *overrides]


def start(overrides: list[str], cwd: Path, name: str) -> subprocess.Popen:
    out = open(cwd / f"{name}.out", "w")
    err = open(cwd / f"{name}.err", "w")
    return subprocess.Popen(optimize_command(overrides), cwd=cwd, stdout=out, stderr=err, start_new_session=True)


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def study_or_none(cfg):
    try:
        return load_study(cfg.study)
    except StudyError:
        return None


def running_trial_with_gap_fit(cfg):
    """A RUNNING trial whose MLflow run exists and whose gap_fit has started."""
    study = study_or_none(cfg)
    if study is None:
        return None
    for trial in study.get_trials(states=(TrialState.RUNNING,)):
        workdir = trial.user_attrs.get("workdir")
        if trial.user_attrs.get("mlflow_run_id") and workdir and (Path(workdir) / "gap_fit.cmd").is_file():
            return trial
    return None


def processes_in(root: Path) -> list[int]:
    """Processes whose working directory is under ``root`` (a gap_fit left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(root) in os.readlink(entry / "cwd"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def all_runs_ended(cfg) -> list:
    parents, children = runs_of(cfg)
    return [r for r in parents + children if r.info.status == "RUNNING"]


def test_sigterm_mid_trial_fails_the_trial_and_ends_every_run(tiny_overrides, tiny_cfg, tmp_path):
    extra = ["study.n_trials=3", "model.solver=gap_fit", "model.fit_forces=true"]  # a real gap_fit process to take down
    cfg = tiny_cfg(*extra)
    process = start([*tiny_overrides, *extra], tmp_path, "optimize")
    trial = wait_for(lambda: running_trial_with_gap_fit(cfg), "a trial with its gap_fit running")
    sent = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=600)  # a hang guard: how soon it exits is printed, not asserted
    exit_s = time.perf_counter() - sent
    stderr = (tmp_path / "optimize.err").read_text()
    assert returncode != 0, stderr[-2000:]
    study = load_study(cfg.study)
    ended = study.trials[trial.number]
    assert ended.state == TrialState.FAIL
    assert ended.user_attrs["failure"] == "interrupted"
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert all_runs_ended(cfg) == []
    parents, children = runs_of(cfg)
    run = next(c for c in children if c.info.run_id == ended.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["failure"] == "interrupted"
    assert [p.info.status for p in parents] == ["KILLED"]
    assert processes_in(tmp_path) == []  # gap_fit went down with the trial
    print(f"SIGTERM: exit code {returncode} after {exit_s:.1f} s; trial {trial.number} FAIL/interrupted; "
          f"runs RUNNING afterwards: {len(all_runs_ended(cfg))}")


def test_sigkill_then_resume_closes_the_dead_parent(tiny_overrides, tiny_cfg, tmp_path, capsys):
    """`kill -9` after the first finished trial, then the same command at once. The default
    heartbeat (30 s) and grace (90 s) have not expired: the dead process's records are closed by its liveness
    record (this host, pid gone), not by heartbeat age."""
    extra = ["study.n_trials=4", "study.enqueue_default=false", "model.solver=gap_fit", "model.fit_forces=true"]
    cfg = tiny_cfg(*extra)
    assert cfg.study.grace_s >= 60  # the rerun below comes well within it
    process = start([*tiny_overrides, *extra], tmp_path, "killed")

    def one_done_one_running():
        study = study_or_none(cfg)
        return study is not None and study.get_trials(states=(TrialState.COMPLETE,)) and running_trial_with_gap_fit(cfg)

    wait_for(one_done_one_running, "a finished trial and a running one")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    parents, _ = runs_of(cfg)
    assert [p.info.status for p in parents] == ["RUNNING"]  # nobody could end it
    dead_parent = parents[0]
    assert {"host", "pid", "pid_start", "heartbeat"} <= set(dead_parent.data.tags)
    before = load_study(cfg.study)
    killed = {t.number: t.params for t in before.get_trials(states=(TrialState.RUNNING,))}
    complete_before = len(before.get_trials(states=(TrialState.COMPLETE,)))
    assert killed

    study = loop.run(cfg)
    printed = capsys.readouterr().out
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert not study.get_trials(states=(TrialState.RUNNING,))
    reasons = {study.trials[n].user_attrs.get("failure", "") for n in killed}
    assert all(study.trials[n].state == TrialState.FAIL for n in killed)
    assert all(r.startswith("killed: SIGKILL, likely out of memory (peak ") and r.endswith(" GB)") for r in reasons), reasons
    assert all_runs_ended(cfg) == []
    parents, children = runs_of(cfg)
    closed = next(p for p in parents if p.info.run_id == dead_parent.info.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["failure"] == "killed"
    killed_runs = [c for c in children if c.data.tags["trial_number"] in {str(n) for n in killed}]
    assert [c.info.status for c in killed_runs] == ["KILLED"] * len(killed)
    assert {c.data.tags["failure"] for c in killed_runs} == reasons
    assert f"MLflow run(s) of processes that are gone as KILLED" in printed and dead_parent.info.run_id in printed
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4
    assert not [t for t in complete if t.params in killed.values()]  # a likely memory kill is not run again
    print(f"SIGKILL+resume within grace: trials complete {complete_before} before, {len(complete)} after; "
          f"{len(killed)} killed trial(s) FAIL ({sorted(reasons)}); parent closed KILLED; "
          f"runs RUNNING afterwards: {len(all_runs_ended(cfg))}; message: {[l for l in printed.splitlines() if 'gone' in l]}")


def test_three_invocations_at_once_share_one_study(tiny_overrides, tiny_cfg, tmp_path):
    extra = ["study.n_trials=6", "study.enqueue_default=false"]
    cfg = tiny_cfg(*extra)
    started = time.perf_counter()
    processes = [start([*tiny_overrides, *extra], tmp_path, f"invocation{i}") for i in range(3)]
    codes = [p.wait(timeout=900) for p in processes]
    wall = time.perf_counter() - started
    assert codes == [0, 0, 0], [(tmp_path / f"invocation{i}.err").read_text()[-2000:] for i in range(3)]
    study = load_study(cfg.study)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    distinct = {tuple(sorted(t.params.items())) for t in complete}
    assert len(complete) == 6
    assert len(distinct) == 6
    assert not study.get_trials(states=(TrialState.RUNNING,))
    parents, children = runs_of(cfg)
    # invocations running at once share the study's parent run: each listed, the last ended it
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(json.loads(v)["state"] for k, v in parents[0].data.tags.items() if k.startswith("job.")) == ["finished"] * 3
    assert all_runs_ended(cfg) == []
    assert sorted(int(c.data.tags["trial_number"]) for c in children if c.info.status == "FINISHED") == sorted(t.number for t in complete)
    print(f"3 invocations: {len(complete)} complete, {len(distinct)} distinct parameter sets, {len(study.trials)} trials in all, "
          f"runs RUNNING afterwards: {len(all_runs_ended(cfg))}, {wall:.0f} s")


# A descriptor pass that takes seconds, almost all of it inside quippy's Fortran (`descriptor.calc`):
# 16 frames of about 0.3 s each, energies only, so the cache writes between frames are small.
SLOW_DESCRIPTORS = ["model.solver=numpy", "model.n_max=16", "model.l_max=12", "model.cutoff=12.0", "model.fit_forces=false"]


@pytest.mark.parametrize("sent, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_inside_quippy_ends_in_one_paragraph(tiny_overrides, tiny_cfg, tmp_path, sent, code):
    """SIGTERM (a scheduler's time limit) or Ctrl-C while quippy computes descriptors: the
    one-paragraph message and exit code 128 + signal, never a traceback (SIGTERM surfaced inside quippy's
    Python wrapper, Ctrl-C as f90wrap's RuntimeError "Interrupt occured"); the trial FAIL interrupted, the
    study stops, no run RUNNING."""
    extra = ["study.n_trials=2", *SLOW_DESCRIPTORS]
    cfg = tiny_cfg(*extra)
    process = start([*tiny_overrides, *extra], tmp_path, "optimize")
    cache = Path(cfg.model.descriptor_cache_dir)
    wait_for(lambda: cache.is_dir() and any(cache.rglob("*.npz")), "the descriptor pass to start")
    process.send_signal(sent)
    returncode = process.wait(timeout=300)
    stderr = (tmp_path / "optimize.err").read_text()
    name = signal.Signals(sent).name
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    message = [line for line in stderr.splitlines() if line.startswith("hpo: ")]
    assert message == [f"hpo: stopped by {name}. The command's MLflow runs were ended KILLED; in a study the trial that was "
                       "running is recorded FAIL (reason interrupted) and the same command resumes the study where it stopped."], stderr[-3000:]
    study = load_study(cfg.study)
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # stopped: no second trial started
    assert study.trials[0].user_attrs["failure"] == "interrupted"
    assert all_runs_ended(cfg) == []
    parents, children = runs_of(cfg)
    assert [p.info.status for p in parents] == ["KILLED"] and [c.info.status for c in children] == ["KILLED"]
    print(f"{name} inside quippy: exit code {returncode}; stderr: {message[0]!r}; trials 0 complete before and after, "
          f"1 FAIL interrupted; runs RUNNING afterwards: {len(all_runs_ended(cfg))}")


def test_journal_storage_killed_trial_does_not_stay_running(tiny_overrides, tiny_cfg, tmp_path, capsys):
    """Optuna's journal storage has no heartbeats; hpo's liveness record is the rule there
    too. `kill -9` mid-trial, then the same command at once: the trial is FAIL with the reason, the study
    completes, nothing RUNNING in Optuna or MLflow."""
    extra = ["study.n_trials=3", "study.enqueue_default=false", "model.solver=gap_fit", f"study.storage=journal:{tmp_path}/journal.log"]
    cfg = tiny_cfg(*extra)
    process = start([*tiny_overrides, *extra], tmp_path, "killed")
    wait_for(lambda: running_trial_with_gap_fit(cfg), "a trial with its gap_fit running")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = load_study(cfg.study)
    killed = [t.number for t in before.get_trials(states=(TrialState.RUNNING,))]
    complete_before = len(before.get_trials(states=(TrialState.COMPLETE,)))
    assert killed

    study = loop.run(cfg)
    printed = capsys.readouterr().out
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))
    reasons = {study.trials[n].user_attrs["failure"] for n in killed}
    assert all(study.trials[n].state == TrialState.FAIL for n in killed)
    assert all(r.startswith("killed: SIGKILL, likely out of memory (peak ") for r in reasons), reasons
    assert all_runs_ended(cfg) == []
    parents, _ = runs_of(cfg)
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
    lines = [line for line in printed.splitlines() if "gone" in line]
    assert any(f"trial {n} of a process that is gone: FAIL" in line for n in killed for line in lines)
    print(f"journal SIGKILL+resume: trials complete {complete_before} before, 3 after; killed {killed} FAIL ({sorted(reasons)}); "
          f"runs RUNNING afterwards: {len(all_runs_ended(cfg))}; message: {lines}")


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MB tmpfs made by the test (root may mount; CI runs as root), unmounted afterwards."""
    mount = tmp_path / "scratch"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_the_study_cleanly_and_it_resumes(tiny_cfg, tiny_overrides, small_filesystem, tmp_path):
    """experiments/ (trials, caches and the study's SQLite database) on a 16 MB file system filled to its last
    64 kB: the command stops with one paragraph "no space left on ..." and exit code 2, no traceback; the
    database passes SQLite's integrity check and no MLflow run is left RUNNING; with space again the same
    command closes the trial the full disk left open (its process is gone) and finishes the study."""
    import sqlite3

    from helpers import assert_intact

    where = f"experiments_dir={small_filesystem}"
    loop.run(tiny_cfg("study.n_trials=1", where))  # the database and one finished trial exist
    filler = small_filesystem / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_filesystem).free - 64_000))
    command = [sys.executable, "-m", "hpo", "optimize", *tiny_overrides, where, "study.n_trials=2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "hpo: " in done.stderr and "no space left on the file system of" in done.stderr
    assert "Traceback" not in done.stderr.split("hpo: ")[-1]
    with sqlite3.connect(small_filesystem / "optuna.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cfg = tiny_cfg("study.n_trials=2", where)
    parents, children = runs_of(cfg)
    assert all(run.info.status != "RUNNING" for run in parents + children)
    before = len(load_study(cfg.study).trials)
    filler.unlink()
    loop.run(cfg)
    study = assert_intact(cfg, 2)
    assert len(study.trials) == 3  # the trial the full disk stopped is kept, FAIL
    print(f"full disk: {done.stderr.split('hpo: ')[-1].strip()} | trials before {before}, after {len(study.trials)} "
          f"({len(study.get_trials(states=(TrialState.COMPLETE,)))} complete); runs RUNNING afterwards: 0")


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
    """The OOM killer's SIGKILL to one worker process (and its gap_fit) in the middle of a
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


def test_cli_optimize_and_multirun(tiny_overrides, tmp_path):
    command = [sys.executable, "-m", "hpo", "optimize", "--multirun", *tiny_overrides, "study.n_trials=1", "dataset.train_size=50,100"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/experiments/optuna.db"  # output_overrides: root=tmp_path
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"water-gap-50", "water-gap-100"}
    assert {p.name for p in tmp_path.iterdir()} == {"experiments", "mlruns"}  # Hydra's sweep folders included
    assert "[hpo] trial 0:" in done.stdout
