"""A small, exactly consistent "bring your own data" set made with ASE's EMT calculator.

EMT forces are the exact negative gradient of the EMT energy, so these frames are
the positive control of the data checks (``hpo.data.checks``): bonds that are
stretched are pulled back and consecutive MD frames conserve energy with the
work of the forces. Two corrupted copies are the negative controls:

- ``shuffled_forces``: each frame's forces replaced by those of a frame of
  another run with the same number of atoms (still finite, same scale, wrong geometry);
- ``hartree_bohr``: the same data in Hartree and Bohr, to test unit conversion.

Contract of the frames returned by :func:`make_emt_frames`:

- MD frames of small periodic cells (fcc Cu with 4 and 8 atoms, a 16-atom Cu/Al
  mix), each run's cell slightly randomised, Langevin MD at 300, 800 and 1500 K,
  sampled every ``SAMPLE_EVERY`` steps (consecutive frames of one run differ by a
  few hundredths of an Angstrom); ``info["config_type"]`` names the run;
- then one isolated atom per species (one atom, ``pbc=False``, 20 Angstrom
  vacuum box, ``info["config_type"] == "isolated_atom"``);
- energy in ``info[energy_key]`` (eV), forces in ``arrays[forces_key]`` (eV/Angstrom),
  no calculator attached, so a reader has to find the data by key.

Generation takes well under a second. Nothing here is a pytest fixture: the
functions are plain so conftest can wrap them with the scope it needs.
"""

from __future__ import annotations

from pathlib import Path

import ase
import ase.io
import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

TEMPERATURES_K = (300.0, 800.0, 1500.0)
TIMESTEP_FS = 1.0
# A few steps apart: consecutive enough for the energy-work test (displacements of
# ~0.01-0.05 Angstrom), different enough that no two frames are duplicates.
SAMPLE_EVERY = 3
FRAMES_PER_RUN = 6
# Of each run's frames, in order: the first TRAIN_PER_RUN go to train, then one to val, one to test.
TRAIN_PER_RUN = 4
VACUUM_BOX = 20.0
SPECIES = ("Al", "Cu")


def _systems(rng: np.random.Generator) -> list[tuple[str, ase.Atoms]]:
    """Small periodic cells: fcc Cu with 4 and 8 atoms and a 16-atom fcc cell, half of it Al at random."""
    cu4 = bulk("Cu", "fcc", a=3.61, cubic=True)
    cu8 = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    mix = bulk("Cu", "fcc", a=3.70, cubic=True).repeat((2, 2, 1))
    symbols = np.array(mix.get_chemical_symbols())
    symbols[rng.choice(len(mix), size=len(mix) // 2, replace=False)] = "Al"
    mix.set_chemical_symbols(list(symbols))
    return [("Cu4", cu4), ("Cu8", cu8), ("CuAl16", mix)]


def _strained(atoms: ase.Atoms, rng: np.random.Generator) -> ase.Atoms:
    """A copy with the cell strained by up to 2 %: no two runs share a cell, so no frame of one run
    looks like the next MD step of another."""
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.uniform(-0.02, 0.02, size=(3, 3))), scale_atoms=True)
    return atoms


def _labelled(atoms: ase.Atoms, energy: float, forces: np.ndarray, energy_key: str, forces_key: str) -> ase.Atoms:
    """A calculator-free copy that carries energy and forces under the given keys only."""
    frame = ase.Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.info.update({k: v for k, v in atoms.info.items() if k != energy_key})
    frame.info[energy_key] = float(energy)
    frame.arrays[forces_key] = np.array(forces, dtype=float)
    return frame


def make_isolated_atoms(energy_key: str = "REF_energy", forces_key: str = "REF_forces") -> list[ase.Atoms]:
    """One isolated atom per species of the set, labelled the libAtoms way (``config_type=isolated_atom``)."""
    frames = []
    for symbol in SPECIES:
        atom = ase.Atoms(symbol, positions=[[VACUUM_BOX / 2] * 3], cell=[VACUUM_BOX] * 3, pbc=False)
        atom.calc = EMT()
        atom.info["config_type"] = "isolated_atom"
        frames.append(_labelled(atom, atom.get_potential_energy(), atom.get_forces(), energy_key, forces_key))
    return frames


