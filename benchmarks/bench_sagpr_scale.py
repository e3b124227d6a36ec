"""Benchmark of SA-GPR at scale: factorised kernels, streaming prediction, environment
sparsification, bulk cells.

In one run (every figure below comes from this one process):

  1. kernels of the workshop training set (200 frames of 12 atoms, nc=200, zeta=1 and 2):
     atom-pair loop vs factorised per-structure sums, and which one method="auto" picks;
  2. prediction of a long trajectory (--frames, default 10000, made by repeating the
     validation frames with small random displacements) with a model fitted on the 200
     training frames: streamed through the folded weights vs kernels against the training
     set (the cached route) on a slice;
  3. environment sparsification (n_env) on the workshop data: validation error and the
     largest difference of its predictions from the exact model's, for zeta 2 and 4;
  4. bulk fits on cells of 96 and 384 atoms (the 12-atom cells repeated 2x2x2 and 4x4x2,
     random displacements; the tensors are the source frames', so accuracy means nothing):
     wall time per stage, kernel time pairs vs factorised, peak memory.

Kernel times (pairs vs factorised) are the best of 3 calls; every other figure is one call.

Peak memory: tracemalloc peak of each stage (numpy arrays; featomic's native buffers are
not seen; off for the long prediction, where its bookkeeping of 10000 ase.Atoms would
dominate) and the process peak RSS (ru_maxrss, monotonic) before and after it.

Usage: python benchmarks/bench_sagpr_scale.py [--data-dir DIR] [--frames 10000]
           [--n-env 300,600,1200,2400] [--bulk 2x2x2:300,4x4x2:300] [--skip 1,2,3,4]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import sys
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import ase.io
import numpy as np

from hpo.cache import Cache
from hpo.data import read_tensors as _read_tensors
from hpo.models.sagpr.estimator import SAGPR, component_rmse
from hpo.models.sagpr.linear_kernels import structure_kernels
from hpo.models.sagpr.linear_kernels import kernel_costs

REPEATS = 3
DEFAULT_DATA = Path("../shared/data/water")  # as hpo's dataset config: relative to the working directory


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(label: str, out: dict, trace: bool = True):
    """Time a stage and record its tracemalloc peak (MB) and the process peak RSS before/after it.

    trace=False leaves tracemalloc off: its own bookkeeping of many small Python objects
    (e.g. 10000 ase.Atoms) inflates RSS and time.
    """
    before = rss_mb()
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out["s"] = time.perf_counter() - t0
        traced = ""
        if trace:
            traced = f"numpy peak {tracemalloc.get_traced_memory()[1] / 2**20:7.0f} MB   "
            tracemalloc.stop()
        out["rss_mb"] = rss_mb()
        print(f"  {label:44s} {out['s']:8.2f} s   {traced}"
              f"process peak RSS {before:6.0f} -> {out['rss_mb']:6.0f} MB", flush=True)


def displaced(frames, n: int, amplitude: float, seed: int):
    """``n`` frames cycling through ``frames``, each with Gaussian displacements (Angstrom)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = frames[i % len(frames)].copy()
        atoms.positions += amplitude * rng.normal(size=atoms.positions.shape)
        out.append(atoms)
    return out


def kernels_side_by_side(label: str, block, zeta: int) -> None:
    costs = kernel_costs(block, None, zeta)
    times, kernels = {}, {}
    for method in ("pairs", "factorised"):
        times[method] = np.inf
        for _ in range(REPEATS):  # best of REPEATS: the cores are shared with other jobs
            t0 = time.perf_counter()
            kernels[method] = structure_kernels(block, None, zeta, method=method)
            times[method] = min(times[method], time.perf_counter() - t0)
    rel = max(
        np.abs(kernels["factorised"][i] - kernels["pairs"][i]).max() / np.abs(kernels["pairs"][i]).max()
        for i in (0, 1)
    )
    auto = "factorised" if costs["factorised_flops"] < costs["pair_flops"] else "pairs"
    print(f"  {label:34s} zeta={zeta}: pairs {times['pairs']:7.2f} s | factorised "
          f"{times['factorised']:7.2f} s | max rel. diff {rel:.1e} | flop estimate pairs "
          f"{costs['pair_flops']:.1e} factorised {costs['factorised_flops']:.1e} "
          f"({costs['factorised_bytes'] / 2**20:.0f} MB) -> auto: {auto}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("HPO_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--frames", type=int, default=10000, help="frames of the long trajectory")
    parser.add_argument("--old-route-frames", type=int, default=500,
                        help="frames predicted by the previous route, for comparison")
    parser.add_argument("--bulk", default="2x2x2:300,4x4x2:300",
                        help="repeat:frames for the bulk fits, comma separated")
    parser.add_argument("--n-env", default="300,600,1200,2400",
                        help="environment counts of the sparsified workshop models, comma separated")
    parser.add_argument("--skip", default="", help="sections to skip, e.g. 1,2")
    args = parser.parse_args()

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"numpy {np.__version__}, load average {os.getloadavg()[0]:.2f}", flush=True)

    train_frames = ase.io.read(args.data_dir / "gap_input_200.xyz", ":")
    validate_frames = ase.io.read(args.data_dir / "gap_validate.xyz", ":")
    train_tensors = _read_tensors(train_frames, "Polarizability", "gap_input_200.xyz", 0.1)
    validate_tensors = _read_tensors(validate_frames, "Polarizability", "gap_validate.xyz", 0.1)
    params = dict(rc=4.0, sigma=0.3, n_max=8, l_max=6, nc=200, seed=0, reg0=1e-8, reg2=1e-5)

    skip = {int(x) for x in args.skip.split(",") if x}
    model = SAGPR(**params, zeta=2)
    info: dict = {}
    with stage("workshop fit (features, kernels by auto, solve)", info):
        model.fit(train_frames, train_tensors)
    print("    fit stages: " + ", ".join(f"{k} {v:.2f}" for k, v in model.timings_.items()))

    # 1 ------------------------------------------------------------------------
    print("\n1. kernels, workshop training set (200 frames x 12 atoms, nc=200)")
    for zeta in () if 1 in skip else (1, 2):
        kernels_side_by_side("train vs train (200 x 200)", model.basis_, zeta)

    # 2 ------------------------------------------------------------------------
    if 2 not in skip:
        long_trajectory(args, model, validate_frames, validate_tensors)
    if 3 not in skip:
        environment_sparsification(args, params, train_frames, train_tensors, validate_frames, validate_tensors)
    if 4 not in skip:
        bulk_fits(args, params, train_frames, train_tensors)
    print(f"\nprocess peak RSS {rss_mb():.0f} MB; load average at end {os.getloadavg()[0]:.2f} "
          "(other processes share the cores)")


