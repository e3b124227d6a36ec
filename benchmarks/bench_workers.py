"""Speed-up of a study run by 2 worker processes over 1, on this machine.

Runs the same GAP study (search=gap_small on gap_input_50.xyz, so each fit takes seconds) twice in fresh
temporary storages, once with study.n_workers=1 and once with 2, and prints both wall times and their ratio.
`threads` is set to the number of workers, so each gap_fit runs on one thread in both runs.

    python benchmarks/bench_workers.py [n_trials]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from hpo.search import loop
from hpo.config import load_config, output_overrides


def wall_time(n_workers: int, n_trials: int, threads_per_worker: int = 1) -> float:
    """Wall time of one fresh gap_small study of ``n_trials`` trials (also used by bench_threads.py)."""
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(
            [
                *output_overrides(root),
                "search=gap_small",
                "study.enqueue_default=false",  # the hand-tuned default is a much slower fit than the rest
                f"study.n_trials={n_trials}",
                f"study.n_workers={n_workers}",
                f"threads={n_workers * threads_per_worker}",
                "model.solver=gap_fit",  # gap_fit is what threads and workers share the cores with
            ]
        )
        start = time.perf_counter()
        loop.run(cfg)
        return time.perf_counter() - start


def main() -> None:
    n_trials = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    one = wall_time(1, n_trials)
    two = wall_time(2, n_trials)
    print(f"{n_trials} finished trials: 1 worker {one:.1f} s, 2 workers {two:.1f} s")
    print(f"speed-up of 2 workers over 1: {one / two:.2f}x")


if __name__ == "__main__":
    main()
