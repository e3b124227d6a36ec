"""Peak resident memory (RSS) of this process over a stretch of work, such as one trial.

Linux keeps the process's high-water mark (VmHWM in /proc/self/status) and resets it when "5" is written to
/proc/self/clear_refs, so each trial of a long study gets its own peak, not the study's so far. Where
that is not possible, the lifetime peak (getrusage) is the bound reported. Child processes (gap_fit) are
not included: they have their own peaks.
"""

from __future__ import annotations

import resource
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def reset() -> bool:
    """Start a new stretch; False where the peak cannot be reset (the lifetime peak is then reported)."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """The highest RSS since the last ``reset`` (bytes)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
