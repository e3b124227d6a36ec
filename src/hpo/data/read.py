"""The one reader of atomistic data: files, where each quantity is stored (keys), units, isolated-atom e0.

Where values live: energies and tensors in ``atoms.info[key]``, forces in ``atoms.arrays[key]``; ASE's
extxyz reader moves the standard names (``energy``, ``free_energy``, ``forces``...) onto a
SinglePointCalculator, so ``atoms.calc.results[key]`` is looked at too. Units after reading: eV, Angstrom.

Every load (fitting, ``md``, ``polarize``, the data checks) reads through the functions here; errors name
the file, the frame, the key and the value.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import ase
import ase.io
import numpy as np
from ase import units

from hpo.errors import DataCheckError, DataError
from hpo.paths import resolve_path

# Names under which common tools store each quantity, tried in this order
# (first: the name this project writes; then ASE, libAtoms/gap_fit and workshop conventions).
KEY_CANDIDATES: dict[str, tuple[str, ...]] = {
    "energy": ("energy", "REF_energy", "TotEnergy", "free_energy", "Energy"),
    "forces": ("forces", "force", "REF_forces", "REF_force"),
    "polarizability": ("Polarizability", "polarizability", "alpha", "REF_polarizability"),
}

# Size of one unit in eV / in Angstrom. Forces are converted with energy/length.
ENERGY_UNITS: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "Hartree": units.Hartree,
    "Rydberg": units.Rydberg,
    "kcal/mol": units.kcal / units.mol,
    "kJ/mol": units.kJ / units.mol,
}
LENGTH_UNITS: dict[str, float] = {
    "Angstrom": 1.0,
    "Bohr": units.Bohr,
    "nm": 10.0,
}

# libAtoms convention for the reference energy of a free atom.
ISOLATED_CONFIG_TYPE = "isolated_atom"
# Two isolated-atom energies of one species further apart than this (eV) are a conflict, not rounding.
E0_TOLERANCE = 1e-6
# dataset.e0 as a word (a mapping {symbol: eV} is the third form).
E0_MODES = ("isolated_atoms", "average")


@dataclass(frozen=True)
class Keys:
    """Where each quantity is stored; ``None``: the data set does not have it."""

    energy: str | None = None
    forces: str | None = None
    polarizability: str | None = None

    @property
    def force(self) -> str | None:
        # gap_fit's command line is built from ``keys.force``, the spelling of ``dataset.property_keys``,
        # which tests and benchmarks still pass to it directly.
        return self.forces

    @classmethod
    def of(cls, keys: Mapping | "Keys") -> "Keys":
        """The keys of a config mapping: ``dataset.property_keys`` (``force``) or ``dataset.keys`` (``forces``)."""
        if isinstance(keys, Keys):
            return keys
        forces = keys.get("forces") if keys.get("forces") is not None else keys.get("force")
        return cls(energy=keys.get("energy"), forces=forces, polarizability=keys.get("polarizability"))


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- values of one frame


def lookup(atoms: ase.Atoms, key: str | None):
    """The value stored under ``key`` in info, arrays or the calculator's results; None when absent."""
    if key is None:
        return None
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    results = getattr(atoms.calc, "results", None) or {}
    return results.get(key)


def stored_in(atoms: ase.Atoms, key: str) -> str | None:
    """Which part of the frame holds ``key`` (info, arrays, calc.results); None when none does."""
    if key in atoms.info:
        return "info"
    if key in atoms.arrays:
        return "arrays"
    if key in (getattr(atoms.calc, "results", None) or {}):
        return "calc.results"
    return None


def energy_of(atoms: ase.Atoms, key: str | None) -> float:
    """The frame's energy as a float; NaN when the key is missing or the value is not a number."""
    value = lookup(atoms, key)
    try:
        return float(np.asarray(value, dtype=float).reshape(()))
    except (TypeError, ValueError):
        return math.nan


def _float_array(atoms: ase.Atoms, key: str | None) -> np.ndarray | None:
    """The value stored under ``key`` as a float array; None when missing or not numbers."""
    value = lookup(atoms, key)
    if value is None:
        return None
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None


def forces_of(atoms: ase.Atoms, key: str | None) -> np.ndarray | None:
    """The frame's forces as an (n, 3) float array; None when missing or of another shape."""
    forces = _float_array(atoms, key)
    return forces if forces is not None and forces.shape == (len(atoms), 3) else None


def tensor_of(atoms: ase.Atoms, key: str | None) -> np.ndarray | None:
    """A 3x3 tensor stored as 9 numbers (row by row) or as a 3x3 array; None when missing or malformed."""
    tensor = _float_array(atoms, key)
    return tensor.reshape(3, 3) if tensor is not None and tensor.size == 9 else None


