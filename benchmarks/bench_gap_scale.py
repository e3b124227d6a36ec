"""GAP fits with forces at the size of real data: hpo's streamed solver against gap_fit, peak memory and time.

Data: ASE's EMT on 256-atom fcc Cu cells (exact forces: the energy's gradient), from Langevin MD at 300, 600,
900 and 1200 K, one frame every 10 steps (20 fs), plus an isolated atom for e0; a separate run gives the validation
frames. Written once to --data (default benchmarks/data-emt256 relative to the working directory, git-ignored).

Each fit runs in its own process (``--worker``); its peak RSS is the kernel's (wait4), its wall time the whole
process's (imports, descriptors, solve and validation predictions).

1. One fit per training size (--sizes, default 50 200 500) with hpo's numpy solver (forces, n_max 8, l_max 6,
   cutoff 5 A, --n-sparse 2000 sparse points), and with gap_fit on the same sparse points where its own
   estimate fits --gap-fit-budget-gb: peak RSS, wall, validation energy (meV/atom) and force (eV/A) RMSE, and
   the largest difference of the two models' validation energies and forces.
2. GP-only and descriptor-changing trials: ``hpo fit`` three times on --trial-size frames with one cache: cold,
   then only the sigmas changed (warm: the factors are reused), then zeta changed (the factors are rebuilt).

    python benchmarks/bench_gap_scale.py [--sizes 50 200 500] [--n-sparse 2000] [--skip-gap-fit] [--skip-trials]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

E0_KEY = "REF_energy"  # not "energy": ASE would move it into a calculator
FORCES_KEY = "REF_forces"
SOAP = dict(descriptor="soap", l_max=6, n_max=8, atom_sigma=0.5, cutoff=5.0, cutoff_transition_width=1.0,
            central_weight=1.0, delta=1.0, covariance_type="dot_product", zeta=2, sparse_method="cur_points",
            default_sigma=dict(energy=0.001, force=0.05, virial=0.0, hessian=0.0), sparse_jitter=1e-8, fit_timeout_s=36000)


# --------------------------------------------------------------------------- data


def make_data(root: Path, n_train: int, n_val: int, seed: int = 0) -> dict[str, Path]:
    import ase
    import ase.io
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    paths = {"train": root / f"train_{n_train}.xyz", "val": root / f"val_{n_val}.xyz"}
    if all(p.is_file() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def run(n_frames: int, temperatures: list[float]) -> list:
        """Frames of one MD run per temperature, interleaved: any prefix samples every temperature."""
        runs = []
        per_temperature = -(-n_frames // len(temperatures))
        for temperature in temperatures:
            frames = []
            atoms = bulk("Cu", "fcc", a=3.61 * (1 + 0.01 * rng.uniform(-1, 1)), cubic=True).repeat((4, 4, 4))
            atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
            atoms.calc = EMT()
            thermalize_momenta(atoms, temperature, rng=rng)
            dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng)
            dyn.run(100)  # leave the lattice
            for _ in range(per_temperature):
                dyn.run(10)
                frame = ase.Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
                frame.info[E0_KEY] = atoms.get_potential_energy()
                frame.arrays[FORCES_KEY] = atoms.get_forces()
                frames.append(frame)
            runs.append(frames)
        return [frame for group in zip(*runs) for frame in group][:n_frames]

    isolated = ase.Atoms("Cu", positions=[[10, 10, 10]], cell=[20, 20, 20], pbc=False)
    isolated.calc = EMT()
    isolated_frame = ase.Atoms("Cu", positions=isolated.positions, cell=isolated.cell, pbc=False)
    isolated_frame.info.update({E0_KEY: isolated.get_potential_energy(), "config_type": "isolated_atom"})
    isolated_frame.arrays[FORCES_KEY] = np.zeros((1, 3))
    train = run(n_train, [300.0, 600.0, 900.0, 1200.0])
    ase.io.write(paths["train"], [isolated_frame] + train, format="extxyz")
    ase.io.write(paths["val"], run(n_val, [450.0, 1050.0]), format="extxyz")
    return paths


def read(path: Path, n: int | None = None):
    import ase.io

    frames = [a for a in ase.io.read(path, ":") if a.info.get("config_type") != "isolated_atom"]
    return frames[:n] if n else frames


# --------------------------------------------------------------------------- one fit per process


def worker(args) -> None:
    """One fit in this process; prints a JSON line; saves validation predictions for the comparison."""
    from types import SimpleNamespace

    from hpo.models.gap import gap_fit, solver

    start = time.perf_counter()
    train, val = read(Path(args.train), args.size), read(Path(args.val_file))
    e0 = {"Cu": float(read_isolated(Path(args.train)))}
    params = dict(SOAP, n_sparse=args.n_sparse)
    energies = np.array([a.info[E0_KEY] for a in train])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker == "numpy":
        model, sparse = solver.fit_frames(params, train, energies, e0, forces=[a.arrays[FORCES_KEY] for a in train], seed=0)
        np.save(out / "sparse.npy", next(iter(sparse.values())))
        fitted_at = time.perf_counter()
        e, f = solver.predict(model, val, with_forces=True)
    else:
        import ase.io

        sparse = np.load(Path(args.sparse_from) / "sparse.npy")
        ase.io.write(out / "frames.xyz", train, format="extxyz")
        keys = SimpleNamespace(energy=E0_KEY, force=FORCES_KEY)
        fitted = gap_fit.GAP(params, e0, keys, sparse=gap_fit.SparsePoints(train, (sparse,))).fit(out / "frames.xyz", out / "fit")
        fitted_at = time.perf_counter()
        e, f = gap_fit.predict(gap_fit.load(fitted.model_file_), val)
    np.save(out / "val_energies.npy", e)
    np.save(out / "val_forces.npy", np.concatenate(f))
    true_e = np.array([a.info[E0_KEY] for a in val])
    true_f = np.concatenate([a.arrays[FORCES_KEY] for a in val])
    n_atoms = np.array([len(a) for a in val])
    print(json.dumps({
        "fit_s": fitted_at - start, "predict_s": time.perf_counter() - fitted_at,
        "val_energy_mev_per_atom": 1000 * float(np.sqrt(np.mean(((e - true_e) / n_atoms) ** 2))),
        "val_force_rmse": float(np.sqrt(np.mean((np.concatenate(f) - true_f) ** 2))),
    }))


def read_isolated(path: Path) -> float:
    import ase.io

    return next(a.info[E0_KEY] for a in ase.io.read(path, ":") if a.info.get("config_type") == "isolated_atom")


def measured(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS GB of the process and its waited children, stdout) of one command."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1e6, text


def gap_fit_estimate_gb(n_frames: int, n_sparse: int, train_path: Path) -> float:
    from hpo.models.gap import gap_fit

    frames = read(train_path, n_frames)
    params = dict(SOAP, n_sparse=n_sparse, fit_forces=True)
    return (gap_fit.descriptor_memory_bytes(params, frames) + gap_fit.covariance_memory_bytes(n_sparse, frames)) / 1e9


def hpo_estimate_gb(n_frames: int, n_sparse: int, train_path: Path) -> float:
    from hpo.models.gap.kind import numpy_memory_bytes

    return numpy_memory_bytes(dict(SOAP, n_sparse=n_sparse, fit_forces=True), read(train_path, n_frames)) / 1e9


# --------------------------------------------------------------------------- trials through `hpo fit`


def trials(paths: dict[str, Path], size: int, n_sparse: int, root: Path) -> list[tuple[str, float, float, dict]]:
    import ase.io

    subset = root / f"train_{size}.xyz"
    frames = ase.io.read(paths["train"], ":")
    ase.io.write(subset, frames[: size + 1], format="extxyz")  # the isolated atom comes first
    from hpo.config import output_overrides

    base = [sys.executable, "-m", "hpo", "fit", "dataset=files", f"dataset.train={subset}", f"dataset.val={paths['val']}",
            f"dataset.keys.energy={E0_KEY}", f"dataset.keys.forces={FORCES_KEY}", *output_overrides(root), "model.n_max=8", "model.l_max=6", "model.cutoff=5.0",
            "model.atom_sigma=0.5", f"model.n_sparse={n_sparse}", "model.memory_budget_gb=8", "model.descriptor_cache_max_gb=4"]
    out = []
    for name, extra in (("cold", ["model.zeta=2"]), ("GP-only (sigmas changed)", ["model.zeta=2", "model.default_sigma.energy=0.002", "model.default_sigma.force=0.1"]),
                        ("zeta changed", ["model.zeta=3"])):
        wall, peak, text = measured(base + extra)
        metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("  ") and len(line.split()) == 2}
        out.append((name, wall, peak, metrics))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="benchmarks/data-emt256")  # relative to the working directory
    parser.add_argument("--sizes", type=int, nargs="*", default=[50, 200, 500])
    parser.add_argument("--val", type=int, default=20)
    parser.add_argument("--n-sparse", type=int, default=2000)
    parser.add_argument("--gap-fit-budget-gb", type=float, default=16)
    parser.add_argument("--trial-size", type=int, default=50)
    parser.add_argument("--skip-gap-fit", action="store_true")
    parser.add_argument("--skip-trials", action="store_true")
    parser.add_argument("--worker", choices=("numpy", "gap_fit"))
    parser.add_argument("--train")
    parser.add_argument("--val-file")
    parser.add_argument("--size", type=int)
    parser.add_argument("--out")
    parser.add_argument("--sparse-from")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    print(f"command: python benchmarks/bench_gap_scale.py {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    start = time.perf_counter()
    paths = make_data(Path(args.data), max(args.sizes + [args.trial_size]), args.val)
    print(f"data: {paths['train']} ({max(args.sizes + [args.trial_size])} x 256-atom Cu cells, EMT), {paths['val']} ({args.val}); "
          f"made or found in {time.perf_counter() - start:.0f} s")
    print(f"SOAP n_max 8, l_max 6, cutoff 5 A, zeta 2; {args.n_sparse} sparse points; forces in the fit (sigma 0.05 eV/A)\n")
    root = Path(tempfile.mkdtemp(prefix="bench_gap_scale_"))
    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--train", str(paths["train"]), "--val-file", str(paths["val"]), "--size", str(size), "--n-sparse", str(args.n_sparse)]
        numpy_out = root / f"numpy_{size}"
        wall, peak, text = measured(command + ["--worker", "numpy", "--out", str(numpy_out)])
        figures = json.loads(text.strip().splitlines()[-1])
        row = {"size": size, "numpy": (wall, peak, figures), "estimate": hpo_estimate_gb(size, args.n_sparse, paths["train"])}
        gap_estimate = gap_fit_estimate_gb(size, args.n_sparse, paths["train"])
        row["gap_fit_estimate"] = gap_estimate
        if not args.skip_gap_fit and gap_estimate <= args.gap_fit_budget_gb:
            gap_out = root / f"gap_fit_{size}"
            wall, peak, text = measured(command + ["--worker", "gap_fit", "--out", str(gap_out), "--sparse-from", str(numpy_out)])
            row["gap_fit"] = (wall, peak, json.loads(text.strip().splitlines()[-1]))
            row["energy_difference"] = float(np.abs(np.load(numpy_out / "val_energies.npy") - np.load(gap_out / "val_energies.npy")).max())
            row["force_difference"] = float(np.abs(np.load(numpy_out / "val_forces.npy") - np.load(gap_out / "val_forces.npy")).max())
        rows.append(row)
        print_row(row, flush=True)
    if not args.skip_trials:
        print(f"\ntrials through `hpo fit` on {args.trial_size} frames (one cache; wall = whole command):")
        results = trials(paths, args.trial_size, args.n_sparse, root)
        cold = results[0][1]
        for name, wall, peak, metrics in results:
            print(f"  {name:<26} wall {wall:7.1f} s ({cold / wall:5.1f}x cheaper than cold)  peak {peak:5.2f} GB  "
                  f"factors reused {int(metrics.get('factors_reused', -1))}  kernel rows {metrics.get('kernel_time_s', float('nan')):.1f} s  "
                  f"val force RMSE {metrics.get('val_force_rmse', float('nan')):.4f} eV/A")
    shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


def print_row(row: dict, flush: bool = False) -> None:
    wall, peak, figures = row["numpy"]
    print(f"{row['size']:4d} frames  hpo streamed: peak {peak:5.2f} GB (estimate {row['estimate']:.2f}), wall {wall:7.1f} s "
          f"(fit {figures['fit_s']:.1f}, predict {figures['predict_s']:.1f}); val {figures['val_energy_mev_per_atom']:.3f} meV/atom, "
          f"{figures['val_force_rmse']:.4f} eV/A", flush=flush)
    if "gap_fit" in row:
        wall, peak, figures = row["gap_fit"]
        print(f"            gap_fit:      peak {peak:5.2f} GB (its estimate {row['gap_fit_estimate']:.2f}), wall {wall:7.1f} s; "
              f"val {figures['val_energy_mev_per_atom']:.3f} meV/atom, {figures['val_force_rmse']:.4f} eV/A; "
              f"largest difference: energy {row['energy_difference']:.2e} eV, force {row['force_difference']:.2e} eV/A", flush=flush)
    else:
        print(f"            gap_fit:      not run (its estimate {row['gap_fit_estimate']:.1f} GB)", flush=flush)


if __name__ == "__main__":
    main()
