"""Multi-fidelity rungs: the training-set sizes a trial is fitted on before the full set."""

from __future__ import annotations


def rung_sizes(fractions, n_frames: int) -> list[int]:
    """Training-set sizes of the fidelity rungs (at least one frame each, the last all of them)."""
    return sorted({max(1, round(float(f) * n_frames)) for f in fractions})
