"""Training and validation data: find the files, check them, read them with ASE.

The dataset config (``conf/dataset/*.yaml``) names the files and their sha256.
A data directory is looked up in this order: ``dataset.data_dir`` (which defaults
to ``$HPO_DATA_DIR``), each of ``dataset.fallback_dirs`` relative to the project
root, and finally a user cache filled by a checked download.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.io
import numpy as np

from hpo.atomic import atomic_write

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class DataError(ValueError):
    """A data file is missing, malformed or lacks what the model needs."""


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_path(path: str | os.PathLike) -> Path:
    """Resolve a config path: ``~`` expanded, relative paths against the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def find_data_dir(dataset_cfg, wanted: list[str]) -> Path:
    """Return the first configured directory that holds every file in ``wanted``.

    Downloads missing files into ``dataset.cache_dir`` when no local directory
    has them; every downloaded file must match its configured sha256.
    """
    if dataset_cfg.data_dir:
        # An explicit directory is the user's choice: never fall back silently from it.
        explicit = resolve_path(dataset_cfg.data_dir)
        if not explicit.is_dir():
            raise DataError(
                f"dataset.data_dir={dataset_cfg.data_dir!r} is not a directory "
                f"(resolved to {explicit}); set it or HPO_DATA_DIR to the folder with {', '.join(wanted)}"
            )
        missing = [name for name in wanted if not (explicit / name).is_file()]
        if missing:
            raise DataError(f"dataset.data_dir {explicit} lacks {', '.join(missing)}")
        return explicit
    for directory in (resolve_path(d) for d in dataset_cfg.fallback_dirs):
        if all((directory / name).is_file() for name in wanted):
            return directory
    return download(dataset_cfg, wanted)