def make_emt_runs(seed: int = 0, energy_key: str = "REF_energy", forces_key: str = "REF_forces") -> list[list[ase.Atoms]]:
    """The MD frames grouped by run (one list per system and temperature), in time order."""
    rng = np.random.default_rng(seed)
    runs = []
    for name, template in _systems(rng):
        for temperature in TEMPERATURES_K:
            atoms = _strained(template, rng)
            atoms.calc = EMT()
            atoms.rattle(stdev=0.05, seed=int(rng.integers(1 << 31)))
            thermalize_momenta(atoms, temperature, rng=rng)
            dyn = Langevin(atoms, TIMESTEP_FS * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng)
            frames = []
            for _ in range(FRAMES_PER_RUN):
                dyn.run(SAMPLE_EVERY)
                atoms.info["config_type"] = f"{name}_{temperature:.0f}K"
                frames.append(_labelled(atoms, atoms.get_potential_energy(), atoms.get_forces(), energy_key, forces_key))
            runs.append(frames)
    return runs


def make_emt_frames(seed: int = 0, energy_key: str = "REF_energy", forces_key: str = "REF_forces") -> list[ase.Atoms]:
    """All MD frames (runs concatenated, each in time order) followed by the isolated atoms."""
    runs = make_emt_runs(seed, energy_key, forces_key)
    return [frame for run in runs for frame in run] + make_isolated_atoms(energy_key, forces_key)


def emt_splits(
    seed: int = 0, energy_key: str = "REF_energy", forces_key: str = "REF_forces"
) -> dict[str, list[ase.Atoms]]:
    """train/val/test frames: of each run the first frames to train, the next to val, the last to test.

    The isolated atoms go at the start of train (where gap_fit users keep them).
    With 9 runs of 6 frames that gives 2 + 36 / 9 / 9 frames.
    """
    splits: dict[str, list[ase.Atoms]] = {"train": make_isolated_atoms(energy_key, forces_key), "val": [], "test": []}
    for run in make_emt_runs(seed, energy_key, forces_key):
        splits["train"] += run[:TRAIN_PER_RUN]
        splits["val"].append(run[TRAIN_PER_RUN])
        splits["test"] += run[TRAIN_PER_RUN + 1 :]
    return splits


def shuffle_forces(frames: list[ase.Atoms], forces_key: str = "REF_forces") -> list[ase.Atoms]:
    """Copies whose forces are moved between frames with the same number of atoms.

    Within each size group (in file order) frame k gets the forces of frame
    k + n/2 (cyclically). Frames of one MD run are contiguous and fewer than half a
    group, so every frame gets the forces of another run: forces of a neighbouring
    time step would still half follow the geometry and make a weak negative control.
    A group of one frame (e.g. a single isolated atom) keeps its forces.
    """
    out = [frame.copy() for frame in frames]
    by_size: dict[int, list[int]] = {}
    for index, frame in enumerate(frames):
        by_size.setdefault(len(frame), []).append(index)
    for indices in by_size.values():
        shift = len(indices) // 2
        for position, target in enumerate(indices):
            source = indices[(position + shift) % len(indices)]
            out[target].arrays[forces_key] = frames[source].arrays[forces_key].copy()
    return out


def to_hartree_bohr(
    frames: list[ase.Atoms], energy_key: str = "REF_energy", forces_key: str = "REF_forces"
) -> list[ase.Atoms]:
    """Copies in atomic units: energy in Hartree, positions and cell in Bohr, forces in Hartree/Bohr."""
    out = []
    for frame in frames:
        copy = ase.Atoms(
            frame.numbers, positions=frame.positions / units.Bohr, cell=frame.cell.array / units.Bohr, pbc=frame.pbc
        )
        copy.info.update(frame.info)
        copy.info[energy_key] = frame.info[energy_key] / units.Hartree
        copy.arrays[forces_key] = frame.arrays[forces_key] / (units.Hartree / units.Bohr)
        out.append(copy)
    return out


def write_emt_dataset(
    directory: str | Path, seed: int = 0, energy_key: str = "REF_energy", forces_key: str = "REF_forces"
) -> dict[str, Path]:
    """Write the EMT set and its two corrupted copies as extended XYZ files.

    Returns paths keyed ``train``, ``val``, ``test`` (eV, Angstrom),
    ``shuffled_forces_{train,val,test}`` and ``hartree_bohr_{train,val,test}``.
    Every file keeps its frames in the order of :func:`emt_splits`; nothing marks
    the Hartree/Bohr files as such, so a reader has to be told their units.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = emt_splits(seed, energy_key, forces_key)
    variants = {
        "": splits,
        "shuffled_forces_": {name: shuffle_forces(frames, forces_key) for name, frames in splits.items()},
        "hartree_bohr_": {name: to_hartree_bohr(frames, energy_key, forces_key) for name, frames in splits.items()},
    }
    paths: dict[str, Path] = {}
    for prefix, variant in variants.items():
        for split, frames in variant.items():
            path = directory / f"emt_{prefix}{split}.xyz"
            ase.io.write(path, frames, format="extxyz")
            paths[f"{prefix}{split}"] = path
    return paths
