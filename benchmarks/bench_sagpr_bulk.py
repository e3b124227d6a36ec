"""Bulk SA-GPR with the default model: wall time, peak memory and accuracy against the exact model.

Bulk polarizability data are not available here, so the cells are made as in bench_sagpr_scale.py:
each workshop frame (12 atoms, gap_input_200.xyz for training, gap_validate.xyz for validation)
repeated 2x2x2 (96 atoms) or 4x4x2 (384 atoms), every atom displaced by Gaussian noise of 0.05 A,
with the source frame's polarizability as its target (the SA-GPR kernels average over atoms, so a
repeated cell keeps its source's intensive tensor; the noise makes it only approximately right,
which does not matter for time, memory and the agreement of two models on the same data).

Each fit runs in its own child process (this script with --child), so its peak resident memory is
the child's own (os.wait4's ru_maxrss) and nothing is shared between fits; the wall time is the
child's fit() (features, kernels, solve), the validation prediction is timed separately.

Fits (--runs, comma separated, each NAME:FRAMES:REPEAT):
  default  SAGPR() as conf/model/sagpr.yaml configures it (n_env=auto, kernel_memory_gb=1,
           projection_atoms=10000): the route it picks is printed (pairs | factorised | sparsified)
  exact    n_env=None, projection_atoms=None: no environment sparsification, nc columns chosen on
           every training atom (the model before these defaults; kernels by the cheaper route)
  env2000  n_env=2000 (the projected process on 2000 environments: the accuracy cost of sparsifying)

Usage: python benchmarks/bench_sagpr_bulk.py [--data-dir DIR] [--runs default:800:2x2x2,default:300:4x4x2,exact:800:2x2x2,env2000:800:2x2x2]
           [--validate 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np

DEFAULT_DATA = Path("../shared/data/water")  # as hpo's dataset config: relative to the working directory
VARIANTS = {"default": {}, "exact": {"n_env": None, "projection_atoms": None}, "env2000": {"n_env": 2000}}


def bulk(frames, tensors, n_frames: int, repeat: tuple[int, ...], seed: int):
    """``n_frames`` cells cycling through ``frames``, repeated and displaced; their source tensors."""
    rng = np.random.default_rng(seed)
    cells, targets = [], []
    for i in range(n_frames):
        atoms = frames[i % len(frames)].repeat(repeat)
        atoms.positions += 0.05 * rng.normal(size=atoms.positions.shape)
        cells.append(atoms)
        targets.append(tensors[i % len(frames)])
    return cells, np.array(targets)


def child(args) -> None:
    from hpo.data import read_tensors
    from hpo.models.sagpr.estimator import SAGPR, component_rmse

    name, n_frames, repeat = args.child.split(":")
    repeat = tuple(int(r) for r in repeat.split("x"))
    train = ase.io.read(args.data_dir / "gap_input_200.xyz", ":")
    validate = ase.io.read(args.data_dir / "gap_validate.xyz", ":")
    train_cells, train_t = bulk(train, read_tensors(train, "Polarizability", "gap_input_200.xyz", 0.1), int(n_frames), repeat, 2)
    val_cells, val_t = bulk(validate, read_tensors(validate, "Polarizability", "gap_validate.xyz", 0.1), args.validate, repeat, 3)
    model = SAGPR(**VARIANTS[name])
    t0 = time.perf_counter()
    model.fit(train_cells, train_t)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = model.predict(val_cells)
    predict_s = time.perf_counter() - t0
    np.save(args.out, pred)
    print(json.dumps({
        "fit_s": fit_s, "predict_s": predict_s, "route": model.kernel_route_, "n_env": model.n_env_,
        "timings": model.timings_, "val_rmse": component_rmse(val_t, pred)["unique6"],
        "atoms": sum(len(a) for a in train_cells),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("HPO_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--runs", default="default:800:2x2x2,default:300:4x4x2,exact:800:2x2x2,env2000:800:2x2x2")
    parser.add_argument("--validate", type=int, default=100, help="validation cells per run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    outdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_sagpr_bulk_{os.getpid()}"
    outdir.mkdir(parents=True, exist_ok=True)
    predictions = {}
    for spec in args.runs.split(","):
        name, n_frames, repeat = spec.split(":")
        out = outdir / f"{name}-{n_frames}-{repeat}.npy"
        command = [sys.executable, __file__, "--data-dir", str(args.data_dir), "--validate", str(args.validate),
                   "--child", spec, "--out", str(out)]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        lines = process.stdout.read().splitlines()
        if status != 0 or not lines:
            print(f"  {spec}: child failed with status {status}", flush=True)
            continue
        found = json.loads(lines[-1])
        predictions[(name, n_frames, repeat)] = np.load(out)
        timings = ", ".join(f"{k} {v:.1f}" for k, v in found["timings"].items())
        print(f"  {spec}: {found['atoms']} training atoms; route {found['route']} (n_env {found['n_env']}); "
              f"fit {found['fit_s']:.1f} s ({timings}); predict {args.validate} cells {found['predict_s']:.1f} s; "
              f"child wall {wall:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GB; validation unique6 RMSE "
              f"{found['val_rmse']:.4f}; load average {os.getloadavg()[0]:.2f}", flush=True)
        found["peak_rss_gb"] = usage.ru_maxrss / 2**20
        predictions[(name, n_frames, repeat, "rmse")] = found["val_rmse"]
    for (name, n_frames, repeat), pred in [(k, v) for k, v in predictions.items() if len(k) == 3]:
        for reference in ("exact", "default"):
            key = (reference, n_frames, repeat)
            if name not in (reference, "exact") and key in predictions:
                rmse, ref = predictions[(name, n_frames, repeat, "rmse")], predictions[key + ("rmse",)]
                diff = np.abs(pred - predictions[key]).max() / np.abs(predictions[key]).max()
                print(f"  {name} vs {reference} ({n_frames} x {repeat}): validation RMSE {rmse / ref - 1:+.2%}, "
                      f"largest prediction difference {diff:.1e} of the largest component")
                break
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes share the cores)")


if __name__ == "__main__":
    main()
