"""GAP against MACE on the same data, and MACE's epoch pruning against the same study without it: hpo commands only.

Data: ASE's EMT (forces are the energy's gradient) on 64-atom fcc cells of two compositions, Cu and CuAl (half Al
at random), from Langevin MD at 300, 800 and 1500 K after a warm-up, one frame every 5 steps, shuffled into
--n-train training frames (plus the two isolated atoms for e0), --n-val validation and --n-test test frames.
Written once to --data (default benchmarks/data-kinds relative to the working directory, git-ignored).

Every command runs in its own process with one thread (``threads=1``, OMP_NUM_THREADS=1), two at a time on the
machine's two cores; its wall time and peak RSS (wait4) are printed.

1. Pruning, side by side: ``hpo optimize model=mace`` twice at once on the same space, random sampler and seed
   (the trials of both studies draw the same parameters by trial number), --trials trials of --epochs epochs,
   ``study.pruner=none`` against ``study.pruner=hyperband``: wall time, best val_loss, trials pruned and at which
   epoch.
2. GAP at comparable wall time: ``hpo optimize model=gap`` (its default search space) with ``study.timeout_s`` set
   to the hyperband study's wall time, while the MACE hyperband study is promoted (MD screen, test errors).
3. ``hpo promote model=gap``, then ``hpo compare``: the table of both champions (test errors, MD verdict, MD cost
   per atom-step, fit time).

    python benchmarks/bench_kinds.py [--n-train 80] [--trials 8] [--epochs 10]

The MACE space is narrowed to models one CPU core trains in about a minute (--space): the point is the comparison
and the pruning, not MACE's best possible accuracy, which needs wider models and a GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# data and outputs by default: relative to the working directory (the checkout's root: git-ignored there)
DEFAULT_DATA = Path("benchmarks") / "data-kinds"
SPACE = ["search.space.num_channels.choices=[8,16,32]", "search.space.max_L.choices=[0,1]", "search.space.correlation.high=2",
         "search.space.num_interactions.high=2", "search.space.batch_size.choices=[4,8]", "search.space.swa.choices=[false]"]


def make_data(root: Path, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    import ase
    import ase.io
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    paths = {name: root / f"{name}.xyz" for name in ("train", "val", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    runs = [(family, t) for family in ("Cu", "CuAl") for t in (300.0, 800.0, 1500.0)]
    per_run = -(-(n_train + n_val + n_test) // len(runs))
    frames = []
    for family, temperature in runs:
        atoms = bulk("Cu", "fcc", a=3.63 if family == "Cu" else 3.75, cubic=True).repeat((2, 2, 4))
        if family == "CuAl":
            symbols = np.array(atoms.get_chemical_symbols())
            symbols[rng.choice(len(atoms), len(atoms) // 2, replace=False)] = "Al"
            atoms.set_chemical_symbols(list(symbols))
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        dynamics = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
        dynamics.run(100)
        for _ in range(per_run):
            dynamics.run(5)
            frame = ase.Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
            frame.info["REF_energy"] = float(atoms.get_potential_energy())
            frame.arrays["REF_forces"] = atoms.get_forces().copy()
            frame.info["config_type"] = f"{family}_{temperature:.0f}K"
            frames.append(frame)
    frames = [frames[i] for i in rng.permutation(len(frames))]
    isolated = []
    for symbol in ("Cu", "Al"):
        atom = ase.Atoms(symbol, positions=[[10.0, 10.0, 10.0]], cell=[20.0] * 3, pbc=False)
        atom.calc = EMT()
        labelled = ase.Atoms(symbol, positions=atom.positions, cell=atom.cell, pbc=False)
        labelled.info.update(config_type="isolated_atom", REF_energy=float(atom.get_potential_energy()))
        labelled.arrays["REF_forces"] = np.zeros((1, 3))
        isolated.append(labelled)
    ase.io.write(paths["train"], isolated + frames[:n_train], format="extxyz")
    ase.io.write(paths["val"], frames[n_train : n_train + n_val], format="extxyz")
    ase.io.write(paths["test"], frames[n_train + n_val : n_train + n_val + n_test], format="extxyz")
    return paths


def start(name: str, args: list[str], workdir: Path) -> tuple[str, subprocess.Popen, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(workdir / f"{name}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "hpo", *args], cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[bench] {time.strftime('%H:%M:%S')} started {name}: hpo {' '.join(args)}", flush=True)
    return name, process, time.perf_counter()


def wait_both(first, second) -> tuple[tuple[float, float, int], tuple[float, float, int]]:
    """``wait`` for two commands running side by side, each timed when it ends (not when the other does)."""
    done = {}
    while len(done) < 2:
        pid, status, usage = os.wait4(-1, 0)
        for job in (first, second):
            if job[1].pid == pid:
                done[pid] = (time.perf_counter(), status, usage)
    return tuple(wait(job, ended=done[job[1].pid]) for job in (first, second))


def wait(job, allowed: tuple[int, ...] = (0,), ended=None) -> tuple[float, float, int]:
    """Wall time (s), peak RSS (GB) and exit status of a started command (``ended``: already reaped, with the time
    it ended); exits unless the status is ``allowed``."""
    name, process, t0 = job
    if ended is None:
        _, status, usage = os.wait4(process.pid, 0)
        ended = (time.perf_counter(), status, usage)
    t_end, status, usage = ended
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    wall = t_end - t0
    rc = os.waitstatus_to_exitcode(status)
    print(f"[bench] {time.strftime('%H:%M:%S')} {name}: rc {rc}, wall {wall:.0f} s, peak RSS {usage.ru_maxrss / 1e6:.2f} GB", flush=True)
    if rc not in allowed:
        sys.exit(f"{name} failed: see its log")
    return wall, usage.ru_maxrss / 1e6, rc


def promote(name: str, args: list[str], best_trial: int, workdir: Path, job=None) -> None:
    """``hpo promote``; when the stability gate refuses every candidate (exit 2), the best trial registered anyway
    (``promote.trial``, tagged ``md_stable=false``) so that the table shows its verdict."""
    *_, rc = wait(job or start(name, ["promote", *args], workdir), allowed=(0, 2))
    if rc == 2:
        print(f"[bench] {name}: no candidate passed the MD screen (see its log); registering trial {best_trial} as unstable", flush=True)
        wait(start(f"{name}-trial", ["promote", *args, f"promote.trial={best_trial}", "promote.screen.k=1"], workdir))


def study_summary(storage: str, name: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    best = min(done, key=lambda t: t.value)
    ended = [t for t in study.trials if t.datetime_complete]
    span = (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended)).total_seconds()
    return {"trials": len(study.trials), "complete": len(done), "pruned": [(t.number, max(t.intermediate_values, default=0)) for t in pruned],
            "best": best.value, "best_trial": best.number, "span_s": span}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_DATA / "run")
    parser.add_argument("--n-train", type=int, default=80)
    parser.add_argument("--n-val", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--space", nargs="*", default=SPACE, help="overrides narrowing the MACE search space")
    args = parser.parse_args()

    paths = make_data(args.data, args.n_train, args.n_val, args.n_test)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = ["dataset=files", f"dataset.train={paths['train'].resolve()}", f"dataset.val={paths['val'].resolve()}",
            f"dataset.test={paths['test'].resolve()}", f"root={out}", "threads=1"]
    mace = ["model=mace", f"model.max_num_epochs={args.epochs}", "model.cost_frames=2", "study.sampler=random",
            f"study.n_trials={args.trials}", "study.enqueue_default=false", *args.space]
    storage = f"sqlite:///{out}/experiments/optuna.db"
    print(f"[bench] data: {args.n_train} training frames of 64 atoms (+2 isolated atoms), {args.n_val} validation, {args.n_test} test "
          f"({args.data}); outputs in {out}", flush=True)

    # 1. pruning, side by side
    none = start("mace-none", ["optimize", *data, *mace, "study.pruner=none", "study.name=mace-none"], out)
    hyperband = start("mace-hyperband", ["optimize", *data, *mace, "study.pruner=hyperband", "study.name=mace-hyperband"], out)
    (wall_none, rss_none, _), (wall_hb, rss_hb, _) = wait_both(none, hyperband)
    s_none, s_hb = study_summary(storage, "mace-none"), study_summary(storage, "mace-hyperband")

    # 2. GAP at the hyperband study's wall time, while the MACE study is promoted
    gap = start("gap", ["optimize", *data, "model=gap", "model.cost_frames=2", "study.n_trials=1000", f"study.timeout_s={wall_hb:.0f}",
                        "study.name=gap"], out)
    mace_promote = [*data, *mace, "study.name=mace-hyperband"]
    promote_mace = start("promote-mace", ["promote", *mace_promote], out)
    wall_gap, rss_gap, _ = wait(gap)
    promote("promote-mace", mace_promote, s_hb["best_trial"], out, promote_mace)
    s_gap = study_summary(storage, "gap")

    # 3. GAP's promotion, then the table
    promote("promote-gap", [*data, "model=gap", "model.cost_frames=2", "study.name=gap"], s_gap["best_trial"], out)
    wait(start("compare", ["compare", *data], out))

    print("\n== epoch pruning (MACE, same sampler and seed, side by side) ==")
    for label, wall, rss, s in (("pruner=none", wall_none, rss_none, s_none), ("pruner=hyperband", wall_hb, rss_hb, s_hb)):
        pruned = ", ".join(f"trial {n} at epoch {e}" for n, e in s["pruned"]) or "none"
        print(f"{label:17s} wall {wall:6.0f} s (first trial start to last trial end {s['span_s']:.0f} s)  peak {rss:.2f} GB  "
              f"best val_loss {s['best']:.5g} (trial {s['best_trial']})  trials {s['trials']}, pruned: {pruned}")
    print(f"hyperband / none wall time: {wall_hb / wall_none:.2f} (trials' span {s_hb['span_s'] / s_none['span_s']:.2f}); "
          f"best val_loss {'equal' if s_hb['best'] == s_none['best'] else 'differs'}")
    print(f"\n== GAP at comparable wall time ==\ngap               wall {wall_gap:6.0f} s  peak {rss_gap:.2f} GB  best val_loss {s_gap['best']:.5g} "
          f"(trial {s_gap['best_trial']})  trials {s_gap['trials']}")
    print("\n== hpo compare ==")
    print((out / "experiments" / "compare" / "compare.md").read_text())


if __name__ == "__main__":
    main()
