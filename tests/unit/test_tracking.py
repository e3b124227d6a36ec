"""Tests of hpo.tracking: only a dead process's runs are closed (liveness records)."""

from __future__ import annotations

import pytest
import subprocess

from hpo import liveness
from hpo.search import loop


@pytest.mark.slow
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
