"""Issue 15: nothing lost, nothing repeated, no run left RUNNING.

Real processes on real stores: SIGTERM in the middle of a trial, SIGKILL then resume (the dead
parent run is closed by the next invocation), three invocations at once on one SQLite study, a
resumed study that does not replay draws, and a gap_fit crash noticed at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from hpo import liveness
from hpo.search import loop
from hpo.search.storage import StudyError, load_study

from helpers import runs_of


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
    returncode = process.wait(timeout=120)
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
    """Issue 25, item 1: `kill -9` after the first finished trial, then the same command at once. The default
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


def test_live_parent_is_not_closed(tiny_cfg):
    """Only a dead process's run is closed: this process is alive, however old its heartbeat; a dead pid's
    run is closed however fresh its heartbeat, and so is a live pid whose start time is not the recorded one
    (the pid was reused)."""
    cfg = tiny_cfg()
    tracker = loop.open_tracker(cfg)
    study = {"run_type": "study", "study": "s"}
    run_id = tracker.start_run("optimize-live", tags={**liveness.record(), **study, "heartbeat": "0"})
    assert tracker.close_dead_runs("s", grace_s=1) == []
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_id = tracker.start_run("optimize-dead", tags={**liveness.record(), **study, "pid": dead.pid})
    reused_id = tracker.start_run("optimize-reused", tags={**liveness.record(), **study, "pid_start": "another-boot:1"})
    other_study = tracker.start_run("optimize-other", tags={**liveness.record(), "run_type": "study", "study": "t", "pid": dead.pid})
    assert sorted(tracker.close_dead_runs("s", grace_s=1000)) == sorted([dead_id, reused_id])
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert tracker.client.get_run(other_study).info.status == "RUNNING"
    tracker.end_run(run_id)
    assert tracker.close_dead_runs("t", grace_s=1000) == [other_study]


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
    # invocations running at once share the study's parent run (issue 23): each listed, the last ended it
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(json.loads(v)["state"] for k, v in parents[0].data.tags.items() if k.startswith("job.")) == ["finished"] * 3
    assert all_runs_ended(cfg) == []
    assert sorted(int(c.data.tags["trial_number"]) for c in children if c.info.status == "FINISHED") == sorted(t.number for t in complete)
    print(f"3 invocations: {len(complete)} complete, {len(distinct)} distinct parameter sets, {len(study.trials)} trials in all, "
          f"runs RUNNING afterwards: {len(all_runs_ended(cfg))}, {wall:.0f} s")


def test_resumed_study_does_not_replay(tiny_cfg):
    first = loop.run(tiny_cfg("study.n_trials=3", "study.enqueue_default=false"))
    earlier = [t.params for t in first.trials]
    resumed = loop.run(tiny_cfg("study.n_trials=5", "study.enqueue_default=false"))
    later = [t.params for t in resumed.trials[len(earlier):]]
    assert [t.params for t in resumed.trials[: len(earlier)]] == earlier
    assert len(later) == 2 and not [p for p in later if p in earlier]
    assert len({tuple(sorted(p.items())) for p in earlier + later}) == 5


