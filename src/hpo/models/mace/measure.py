"""Time and memory of MACE trainings on EMT copper, to size a study (figures in README.md of this folder).

    python -m hpo.models.mace.measure tiny   [--threads 1]     # the tests' fit: 8 + 4 Cu cells of 4-8 atoms, 3 epochs
    python -m hpo.models.mace.measure epochs [--threads 1] [--epochs 5] [--frames 50] [--set key=value ...]

``epochs``: 50 training and 10 validation cells of 32, 48, 72 and 108 Cu atoms from Langevin MD with ASE's EMT
at 300-1200 K, the default model of conf/model/mace.yaml (``--set`` changes any parameter); prints the time from
start to the first epoch's metrics (the child's imports, data loading, statistics and the first epoch) and the
time between successive epochs' metrics (one epoch of training plus its validation). Wrap either in
``/usr/bin/time -v`` for the peak RSS: it reports the largest of this process and the training child.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ase
import numpy as np
import yaml

from hpo.models.mace import engine
from hpo.paths import CONF_DIR

CONF = CONF_DIR / "model" / "mace.yaml"
# fcc Cu supercells (repeats of the 4-atom cubic cell): 32, 48, 72 and 108 atoms
REPEATS = ((2, 2, 2), (2, 2, 3), (2, 3, 3), (3, 3, 3))
TEMPERATURES_K = (300.0, 600.0, 900.0, 1200.0)
KEYS = engine.DataKeys("REF_energy", "REF_forces")


def emt_bulk_frames(n_frames: int, seed: int = 0) -> list[ase.Atoms]:
    """``n_frames`` labelled Cu cells, cycling over sizes and temperatures; one short MD run per frame (20 fs
    after a 0.05 A rattle), so frames are decorrelated."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    rng = np.random.default_rng(seed)
    frames = []
    for index in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.61 * (1 + 0.01 * rng.uniform(-1, 1)), cubic=True).repeat(REPEATS[index % len(REPEATS)])
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        thermalize_momenta(atoms, TEMPERATURES_K[(index // len(REPEATS)) % len(TEMPERATURES_K)], rng=rng)
        Langevin(atoms, 2 * units.fs, temperature_K=TEMPERATURES_K[0], friction=0.02, rng=rng).run(10)
        frame = ase.Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
        frame.info[KEYS.energy] = atoms.get_potential_energy()
        frame.arrays[KEYS.forces] = atoms.get_forces()
        frames.append(frame)
    return frames


def small_cu_frames(n_frames: int, seed: int = 0) -> list[ase.Atoms]:
    """Rattled (0.05 A) Cu cells of 4 and 8 atoms, as in the tests."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for index in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1 + index % 2, 1, 1))
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        frame = ase.Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
        frame.info[KEYS.energy] = atoms.get_potential_energy()
        frame.arrays[KEYS.forces] = atoms.get_forces()
        frames.append(frame)
    return frames


def cu_e0() -> dict[str, float]:
    from ase.calculators.emt import EMT

    atom = ase.Atoms("Cu", positions=[[10.0, 10.0, 10.0]], cell=[20.0] * 3, pbc=False)
    atom.calc = EMT()
    return {"Cu": float(atom.get_potential_energy())}


def _value(text: str):
    return yaml.safe_load(text)


def run(train: list, val: list, params: dict, threads: int) -> None:
    stamps: list[tuple[int, float, dict]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mace-measure-") as workdir:
        engine.train(train, val, params, Path(workdir), lambda e, m: stamps.append((e, time.monotonic() - started, m)),
                     e0=cu_e0(), keys=KEYS, threads=threads)
    total = time.monotonic() - started
    per_epoch = np.diff([t for _, t, _ in stamps])
    atoms = sum(len(a) for a in train)
    print(f"{len(train)} training frames ({atoms} atoms), {len(val)} validation frames, threads={threads}")
    print(f"first epoch's metrics after {stamps[0][1]:.1f} s; whole training {total:.1f} s")
    if len(per_epoch):
        print(f"per epoch (train + validation): mean {per_epoch.mean():.2f} s, min {per_epoch.min():.2f} s, max {per_epoch.max():.2f} s "
              f"({1e3 * per_epoch.mean() / atoms:.3f} ms per training atom)")
    for epoch, _, found in stamps:
        print(f"  epoch {epoch}: val energy {1e3 * found['val_energy_rmse_per_atom']:.2f} meV/atom, forces {found['val_force_rmse']:.4f} eV/A")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=("tiny", "epochs"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--set", nargs="*", default=[], help="model parameters, key=value")
    args = parser.parse_args()
    params = yaml.safe_load(CONF.read_text())
    if args.case == "tiny":
        # the fit of tests/unit/models/mace/test_engine.py
        params.update(num_channels=8, max_num_epochs=3, batch_size=4)
        frames = small_cu_frames(12)
        train, val = frames[:8], frames[8:]
    else:
        params["max_num_epochs"] = args.epochs
        frames = emt_bulk_frames(args.frames + max(4, args.frames // 5))
        train, val = frames[: args.frames], frames[args.frames :]
    params.update({key: _value(value) for key, value in (item.split("=", 1) for item in args.set)})
    run(train, val, params, args.threads)


if __name__ == "__main__":
    main()
