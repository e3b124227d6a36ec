"""Is the process behind a record still there? The liveness record of a study run or a trial.

An invocation writes who runs it (host, pid, the pid's start time) and when it last showed life
(heartbeat) on its MLflow runs and Optuna trials. A process killed without running its handlers
(SIGKILL from the OOM killer or a user, a lost node) cannot end its own records; the next invocation
reads them and closes those whose process is gone:

- same host: the pid is not alive, or it now belongs to another process (started at another time);
  no need to wait for the heartbeat to age;
- another host: the heartbeat is older than the grace period (the pid cannot be checked from here).
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Callable

from hpo import peak_memory


@dataclass(frozen=True)
class Liveness:
    host: str
    pid: int
    started: str | None  # boot and start tick of the pid; None in records written before hpo kept it
    heartbeat: float  # seconds since the epoch
    peak_rss_bytes: int | None = None


def record(heartbeat: float | None = None) -> dict[str, str]:
    """This process's record as string tags (MLflow tags, Optuna user attributes)."""
    found = {"host": platform.node(), "pid": str(os.getpid()), "heartbeat": f"{time.time() if heartbeat is None else heartbeat:.0f}"}
    started = process_start(os.getpid())
    if started is not None:
        found["pid_start"] = started
    return found


def with_memory(found: dict[str, str]) -> dict[str, str]:
    """``found`` with this process's peak memory so far: what a later invocation reports when it died."""
    return {**found, "peak_rss_bytes": str(peak_memory.peak_bytes())}  # the running trial's peak (reset at its start)


def parse(tags: dict) -> Liveness | None:
    """The record in ``tags``; None when it has none (a run of an older hpo, a trial not yet started)."""
    try:
        peak = tags.get("peak_rss_bytes")
        return Liveness(
            host=str(tags["host"]),
            pid=int(tags["pid"]),
            started=tags.get("pid_start"),
            heartbeat=float(tags["heartbeat"]),
            peak_rss_bytes=int(peak) if peak is not None else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


def gone(found: Liveness, grace_s: float) -> bool:
    """Whether the process of ``found`` has ended (see the module docstring for the rule)."""
    if found.host != platform.node():
        return time.time() - found.heartbeat > grace_s
    if not pid_alive(found.pid):
        return True
    return found.started is not None and process_start(found.pid) != found.started


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_start(pid: int) -> str | None:
    """The boot and start tick of ``pid`` (Linux): a pid reused by a later process has another."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        with open(f"/proc/{pid}/stat") as handle:
            ticks = handle.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        return None
    return f"{boot}:{ticks}"


def killed_reason(found: Liveness | None, signal_name: str = "SIGKILL") -> str:
    """Why a trial of a vanished process failed. SIGTERM and Ctrl-C end a trial through hpo's handlers, so a
    process that left its trial RUNNING got a signal it could not catch: on a compute node almost always
    the kernel's OOM killer."""
    peak = f" (peak {found.peak_rss_bytes / 1e9:.2f} GB)" if found is not None and found.peak_rss_bytes else ""
    cause = ", likely out of memory" if signal_name == "SIGKILL" else ""
    return f"killed: {signal_name}{cause}{peak}"


@contextlib.contextmanager
def beating(beat: Callable[[], None], interval_s: float):
    """Call ``beat`` every ``interval_s`` seconds in a background thread while the block runs: a long
    trial shows life, and its peak memory so far, to invocations on other hosts."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                beat()
            except Exception:  # a missed heartbeat must not cost a trial
                pass

    thread = threading.Thread(target=loop, name="hpo-liveness", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