def test_gap_fit_crash_is_noticed_at_once(tiny_cfg, tmp_path):
    """gap_fit aborts (sparse_method=uniform refuses descriptors of more than 30 dimensions) while this
    process computes the evaluation descriptors beside it: the trial fails with gap_fit's last lines
    (how soon is printed, not asserted: timings belong to benchmarks)."""
    from hpo.config import model_params
    from hpo.data import load_datasets
    from hpo.models import kind
    from hpo.models.gap.gap_fit import GapFitError
    from hpo.search.scoring import fit_and_score

    cfg = tiny_cfg(
        "dataset.data_dir=" + os.environ.get("HPO_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "water")),
        "model.solver=gap_fit", "model.sparse_method=uniform", "model.n_max=8", "model.l_max=6", "model.cutoff=5.0", "model.n_sparse=100",
        "model.descriptor_cache_dir=null",
    )
    data = load_datasets(cfg)
    workdir = tmp_path / "crash"
    started = time.perf_counter()
    with pytest.raises(GapFitError) as raised:
        fit_and_score(cfg, kind("gap"), model_params(cfg), data, workdir)
    ended = time.time()
    total_s = time.perf_counter() - started
    gap_fit_ended = max((workdir / name).stat().st_mtime for name in ("gap_fit.out", "gap_fit.err"))
    noticed_s = ended - gap_fit_ended
    assert raised.value.reason == "gap_fit_error"
    assert "Descriptor is too large" in str(raised.value) or "SYSTEM ABORT" in str(raised.value)
    assert "last lines of gap_fit output" in str(raised.value)
    print(f"gap_fit crash: trial failed {noticed_s:.2f} s after gap_fit's last output, {total_s:.1f} s in all")


# A descriptor pass that takes seconds, almost all of it inside quippy's Fortran (`descriptor.calc`):
# 16 frames of about 0.3 s each, energies only, so the cache writes between frames are small.
SLOW_DESCRIPTORS = ["model.solver=numpy", "model.n_max=16", "model.l_max=12", "model.cutoff=12.0", "model.fit_forces=false"]


@pytest.mark.parametrize("sent, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_inside_quippy_ends_in_one_paragraph(tiny_overrides, tiny_cfg, tmp_path, sent, code):
    """Issue 25, item 3: SIGTERM (a scheduler's time limit) or Ctrl-C while quippy computes descriptors: the
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
    """Issue 25, item 6: Optuna's journal storage has no heartbeats; hpo's liveness record is the rule there
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


def test_journal_trial_of_another_host_fails_after_the_grace(tmp_path):
    """On another host the pid cannot be checked: its trial fails once its heartbeat is older than the grace."""
    import optuna

    from hpo.search.storage import LIVENESS_ATTR, fail_dead_trials, make_storage

    study = optuna.create_study(storage=make_storage(f"journal:{tmp_path}/journal.log", 30, 90), study_name="s")
    fresh, stale = study.ask(), study.ask()
    now = time.time()
    fresh.set_user_attr(LIVENESS_ATTR, {"host": "another-node", "pid": "1", "heartbeat": f"{now:.0f}"})
    stale.set_user_attr(LIVENESS_ATTR, {"host": "another-node", "pid": "1", "heartbeat": f"{now - 3600:.0f}", "peak_rss_bytes": "2500000000"})
    failed = fail_dead_trials(study, grace_s=90)
    assert [(t.number, reason) for t, reason in failed] == [(stale.number, "killed: SIGKILL, likely out of memory (peak 2.50 GB)")]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {fresh.number: TrialState.RUNNING, stale.number: TrialState.FAIL}


def test_gap_fit_killed_by_a_signal_is_named(tmp_path):
    """gap_fit killed by SIGKILL (what the kernel's OOM killer sends) mid-fit: the trial's reason is "killed"
    and the message names the signal and the likely cause, not a generic exit code."""
    from types import SimpleNamespace

    import ase.io

    from hpo.models.gap.gap_fit import GAP, GapFitError

    from helpers import require_shared_water

    ase.io.write(tmp_path / "train.xyz", ase.io.read(require_shared_water() / "gap_input_50.xyz", ":10"), format="extxyz")
    params = dict(descriptor="soap", l_max=6, n_max=8, atom_sigma=0.5, cutoff=5.0, cutoff_transition_width=1.0, central_weight=1.0,
                  n_sparse=100, delta=1.0, covariance_type="dot_product", zeta=2, sparse_method="cur_points",
                  default_sigma=dict(energy=0.01, force=0.5, virial=0.0, hessian=0.0), sparse_jitter=1e-8, fit_timeout_s=300)

    def kill_gap_fit(stop) -> None:  # beside the fit: the child named gap_fit of this process, as the OOM killer would
        while subprocess.run(["pkill", "-KILL", "-P", str(os.getpid()), "gap_fit"]).returncode != 0 and not stop():
            time.sleep(0.05)

    with pytest.raises(GapFitError) as raised:
        GAP(params, {"H": -13.6, "O": -2041.8}, SimpleNamespace(energy="energy", force="force"), energy_only=True).fit(
            tmp_path / "train.xyz", tmp_path / "fit", while_fitting=kill_gap_fit)
    assert raised.value.reason == "killed"
    assert "gap_fit killed by SIGKILL, likely out of memory" in str(raised.value)