def is_isolated_atom(atoms: ase.Atoms) -> bool:
    """libAtoms convention: ``config_type=isolated_atom``, or a single atom without periodicity."""
    if atoms.info.get("config_type") == ISOLATED_CONFIG_TYPE:
        return True
    return len(atoms) == 1 and not atoms.pbc.any()


def bulk(splits: Mapping[str, Sequence[ase.Atoms]]) -> Iterable[tuple[str, int, ase.Atoms]]:
    """(label, index in its split, frame) of every frame that is not an isolated atom."""
    for label, frames in splits.items():
        for index, atoms in enumerate(frames):
            if not is_isolated_atom(atoms):
                yield label, index, atoms


def frame_energy(atoms: ase.Atoms, key: str, where: str, setting: str = "dataset.property_keys.energy") -> float:
    """The energy a fit needs; DataError naming ``where`` (file and frame), the key and ``setting``."""
    value = lookup(atoms, key)
    if value is None:
        raise DataError(f"{where}: energy key {key!r} is missing ({setting})")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: energy key {key!r} is not a number: {value!r}") from exc


def frame_forces(atoms: ase.Atoms, key: str, where: str, setting: str = "dataset.property_keys.force") -> np.ndarray:
    """The (n, 3) forces a fit needs; DataError naming ``where``, the key and ``setting``."""
    value = lookup(atoms, key)
    # the workshop files name their column `force`, which a calculator written by ASE calls `forces`
    if value is None and key in ("force", "forces") and atoms.calc is not None and "forces" in atoms.calc.results:
        value = atoms.calc.results["forces"]
    if value is None:
        raise DataError(f"{where}: per-atom force column {key!r} is missing ({setting})")
    value = np.asarray(value, dtype=float)
    if value.shape != (len(atoms), 3):
        raise DataError(f"{where}: force column {key!r} has shape {value.shape}, expected ({len(atoms)}, 3)")
    return value


def read_tensors(frames: list[ase.Atoms], key: str, source: str, symmetry_tol: float) -> np.ndarray:
    """The (n, 3, 3) tensors stored as 9 row-major numbers in ``atoms.info[key]``.

    Raises DataError naming ``source``, the frame index and the key when the key is missing, does
    not hold 9 finite numbers, or when a tensor's antisymmetric part (T - T^T)/2 has an entry above
    ``symmetry_tol`` (absolute): SA-GPR learns only the symmetric part, so a large antisymmetric
    part means wrong data (e.g. a wrong key), not noise. The workshop data have an antisymmetric
    RMS of about 0.005.
    """
    tensors = np.empty((len(frames), 3, 3))
    for index, atoms in enumerate(frames):
        if key not in atoms.info:
            raise DataError(f"{source}: frame {index} has no '{key}' entry in its info line")
        try:
            values = np.asarray(atoms.info[key], dtype=float).ravel()
        except (TypeError, ValueError):
            values = np.empty(0)
        if values.size != 9:
            raise DataError(f"{source}: frame {index}: '{key}' must hold 9 numbers (3x3 row by row), got {atoms.info[key]!r}")
        if not np.isfinite(values).all():
            raise DataError(f"{source}: frame {index}: '{key}' holds a non-finite value: {values.tolist()}")
        tensors[index] = values.reshape(3, 3)
    asym = np.abs(tensors - tensors.transpose(0, 2, 1)).max(axis=(1, 2)) / 2
    if asym.size and asym.max() > symmetry_tol:
        index = int(np.argmax(asym))
        raise DataError(
            f"{source}: frame {index}: '{key}' is not symmetric: antisymmetric part "
            f"{asym[index]:.3g} exceeds the tolerance {symmetry_tol} (absolute, max entry)"
        )
    return tensors


# --------------------------------------------------------------------------- files


def read_file(path: str | Path) -> list[ase.Atoms]:
    """Every frame of an extended XYZ file; DataError naming the file when it cannot be read."""
    path = resolve_path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise DataError(f"data file {path} is not a readable file")
    try:
        frames = ase.io.read(path, index=":", format="extxyz")
    except Exception as exc:  # ASE raises many types on malformed extxyz
        raise DataError(f"{path} is not a readable extended XYZ file: {exc}") from exc
    if not frames:
        raise DataError(f"{path} holds no frames")
    return frames


