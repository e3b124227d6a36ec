"""Time to a good model: a multi-fidelity (pruned) GAP search against a full one of the same size.

Runs the same study twice in fresh temporary storages, same sampler and seed:
  full    every trial fitted on the whole training set
  pruned  study.fidelity_rungs=[0.25,0.5,1.0] with a successive-halving pruner
and reports, for the pruned search, the time until a complete trial came within 5% of the best
validation RMSE the full search found, over the full search's time. Times are measured from the
first trial's start to a trial's end (Optuna's own timestamps).

    python benchmarks/bench_fidelity.py [--pruned "OVERRIDES"] [hydra overrides for both studies]

e.g. python benchmarks/bench_fidelity.py --pruned "study.fidelity_rungs=[0.25,1.0] study.reduction_factor=4 \
     study.pruner=successive_halving" dataset.train_size=200 search=gap
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState

from hpo.search import loop
from hpo.config import load_config, output_overrides

DEFAULTS = ["study.n_trials=20", "dataset.train_size=100", "search=gap_small", "study.enqueue_default=false"]
PRUNED = "study.fidelity_rungs=[0.25,0.5,1.0] study.pruner=successive_halving study.reduction_factor=2"
TOLERANCE = 0.05


def search(root: Path, overrides: list[str]) -> list[tuple[float, str, float | None]]:
    """(seconds since the first trial started, state, value) of every trial, in order of completion."""
    cfg = load_config(
        [
            *output_overrides(root),
            "model.descriptor_cache_dir=null",  # no head start from the other search's descriptors
            *overrides,
        ]
    )
    study = loop.run(cfg)
    ended = [t for t in study.trials if t.datetime_complete is not None]
    start = min(t.datetime_start for t in ended)
    rows = [((t.datetime_complete - start).total_seconds(), t.state.name, t.value) for t in ended]
    return sorted(rows)


def time_to(rows, target: float) -> float | None:
    for elapsed, state, value in rows:
        if state == TrialState.COMPLETE.name and value <= target:
            return elapsed
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", default=PRUNED, help="overrides of the pruned study only")
    args, rest = parser.parse_known_args()
    overrides, pruned_overrides = DEFAULTS + rest, args.pruned.split()
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    print(f"overrides of both studies: {' '.join(overrides)}; pruned study adds: {' '.join(pruned_overrides)}")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        full = search(Path(tmp) / "full", overrides)
        pruned = search(Path(tmp) / "pruned", overrides + pruned_overrides)
        wall = time.perf_counter() - started
    best_full = min(v for _, s, v in full if s == "COMPLETE")
    best_pruned = min(v for _, s, v in pruned if s == "COMPLETE")
    target = (1 + TOLERANCE) * best_full
    full_time, pruned_time = full[-1][0], pruned[-1][0]
    reached, full_reached = time_to(pruned, target), time_to(full, target)
    n_pruned = sum(s == "PRUNED" for _, s, _ in pruned)
    print()
    print(f"full search:   {len(full)} trials, {full_time:7.1f} s, best {best_full:.5f}, within 5% after {full_reached:.1f} s")
    print(f"pruned search: {len(pruned)} trials ({n_pruned} pruned), {pruned_time:7.1f} s, best {best_pruned:.5f}")
    print(f"target (best of full search + 5%): {target:.5f}; benchmark wall {wall:.0f} s")
    if reached is None:
        print(f"pruned search never reached the target; whole-search time ratio {pruned_time / full_time:.3f}")
    else:
        print(f"pruned search reached it after {reached:.1f} s; time-to-target ratio (pruned / full search) {reached / full_time:.3f}")


if __name__ == "__main__":
    main()