def long_trajectory(args, model, validate_frames, validate_tensors) -> None:
    info: dict = {}
    print(f"\n2. prediction of a {args.frames}-frame trajectory (validation frames + 0.02 A noise)")
    long = displaced(validate_frames, args.frames, 0.02, seed=1)
    ticks = []

    def progress(done, total):
        ticks.append(done)

    with stage(f"streamed predict, {args.frames} frames", info, trace=False):
        pred = model.predict(long, progress=progress)
    print(f"    {args.frames / info['s']:.0f} frames/s; stages "
          + ", ".join(f"{k} {v:.2f}" for k, v in model.predict_timings_.items())
          + f"; progress called {len(ticks)} times, last {ticks[-1]}/{args.frames}")
    rmse = component_rmse(validate_tensors, model.predict(validate_frames))["unique6"]
    print(f"    sanity: streamed prediction of the 100 undisplaced validation frames, unique6 RMSE "
          f"{rmse:.4f} (reference table, nc=200: 0.2465)")
    n_old = min(args.old_route_frames, args.frames)
    with stage(f"kernel route, first {n_old} frames", info):
        features = model._transform(long[:n_old], Cache(None))
        k0, k2 = structure_kernels(features, model.basis_, model.zeta, method="pairs")
        old = k0 @ model.w0_ + model.mean0_
    print(f"    {n_old / info['s']:.0f} frames/s; max |a0 difference| vs streamed "
          f"{np.abs(old - (-np.trace(pred[:n_old], axis1=1, axis2=2) / np.sqrt(3))).max():.1e}")



def environment_sparsification(args, params, train_frames, train_tensors, validate_frames, validate_tensors) -> None:
    print("\n3. environment sparsification on the workshop data (nc=200; 200 training frames = 2400 environments)")
    info: dict = {}
    for zeta in (2, 4):
        exact = SAGPR(**params, zeta=zeta)
        with stage(f"zeta={zeta} exact fit + predict", info, trace=False):
            exact_pred = exact.fit(train_frames, train_tensors).predict(validate_frames)
        exact_rmse = component_rmse(validate_tensors, exact_pred)["unique6"]
        print(f"    exact: validation unique6 RMSE {exact_rmse:.4f}")
        for n_env in (int(x) for x in args.n_env.split(",")):
            sparse = SAGPR(**params, zeta=zeta, n_env=n_env)
            with stage(f"zeta={zeta} n_env={n_env} fit + predict", info, trace=False):
                pred = sparse.fit(train_frames, train_tensors).predict(validate_frames)
            rmse = component_rmse(validate_tensors, pred)["unique6"]
            diff = np.abs(pred - exact_pred).max() / np.abs(exact_pred).max()
            print(f"    n_env={n_env:5d}: validation unique6 RMSE {rmse:.4f} ({rmse / exact_rmse - 1:+.1%} vs exact), "
                  f"largest prediction difference from the exact model {diff:.1e} of the largest component")


def bulk_fits(args, params, train_frames, train_tensors) -> None:
    info: dict = {}
    print("\n4. bulk fits (nc=200, zeta=2): cells of repeated 12-atom frames + 0.05 A noise")
    for spec in args.bulk.split(","):
        repeat, n_frames = spec.split(":")
        reps = tuple(int(r) for r in repeat.split("x"))
        source = [train_frames[i % len(train_frames)] for i in range(int(n_frames))]
        bulk = displaced([a.repeat(reps) for a in source], len(source), 0.05, seed=2)
        tensors = np.array([train_tensors[i % len(train_frames)] for i in range(int(n_frames))])
        n_atoms = len(bulk[0])
        print(f"  {len(bulk)} frames x {n_atoms} atoms:")
        bulk_model = SAGPR(**params, zeta=2)
        with stage("fit (auto kernels)", info, trace=False):
            bulk_model.fit(bulk, tensors)
        print("    fit stages: " + ", ".join(f"{k} {v:.2f}" for k, v in bulk_model.timings_.items()))
        with stage("predict the same frames (streamed)", info, trace=False):
            bulk_model.predict(bulk)
        del bulk, bulk_model


if __name__ == "__main__":
    main()