@dataclass
class FrameSet:
    """Frames of one extxyz file with the arrays a model needs, checked."""

    path: Path
    frames: list[ase.Atoms]
    sha256: str
    energies: np.ndarray | None = None  # (n,) eV per cell
    forces: list[np.ndarray] = field(default_factory=list)  # per frame (n_atoms, 3)
    # where the frames store each quantity: a model reads its targets (e.g. the polarizability) from the
    # frames it is given, whichever preset they came from
    keys: Keys = field(default_factory=Keys)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.array([len(atoms) for atoms in self.frames])


def read_frames(path: Path, keys, need: tuple[str, ...] = ("energy", "force"), e0: dict | None = None) -> FrameSet:
    """Read every frame of ``path`` (a file used as it is, as the workshop files) and check it carries
    ``need`` under ``keys`` (a ``Keys`` or a ``dataset.property_keys`` mapping).

    With ``e0`` every species must have an isolated-atom energy. Errors name the file, the frame index
    and the key, and the setting that names the key (``dataset.property_keys.*``).
    """
    path = Path(path)
    keys = Keys.of(keys)
    frames = read_file(path)
    energies, forces = [], []
    for index, atoms in enumerate(frames):
        where = f"{path.name}, frame {index}"
        if e0 is not None:
            unknown = sorted(set(atoms.get_chemical_symbols()) - set(e0))
            if unknown:
                raise DataError(f"{where}: species {unknown} have no e0 in the dataset config (dataset.e0)")
        if "energy" in need:
            energies.append(frame_energy(atoms, keys.energy, where))
        if "force" in need:
            forces.append(frame_forces(atoms, keys.forces, where))
    if "polarizability" in need:
        read_tensors(frames, keys.polarizability, path.name, symmetry_tol=float("inf"))
    found = FrameSet(
        path=path,
        frames=frames,
        sha256=sha256sum(path),
        energies=np.array(energies) if energies else None,
        forces=forces,
        keys=keys,
    )
    check_finite(found)
    return found


def check_finite(frameset: FrameSet) -> None:
    """Every position, cell vector, energy and force is a finite number (a NaN would reach gap_fit and
    come back as a NaN model or a crash several trials later). Errors name the file and the frame."""
    for index, atoms in enumerate(frameset.frames):
        where = f"{frameset.path.name}, frame {index}"
        arrays = [("positions", atoms.positions), ("cell", atoms.cell.array)]
        if frameset.energies is not None:
            arrays.append(("energy", frameset.energies[index]))
        if frameset.forces:
            arrays.append(("forces", frameset.forces[index]))
        for name, values in arrays:
            bad = ~np.isfinite(np.asarray(values, dtype=float))
            if bad.any():
                detail = f" (atom {int(np.argwhere(bad)[0][0])})" if name in ("positions", "forces") else ""
                raise DataError(f"{where}: non-finite {name}{detail}: {np.asarray(values)[bad].ravel()[0]}; every value must be a finite number")


# --------------------------------------------------------------------------- keys and units


def detect_keys(frames: Sequence[ase.Atoms], explicit: Mapping[str, str | None] | None = None) -> tuple[Keys, str]:
    """Find where energy, forces and polarizability are stored; return the keys and a one-line report.

    For each quantity an explicit entry that is not None wins (it is not verified
    here: ``checks.keys_present`` does that). Otherwise the candidate of
    ``KEY_CANDIDATES`` found in the most frames is taken (ties: the earlier
    candidate); none found gives None. Unknown quantities in ``explicit`` raise
    DataCheckError.
    """
    explicit = dict(explicit or {})
    unknown = sorted(set(explicit) - set(KEY_CANDIDATES))
    if unknown:
        raise DataCheckError(f"unknown quantity {unknown} in explicit keys; allowed: {', '.join(KEY_CANDIDATES)}")
    chosen: dict[str, str | None] = {}
    parts = []
    for quantity, candidates in KEY_CANDIDATES.items():
        if explicit.get(quantity) is not None:
            key = explicit[quantity]
            found = sum(stored_in(atoms, key) is not None for atoms in frames)
            chosen[quantity] = key
            parts.append(f"{quantity}: {key!r} (given; in {found}/{len(frames)} frames)")
            continue
        counts = {key: sum(stored_in(atoms, key) is not None for atoms in frames) for key in candidates}
        best = max(candidates, key=lambda key: counts[key])  # max keeps the first of equal counts
        if counts[best] == 0:
            chosen[quantity] = None
            parts.append(f"{quantity}: none (tried {', '.join(candidates)})")
            continue
        chosen[quantity] = best
        places = Counter(stored_in(atoms, best) for atoms in frames)
        place = ", ".join(sorted(str(p) for p in places if p))
        parts.append(f"{quantity}: {best!r} ({place}, {counts[best]}/{len(frames)} frames)")
    return Keys(**chosen), "; ".join(parts)


