"""How to spend this machine's cores: gap_fit threads, and workers x threads for a whole study.

1. One gap_fit of the hand-tuned defaults at each training-set size, with OMP_NUM_THREADS = 1, 2, ...
   up to the core count: fit time and speed-up over one thread.
2. The same small study (search=gap_small, n trials, no default trial) run as
   1 worker x all threads and as (cores) workers x 1 thread: wall time of each.

    python benchmarks/bench_threads.py [--sizes 50 200] [--trials 8]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from hpo.models.gap import gap_fit as gap
from hpo.config import load_config, model_params
from hpo.data import load_datasets

from bench_workers import wall_time  # the script's own directory is on sys.path


def fit_seconds(train_size: int, threads: int, root: Path) -> float:
    cfg = load_config([f"dataset.train_size={train_size}"])
    data = load_datasets(cfg)
    model = model_params(cfg)
    model["n_sparse"] = gap.effective_n_sparse(model["n_sparse"], data.train.frames)
    fitted = gap.GAP(model, dict(cfg.dataset.e0), cfg.dataset.property_keys, threads).fit(data.train.path, root / f"fit-{train_size}-{threads}")
    return fitted.fit_time_s_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.2f} at start")
    thread_counts = sorted({1, *range(2, cores + 1)})
    with tempfile.TemporaryDirectory() as tmp:
        fits = {(size, n): fit_seconds(size, n, Path(tmp)) for size in args.sizes for n in thread_counts}
    one_worker = wall_time(1, args.trials, threads_per_worker=cores)
    many_workers = wall_time(cores, args.trials)
    print()
    for size in args.sizes:
        line = ", ".join(f"{n} thread(s) {fits[size, n]:.1f} s ({fits[size, 1] / fits[size, n]:.2f}x)" for n in thread_counts)
        print(f"gap_fit, defaults, {size} snapshots: {line}")
    print(f"study of {args.trials} gap_small trials: 1 worker x {cores} threads {one_worker:.1f} s, {cores} workers x 1 thread {many_workers:.1f} s")
    print(f"workers over threads: {one_worker / many_workers:.2f}x")


if __name__ == "__main__":
    main()