def download(dataset_cfg, wanted: list[str]) -> Path:
    """Fill the cache directory from ``dataset.download_url``, checking sha256."""
    cache = resolve_path(dataset_cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        expected = dataset_cfg.sha256.get(name)
        if expected is None:
            raise DataError(f"{name} is in no local data directory and dataset.sha256 has no checksum to download it with")
        target = cache / name
        if target.is_file() and sha256sum(target) == expected:
            continue
        url = dataset_cfg.download_url.format(file=name)
        print(f"[hpo] downloading {url}", flush=True)
        partial = target.with_suffix(target.suffix + ".part")
        try:
            urllib.request.urlretrieve(url, partial)
        except OSError as exc:
            raise DataError(
                f"no local copy of {name} (looked in HPO_DATA_DIR and {list(dataset_cfg.fallback_dirs)}) "
                f"and the download from {url} failed: {exc}"
            ) from exc
        actual = sha256sum(partial)
        if actual != expected:
            partial.unlink()
            raise DataError(f"downloaded {name} has sha256 {actual}, expected {expected}; file discarded")
        os.replace(partial, target)
    return cache


@dataclass
class FrameSet:
    """Frames of one extxyz file with the arrays a model needs, checked."""

    path: Path
    frames: list[ase.Atoms]
    sha256: str
    energies: np.ndarray | None = None  # (n,) eV per cell
    forces: list[np.ndarray] = field(default_factory=list)  # per frame (n_atoms, 3)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.array([len(atoms) for atoms in self.frames])


def read_frames(path: Path, keys, need: tuple[str, ...] = ("energy", "force"), e0: dict | None = None) -> FrameSet:
    """Read every frame of ``path`` and check it carries ``need`` (names in ``keys``).

    ``keys`` maps a target (energy, force, polarizability) to the key used in
    the file. With ``e0`` every species must have an isolated-atom energy.
    Errors name the file, the frame index and the key.
    """
    path = Path(path)
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
    energies, forces = [], []
    for index, atoms in enumerate(frames):
        where = f"{path.name}, frame {index}"
        if e0 is not None:
            unknown = sorted(set(atoms.get_chemical_symbols()) - set(e0))
            if unknown:
                raise DataError(f"{where}: species {unknown} have no e0 in the dataset config (dataset.e0)")
        if "energy" in need:
            energies.append(_frame_energy(atoms, keys.energy, where))
        if "force" in need:
            forces.append(_frame_forces(atoms, keys.force, where))
    if "polarizability" in need:
        read_tensors(frames, keys.polarizability, path.name, symmetry_tol=float("inf"))
    found = FrameSet(
        path=path,
        frames=frames,
        sha256=sha256sum(path),
        energies=np.array(energies) if energies else None,
        forces=forces,
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


def check_species_covered(train: FrameSet, other: FrameSet, role: str = "validation") -> None:
    """A species the training set never shows has no model: refuse it before any fit."""
    known = {symbol for atoms in train.frames for symbol in atoms.get_chemical_symbols()}
    for index, atoms in enumerate(other.frames):
        unknown = sorted(set(atoms.get_chemical_symbols()) - known)
        if unknown:
            raise DataError(
                f"{other.path.name}, frame {index}: species {unknown} of the {role} set are not in the training set "
                f"({train.path.name} has {sorted(known)}); a model cannot predict a species it never saw"
            )


def _frame_energy(atoms: ase.Atoms, key: str, where: str) -> float:
    # ASE moves a comment-line `energy` onto a SinglePointCalculator; other keys stay in info.
    if key in atoms.info:
        value = atoms.info[key]
    elif key == "energy" and atoms.calc is not None and "energy" in atoms.calc.results:
        value = atoms.calc.results["energy"]
    else:
        raise DataError(f"{where}: energy key {key!r} is missing (dataset.property_keys.energy)")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: energy key {key!r} is not a number: {value!r}") from exc


def _frame_forces(atoms: ase.Atoms, key: str, where: str) -> np.ndarray:
    if key in atoms.arrays:
        value = atoms.arrays[key]
    elif key in ("force", "forces") and atoms.calc is not None and "forces" in atoms.calc.results:
        value = atoms.calc.results["forces"]
    else:
        raise DataError(f"{where}: per-atom force column {key!r} is missing (dataset.property_keys.force)")
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


def subset_frames(pool: FrameSet, indices: np.ndarray, path: Path) -> FrameSet:
    """The frames ``indices`` of ``pool``, also written to ``path`` (gap_fit reads its training set from a file)."""
    frames = [pool.frames[i] for i in indices]
    with atomic_write(path) as tmp:
        ase.io.write(tmp, frames, format="extxyz")
    return FrameSet(
        path=path,
        frames=frames,
        sha256=sha256sum(path),
        energies=pool.energies[indices] if pool.energies is not None else None,
        forces=[pool.forces[i] for i in indices] if pool.forces else [],
    )


def joined_frames(sets: list[FrameSet], path: Path) -> FrameSet:
    """Several frame sets as one (e.g. training + validation for k-fold cross-validation), written to ``path``."""
    frames = [atoms for s in sets for atoms in s.frames]
    with atomic_write(path) as tmp:
        ase.io.write(tmp, frames, format="extxyz")
    energies = [s.energies for s in sets]
    return FrameSet(
        path=path,
        frames=frames,
        sha256=sha256sum(path),
        energies=np.concatenate(energies) if all(e is not None for e in energies) else None,
        forces=[f for s in sets for f in s.forces] if all(s.forces for s in sets) else [],
    )


def train_file(dataset_cfg) -> str:
    files = {int(k): v for k, v in dataset_cfg.train_files.items()}
    return files[int(dataset_cfg.train_size)]


@dataclass
class Datasets:
    """The training and validation frames of one run (the test frames are read by ``load_test_set`` only)."""

    train: FrameSet
    val: FrameSet

    @property
    def hashes(self) -> dict[str, str]:
        return {f"sha256.{self.train.path.name}": self.train.sha256, f"sha256.{self.val.path.name}": self.val.sha256}


def load_datasets(cfg) -> Datasets:
    """Find and read the training file of ``dataset.train_size`` and the validation file."""
    from hpo.models import kind

    names = [train_file(cfg.dataset), cfg.dataset.validation_file]
    data_dir = find_data_dir(cfg.dataset, names)
    need = kind(cfg.model.kind).targets
    e0 = dict(cfg.dataset.e0) if "energy" in need else None
    train = read_frames(data_dir / names[0], cfg.dataset.property_keys, need, e0)
    val = read_frames(data_dir / cfg.dataset.validation_file, cfg.dataset.property_keys, need, e0)
    check_species_covered(train, val)
    refuse_shared_frames({"training": train, "validation": val})
    return Datasets(train=train, val=val)


def shared_frames(a: list[ase.Atoms], b: list[ase.Atoms]) -> list[tuple[int, int]]:
    """Index pairs (i in a, j in b) of identical frames (same species, positions, cell, pbc, bit for bit)."""
    from hpo.cache import frame_digests

    where = {}
    for i, key in enumerate(frame_digests(a)):
        where.setdefault(key, i)
    return [(where[key], j) for j, key in enumerate(frame_digests(b)) if key in where]


def refuse_shared_frames(splits: dict[str, FrameSet]) -> None:
    """A frame in two splits leaks what a model is judged on into what it learns or is chosen by."""
    names = list(splits)
    for x, first in enumerate(names):
        for second in names[x + 1 :]:
            pairs = shared_frames(splits[first].frames, splits[second].frames)
            if pairs:
                shown = ", ".join(f"{i}<->{j}" for i, j in pairs[:10])
                raise DataError(
                    f"{len(pairs)} frame(s) of the {first} set ({splits[first].path.name}) are also in the {second} set "
                    f"({splits[second].path.name}); frame indices {first}<->{second}: {shown}"
                    f"{' ...' if len(pairs) > 10 else ''}. Splits must be disjoint."
                )


def load_test_set(cfg, data: Datasets) -> FrameSet | None:
    """The test frames of the dataset config, disjoint from training and validation; None if it has none.

    Only ``promote`` calls this, once, for the model it registers: no trial, sweep, learning curve or
    promotion rule reads the test set, so its errors are free of the optimism of selection. With
    ``dataset.test_excludes_train`` the frames of ``dataset.test_file`` that are in the training set are
    dropped (the workshop files are nested: gap_input_400.xyz contains every smaller training file).
    """
    from hpo.models import kind

    name = cfg.dataset.get("test_file")
    if not name:
        return None
    path = find_data_dir(cfg.dataset, [name]) / name
    need = kind(cfg.model.kind).targets
    pool = read_frames(path, cfg.dataset.property_keys, need, dict(cfg.dataset.e0) if "energy" in need else None)
    keep = np.arange(len(pool))
    if cfg.dataset.get("test_excludes_train"):
        in_train = {j for _, j in shared_frames(data.train.frames, pool.frames)}
        keep = np.array([j for j in keep if j not in in_train], dtype=int)
        if not len(keep):
            return None
        target = resolve_path(cfg.experiments_dir).resolve() / "test_splits" / f"{path.stem}-minus-{data.train.path.stem}.xyz"
        pool = subset_frames(pool, keep, target)
    refuse_shared_frames({"training": data.train, "validation": data.val, "test": pool})
    return pool