def _unit_factor(table: Mapping[str, float], unit: str, what: str) -> float:
    # Case-insensitive: "hartree" and "HARTREE" mean Hartree; anything else is an error, never a guess.
    by_name = {name.lower(): factor for name, factor in table.items()}
    if unit.lower() not in by_name:
        raise DataCheckError(f"unknown {what} unit {unit!r}; allowed: {', '.join(table)}")
    return by_name[unit.lower()]


def convert_units(
    frames: Sequence[ase.Atoms],
    keys: Keys,
    energy_unit: str = "eV",
    length_unit: str = "Angstrom",
    label: str = "frames",
) -> list[ase.Atoms]:
    """New frames in eV and Angstrom: positions, cell, energy (``keys.energy``) and forces (``keys.forces``).

    Allowed units are the names in ``ENERGY_UNITS`` and ``LENGTH_UNITS`` (any case).
    Energy and forces are stored in the new frames' ``info``/``arrays`` under the
    same keys, wherever they were found, and no calculator is attached (one read
    from the file would still hold the unconverted values). The polarizability
    and every other key are copied unchanged: their units are model conventions
    (the workshop data use atomic units), not this data set's energy and length.
    A frame lacking the energy or forces keeps lacking it (``keys_present`` reports it).
    """
    energy_factor = _unit_factor(ENERGY_UNITS, energy_unit, "energy")
    length_factor = _unit_factor(LENGTH_UNITS, length_unit, "length")
    out = []
    for index, atoms in enumerate(frames):
        new = ase.Atoms(
            atoms.numbers, positions=atoms.positions * length_factor, cell=atoms.cell.array * length_factor, pbc=atoms.pbc
        )
        new.info.update(atoms.info)
        for name, array in atoms.arrays.items():
            if name not in ("numbers", "positions"):
                new.arrays[name] = array.copy()
        if keys.energy is not None and stored_in(atoms, keys.energy) is not None:
            energy = energy_of(atoms, keys.energy)
            new.info[keys.energy] = energy * energy_factor
        if keys.forces is not None and stored_in(atoms, keys.forces) is not None:
            forces = forces_of(atoms, keys.forces)
            if forces is None:
                raise DataCheckError(
                    f"{label}: frame {index}: forces {keys.forces!r} are not an ({len(atoms)}, 3) array of numbers"
                )
            new.arrays[keys.forces] = forces * (energy_factor / length_factor)
        out.append(new)
    return out


@dataclass
class Source:
    """The frames of the configured files, converted to eV and Angstrom, as the checks see them."""

    frames: dict[str, list[ase.Atoms]]  # label (split name or file name) -> frames in file order
    paths: dict[str, Path]
    keys: Keys
    report: str  # what detect_keys found


def explicit_keys(dataset_cfg) -> dict:
    """``dataset.keys`` as {quantity: key or None}: None is detected."""
    keys = dataset_cfg.get("keys") or {}
    return {quantity: keys.get(quantity) for quantity in KEY_CANDIDATES}


def units_of(dataset_cfg) -> tuple[str, str]:
    units = dataset_cfg.get("units") or {}
    return str(units.get("energy") or "eV"), str(units.get("length") or "Angstrom")


def read_source(files: dict[str, str | Path], dataset_cfg, quiet: bool = False) -> Source:
    """Read ``files`` (label -> path), find the keys and convert the units of ``dataset_cfg``."""
    paths = {label: resolve_path(path) for label, path in files.items()}
    raw = {label: read_file(path) for label, path in paths.items()}
    everything = [atoms for frames in raw.values() for atoms in frames]
    keys, report = detect_keys(everything, explicit_keys(dataset_cfg))
    energy_unit, length_unit = units_of(dataset_cfg)
    converted = {
        label: convert_units(frames, keys, energy_unit, length_unit, label=paths[label].name)
        for label, frames in raw.items()
    }
    for quantity, key in explicit_keys(dataset_cfg).items():
        if key is not None and not any(stored_in(atoms, key) for atoms in everything):
            label = next(iter(raw))
            atoms = raw[label][0]
            stored = sorted({*atoms.info, *atoms.arrays, *(getattr(atoms.calc, "results", None) or {})} - {"numbers", "positions"})
            raise DataError(
                f"{paths[label].name}, frame 0: {quantity} key {key!r} is missing (dataset.keys.{quantity}; "
                f"in no frame of {', '.join(p.name for p in paths.values())}); this frame stores {', '.join(stored)}"
            )
    if not quiet:
        print(f"[hpo] data keys: {report}", flush=True)
    return Source(frames=converted, paths=paths, keys=keys, report=report)


