"""gap_fit against hpo's numpy solve of the same GAP (same sparse points), energy only, on the water data.

For each training size: hpo computes the training descriptors (cold; then warm, from the cache), picks
the sparse points by FPS and solves; gap_fit fits the same model on the same sparse points
(sparse_method=index_file, one thread unless --threads). Reported: times, the largest energy
difference of the two models on the validation frames, and gap_fit's own run-to-run spread
(a second gap_fit run on the same input).

    python benchmarks/bench_solver.py [--sizes 50 200] [--n-sparse 100] [--n-max 4 --l-max 6 --cutoff 5.0] [--forces]
    python benchmarks/bench_solver.py --sizes --studies 100 20 --study-size 200

With --studies N M, two real studies (python -m hpo optimize, full search space, TPE, seed 0) follow on
--study-size training frames: N trials with the numpy solver, then M trials with gap_fit; printed
side by side are their wall times, best validation energy RMSE and trials per minute.

With --forces, both fit the data's force column as well (sigma 0.5 eV/A) and the largest validation
force difference is reported too (hpo's forces from descriptor gradients, against quippy's calculator).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import ase.io
import numpy as np

from hpo.models.gap import gap_fit as gap
from hpo.models.gap import solver as gs
from hpo.models.gap.descriptors import environments
from hpo.cache import Cache
from hpo.models.gap.sparse_gap import SparseGap

E0 = {"H": -12.13639159, "O": -2026.441234142}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=os.environ.get("HPO_DATA_DIR", "../shared/data/water"))
    parser.add_argument("--sizes", type=int, nargs="*", default=[50, 200])
    parser.add_argument("--n-sparse", type=int, default=100)
    parser.add_argument("--n-max", type=int, default=4)
    parser.add_argument("--l-max", type=int, default=6)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--zeta", type=float, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--forces", action="store_true", help="fit the force column too (what hpo's gap_fit does today)")
    parser.add_argument("--studies", type=int, nargs=2, metavar=("NUMPY_TRIALS", "GAP_FIT_TRIALS"))
    parser.add_argument("--study-size", type=int, default=200)
    args = parser.parse_args()
    import platform

    print(f"command: python benchmarks/bench_solver.py {' '.join(os.sys.argv[1:])}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    data = Path(args.data)
    params = dict(
        descriptor="soap", l_max=args.l_max, n_max=args.n_max, atom_sigma=0.3, cutoff=args.cutoff,
        cutoff_transition_width=1.0, central_weight=1.0, n_sparse=args.n_sparse, delta=1.0,
        covariance_type="dot_product", zeta=args.zeta, sparse_method="cur_points",
        default_sigma=dict(energy=0.01, force=0.5, virial=0.0, hessian=0.0), sparse_jitter=1e-8, fit_timeout_s=3600,
    )
    val = ase.io.read(data / "gap_validate.xyz", ":")
    keys = SimpleNamespace(energy="energy", force="force")
    print(f"soap n_max={args.n_max} l_max={args.l_max} cutoff={args.cutoff} zeta={args.zeta} n_sparse={args.n_sparse} per species, "
          f"{'energy+force' if args.forces else 'energy only'}, gap_fit OMP threads={args.threads}; {len(val)} validation frames")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes:
            train_file = root / f"train_{size}.xyz"
            ase.io.write(train_file, ase.io.read(data / "gap_input_50.xyz" if size <= 50 else data / "gap_input_400.xyz", f":{size}"), format="extxyz")
            frames = ase.io.read(train_file, ":")
            energies = np.array([a.get_potential_energy() for a in frames])
            forces = [a.arrays["force"] for a in frames] if args.forces else None
            cache = Cache(root / f"cache_{size}")
            timings = {}
            for label in ("cold", "warm"):
                times = gs.SolveTimes()
                start = time.perf_counter()
                model, sparse = gs.fit_frames(params, frames, energies, E0, forces=forces, cache=cache, times=times)
                timings[label] = (time.perf_counter() - start, times)
            descriptors = gap.expected_descriptors(params, frames)
            runs = []
            for run in range(2):
                points = gap.SparsePoints(frames, tuple(sparse[d] for d in descriptors))
                runs.append(gap.GAP(params, E0, keys, args.threads, sparse=points, energy_only=not args.forces).fit(
                    train_file, root / f"fit_{size}_{run}"
                ))
            references = [SparseGap.read(r.model_file_) for r in runs]
            val_cache = Cache(root / "val_cache")
            mine = model.predict(val, val_cache)
            theirs = [ref.predict(val, val_cache) for ref in references]
            n_sparse = [len(sparse[d]) for d in descriptors]
            force_note = ""
            if args.forces:
                _, quippy_forces = gap.predict(gap.load(runs[0].model_file_), val[:10])
                found = {d: environments(d, val[:10], gradients=True) for d in descriptors}
                hpo_forces = gs.predict_forces(model, found, val[:10])
                worst = max(np.abs(a - b).max() for a, b in zip(hpo_forces, quippy_forces))
                force_note = f"; max |F_hpo - F_gap_fit| on 10 validation frames {worst:.2e} eV/A"
            cold, warm = timings["cold"], timings["warm"]
            print(
                f"{size} frames, sparse {n_sparse}: gap_fit {runs[0].fit_time_s_:.2f} s / {runs[1].fit_time_s_:.2f} s; "
                f"hpo cold {cold[0]:.3f} s (kernels {cold[1].kernels_s:.4f} s, solve {cold[1].solve_s:.4f} s), "
                f"warm {warm[0]:.3f} s (kernels {warm[1].kernels_s:.4f} s, solve {warm[1].solve_s:.4f} s); "
                f"max |E_hpo - E_gap_fit| on validation {np.abs(mine - theirs[0]).max():.2e} eV; "
                f"gap_fit run-to-run {np.abs(theirs[0] - theirs[1]).max():.2e} eV{force_note}"
            )


    if args.studies:
        compare_studies(*args.studies, args.study_size)


def compare_studies(numpy_trials: int, gap_fit_trials: int, size: int) -> None:
    """Wall time and best validation RMSE of a numpy-solver study next to a gap_fit study, same data and seed."""
    from hpo.config import load_config, output_overrides
    from hpo.search import loop, selection

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for solver, trials in (("numpy", numpy_trials), ("gap_fit", gap_fit_trials)):
            overrides = [*output_overrides(Path(tmp) / solver), f"dataset.train_size={size}", f"study.n_trials={trials}",
                         f"model.solver={solver}", f"study.name=bench-{solver}"]
            start = time.perf_counter()
            study = loop.run(load_config(overrides))
            wall = time.perf_counter() - start
            best = selection.best_trial(study)
            results[solver] = (trials, wall, selection.primary(best), best.number)
    print(f"\nstudies on {size} training frames (search=gap, TPE seed 0):")
    for solver, (trials, wall, best, number) in results.items():
        print(f"  {solver:<8} {trials:>4} trials  {wall / 60:7.2f} min  {60 * trials / wall:6.1f} trials/min  "
              f"best val_energy_rmse {best:.5f} eV (trial {number})")
    (_, n_wall, n_best, _), (_, g_wall, g_best, _) = results["numpy"], results["gap_fit"]
    print(f"  wall time numpy / gap_fit: {n_wall / g_wall:.3f}; best RMSE numpy / gap_fit: {n_best / g_best:.3f}")


if __name__ == "__main__":
    main()