# --------------------------------------------------------------------------- e0


def split_isolated_atoms(
    frames: Sequence[ase.Atoms], keys: Keys, label: str = "frames"
) -> tuple[dict[str, float], list[ase.Atoms]]:
    """Separate isolated-atom frames (see :func:`is_isolated_atom`): return e0 per species and the other frames.

    Raises DataCheckError naming file, frames and values when an isolated-atom
    frame has more than one atom or no finite energy, or when two of one species
    differ by more than ``E0_TOLERANCE`` eV.
    """
    e0: dict[str, float] = {}
    source: dict[str, int] = {}
    others = []
    for index, atoms in enumerate(frames):
        if not is_isolated_atom(atoms):
            others.append(atoms)
            continue
        if len(atoms) != 1:
            raise DataCheckError(
                f"{label}: frame {index}: config_type={ISOLATED_CONFIG_TYPE} but {len(atoms)} atoms (expected 1)"
            )
        symbol = atoms.get_chemical_symbols()[0]
        energy = energy_of(atoms, keys.energy)
        if not math.isfinite(energy):
            raise DataCheckError(f"{label}: frame {index}: isolated {symbol} atom has no finite energy {keys.energy!r}")
        if symbol in e0 and abs(e0[symbol] - energy) > E0_TOLERANCE:
            raise DataCheckError(
                f"{label}: isolated {symbol} atoms disagree: frame {source[symbol]} {keys.energy}={e0[symbol]!r}, "
                f"frame {index} {keys.energy}={energy!r}"
            )
        e0[symbol] = energy
        source.setdefault(symbol, index)
    return e0, others


@dataclass(frozen=True)
class E0Conflict:
    """Two files (or splits) whose isolated atoms of one species disagree: the second is ``label``."""

    symbol: str
    first: float
    second: float
    label: str


def isolated_atom_e0(splits: Mapping[str, Sequence[ase.Atoms]], keys: Keys, names: Mapping[str, str] | None = None) -> tuple[dict[str, float], E0Conflict | None]:
    """e0 per species from the isolated-atom frames of every split, and the first conflict between splits.

    ``names``: label -> the name messages use for a split (its file name); DataCheckError for a
    conflict within one split (see :func:`split_isolated_atoms`). The caller words a conflict between
    splits: the data check reports it, loading for a fit refuses it.
    """
    e0: dict[str, float] = {}
    for label, frames in splits.items():
        found, _ = split_isolated_atoms(frames, keys, (names or {}).get(label, label))
        for symbol, energy in found.items():
            if symbol in e0 and abs(e0[symbol] - energy) > E0_TOLERANCE:
                return e0, E0Conflict(symbol, e0[symbol], energy, label)
            e0[symbol] = energy
    return e0, None


def e0_of(dataset_cfg, source: Source) -> tuple[dict[str, float] | None, bool]:
    """(e0 per species or None, average?) of ``dataset.e0``, checked against the species of the data."""
    setting = dataset_cfg.get("e0", "isolated_atoms")
    species = sorted({s for _, _, a in bulk(source.frames) for s in a.get_chemical_symbols()})
    if setting == "average":
        print("[hpo] dataset.e0=average: gap_fit takes e0 as the mean energy per atom of the training set (e0_method=average)", flush=True)
        return None, True
    if isinstance(setting, str):
        if setting not in E0_MODES:
            raise DataError(f"dataset.e0={setting!r} is not allowed: isolated_atoms, average or a mapping {{symbol: eV}}")
        e0, conflict = isolated_atom_e0(source.frames, source.keys, {label: path.name for label, path in source.paths.items()})
        if conflict is not None:
            raise DataError(
                f"isolated {conflict.symbol} atoms disagree between files: {conflict.first!r} and {conflict.second!r} ({conflict.label})"
            )
        missing = [s for s in species if s not in e0]
        if missing:
            raise DataError(
                f"dataset.e0=isolated_atoms: no isolated-atom frame for {', '.join(missing)} in "
                f"{', '.join(p.name for p in source.paths.values())} (a single atom, config_type=isolated_atom); "
                f"add them, or set dataset.e0=average or dataset.e0={{{missing[0]}: ENERGY_eV, ...}}"
            )
        print("[hpo] e0 from isolated atoms: " + ", ".join(f"{s} {e:.8g} eV" for s, e in sorted(e0.items())), flush=True)
        return e0, False
    e0 = {str(symbol): float(value) for symbol, value in dict(setting).items()}
    missing = [s for s in species if s not in e0]
    if missing:
        raise DataError(f"dataset.e0 has no energy for {', '.join(missing)} (species of the data: {', '.join(species)})")
    return e0, False
