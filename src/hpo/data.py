"""Training and validation data: find the files, check them, read them with ASE.

The dataset config (``conf/dataset/*.yaml``) names the files and their sha256.
A data directory is looked up in this order: ``dataset.data_dir`` (which defaults
to ``$HPO_DATA_DIR``), each of ``dataset.fallback_dirs`` relative to the source
checkout (relative to the working directory when hpo is installed), and finally
a user cache filled by a checked download.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.io
import numpy as np

from hpo import datacheck as dc
from hpo.atomic import atomic_write
from hpo.paths import resolve_path


class DataError(ValueError):
    """A data file is missing, malformed or lacks what the model needs."""


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
                f"no local copy of {name} (looked in HPO_DATA_DIR and {[str(resolve_path(d)) for d in dataset_cfg.fallback_dirs]}) "
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


@dataclass(frozen=True)
class DataKeys:
    """Where a data set stores each quantity (``None``: it does not have it), in the spelling of
    ``dataset.property_keys`` (energy, force, polarizability)."""

    energy: str | None = "energy"
    force: str | None = "force"
    polarizability: str | None = None

    @classmethod
    def of(cls, dataset_cfg) -> "DataKeys":
        """The keys of a dataset config with ``property_keys`` (the workshop water set)."""
        keys = dataset_cfg.property_keys
        return cls(energy=keys.get("energy"), force=keys.get("force"), polarizability=keys.get("polarizability"))


def read_frames(path: Path, keys, need: tuple[str, ...] = ("energy", "force"), e0: dict | None = None) -> FrameSet:
    """Read every frame of ``path`` and check it carries ``need`` (names in ``keys``).

    ``keys`` maps a target (energy, force, polarizability) to the key used in
    the file. With ``e0`` every species must have an isolated-atom energy.
    Errors name the file, the frame index and the key.
    """
    path = Path(path)
    frames = read_file(path)
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


def _frame_energy(atoms: ase.Atoms, key: str, where: str, setting: str = "dataset.property_keys.energy") -> float:
    # ASE moves a comment-line `energy` onto a SinglePointCalculator; other keys stay in info.
    if key in atoms.info:
        value = atoms.info[key]
    elif key == "energy" and atoms.calc is not None and "energy" in atoms.calc.results:
        value = atoms.calc.results["energy"]
    else:
        raise DataError(f"{where}: energy key {key!r} is missing ({setting})")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: energy key {key!r} is not a number: {value!r}") from exc


def _frame_forces(atoms: ase.Atoms, key: str, where: str, setting: str = "dataset.property_keys.force") -> np.ndarray:
    if key in atoms.arrays:
        value = atoms.arrays[key]
    elif key in ("force", "forces") and atoms.calc is not None and "forces" in atoms.calc.results:
        value = atoms.calc.results["forces"]
    else:
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
    """The training and validation frames of one run (the test frames are read by ``load_test_set`` only).

    ``keys`` and ``e0`` are what gap_fit is told (key names in ``train.path``, isolated-atom energies in
    eV, ``e0_average``: gap_fit's ``e0_method=average`` instead); ``None``: those of the dataset config
    (``dataset.property_keys``, ``dataset.e0``), as for the workshop water set.
    """

    train: FrameSet
    val: FrameSet
    keys: DataKeys | None = None
    e0: dict[str, float] | None = None
    e0_average: bool = False

    def fit_keys(self, dataset_cfg) -> DataKeys:
        return self.keys if self.keys is not None else DataKeys.of(dataset_cfg)

    def fit_e0(self, dataset_cfg) -> dict[str, float] | None:
        """Isolated-atom energies for gap_fit; None: ``e0_method=average``."""
        if self.e0_average:
            return None
        return dict(self.e0) if self.e0 is not None else dict(dataset_cfg.e0)

    def solver_e0(self, dataset_cfg) -> dict[str, float]:
        """Isolated-atom energies for hpo's own solver: with ``e0_average`` the value gap_fit's
        ``e0_method=average`` takes (the mean over training frames of energy per atom, every species)."""
        if not self.e0_average:
            return self.fit_e0(dataset_cfg)
        mean = float(np.mean(self.train.energies / self.train.n_atoms))
        return {symbol: mean for symbol in sorted({s for atoms in self.train.frames for s in atoms.get_chemical_symbols()})}

    @property
    def hashes(self) -> dict[str, str]:
        return {f"sha256.{self.train.path.name}": self.train.sha256, f"sha256.{self.val.path.name}": self.val.sha256}


def is_own_data(dataset_cfg) -> bool:
    """``dataset=files`` or ``dataset=pool``: a user's own files (``load_own``), not the workshop set."""
    return dataset_cfg.get("source") in ("files", "pool")


def load_datasets(cfg) -> Datasets:
    """Find and read the training file of ``dataset.train_size`` and the validation file.

    Own data (``dataset=files|pool``): keys detected, units converted, isolated atoms taken out and the
    splits written under ``experiments_dir/datasets/`` (``load_own``).
    """
    data = load_own(cfg) if is_own_data(cfg.dataset) else _load_workshop(cfg)
    resolve_data_defaults(cfg, data)
    return data


def resolve_data_defaults(cfg, data: Datasets) -> None:
    """Model parameters set to ``auto`` take the values the model kind derives from these data
    (``ModelKind.data_defaults``), written into ``cfg.model`` and said in one line each."""
    from omegaconf import OmegaConf

    from hpo.models import kind

    params = OmegaConf.to_container(cfg.model, resolve=True)
    for name, (value, why) in kind(params["kind"]).data_defaults(params, data).items():
        OmegaConf.update(cfg, f"model.{name}", value, force_add=True)
        print(f"[hpo] model.{name}=auto -> {value} ({why})", flush=True)


def _load_workshop(cfg) -> Datasets:
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

    if is_own_data(cfg.dataset):
        return load_own_test(cfg, data)
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

# --------------------------------------------------------------------------- own data (dataset=files|pool)
#
# 1. read every file (``dataset.train/val/test`` or ``dataset.files``), find the keys (``dataset.keys``,
#    null entries detected and printed), convert to eV and Angstrom (``dataset.units``);
# 2. e0 (``dataset.e0``): a mapping, ``isolated_atoms`` (from the isolated-atom frames of the data) or
#    ``average`` (gap_fit's ``e0_method=average``); isolated atoms are then removed from every split;
# 3. split (``pool``: permuted with ``dataset.split.seed``), check that every frame carries what the model
#    needs (errors name the original file, frame and key), and write each split under
#    ``experiments_dir/datasets/<name>-<digest>/`` with the detected keys: gap_fit reads its training set there.

E0_MODES = ("isolated_atoms", "average")
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


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


def _explicit_keys(dataset_cfg) -> dict:
    keys = dataset_cfg.get("keys") or {}
    return {quantity: keys.get(quantity) for quantity in dc.KEY_CANDIDATES}


def _units(dataset_cfg) -> tuple[str, str]:
    units = dataset_cfg.get("units") or {}
    return str(units.get("energy") or "eV"), str(units.get("length") or "Angstrom")


@dataclass
class Source:
    """The frames of the configured files, converted to eV and Angstrom, as the checks see them."""

    frames: dict[str, list[ase.Atoms]]  # label (split name or file name) -> frames in file order
    paths: dict[str, Path]
    keys: dc.Keys
    report: str  # what detect_keys found


def read_source(files: dict[str, str | Path], dataset_cfg, quiet: bool = False) -> Source:
    """Read ``files`` (label -> path), find the keys and convert the units of ``dataset_cfg``."""
    paths = {label: resolve_path(path) for label, path in files.items()}
    raw = {label: read_file(path) for label, path in paths.items()}
    everything = [atoms for frames in raw.values() for atoms in frames]
    try:
        keys, report = dc.detect_keys(everything, _explicit_keys(dataset_cfg))
        energy_unit, length_unit = _units(dataset_cfg)
        converted = {
            label: dc.convert_units(frames, keys, energy_unit, length_unit, label=paths[label].name)
            for label, frames in raw.items()
        }
    except dc.DataCheckError as exc:
        raise DataError(str(exc)) from exc
    for quantity, key in _explicit_keys(dataset_cfg).items():
        if key is not None and not any(dc._where(atoms, key) for atoms in everything):
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


def own_files(dataset_cfg, include_test: bool = True) -> dict[str, str]:
    """label -> path of an own dataset: train/val[/test] for ``files``, the file names for ``pool``."""
    if dataset_cfg.source == "files":
        files = {"train": dataset_cfg.train, "val": dataset_cfg.val}
        if include_test and dataset_cfg.get("test"):
            files["test"] = dataset_cfg.test
        return files
    files = {}
    for path in dataset_cfg.files:
        label = Path(str(path)).name
        if label in files:  # two files of one name in different directories
            label = f"{Path(str(path)).parent.name}/{label}"
        files[label] = path
    return files


# --------------------------------------------------------------------------- splits for fitting


@dataclass
class Split:
    """Frames of one split with where each came from (label and index in its file), for messages."""

    frames: list[ase.Atoms]
    origin: list[tuple[str, int]]


def _e0(dataset_cfg, source: Source) -> tuple[dict[str, float] | None, bool]:
    """(e0 per species or None, average?) of ``dataset.e0``, checked against the species of the data."""
    setting = dataset_cfg.get("e0", "isolated_atoms")
    species = sorted({s for frames in source.frames.values() for a in frames if not dc.is_isolated_atom(a) for s in a.get_chemical_symbols()})
    if setting == "average":
        print("[hpo] dataset.e0=average: gap_fit takes e0 as the mean energy per atom of the training set (e0_method=average)", flush=True)
        return None, True
    if isinstance(setting, str):
        if setting != "isolated_atoms":
            raise DataError(f"dataset.e0={setting!r} is not allowed: isolated_atoms, average or a mapping {{symbol: eV}}")
        e0: dict[str, float] = {}
        for label, frames in source.frames.items():
            try:
                found, _ = dc.split_isolated_atoms(frames, source.keys, source.paths[label].name)
            except dc.DataCheckError as exc:
                raise DataError(str(exc)) from exc
            for symbol, energy in found.items():
                if symbol in e0 and abs(e0[symbol] - energy) > dc.E0_TOLERANCE:
                    raise DataError(f"isolated {symbol} atoms disagree between files: {e0[symbol]!r} and {energy!r} ({label})")
                e0[symbol] = energy
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


def _bulk(source: Source, label: str) -> Split:
    frames, origin = [], []
    for index, atoms in enumerate(source.frames[label]):
        if not dc.is_isolated_atom(atoms):
            frames.append(atoms)
            origin.append((source.paths[label].name, index))
    return Split(frames, origin)


def _take(split: Split, indices) -> Split:
    return Split([split.frames[i] for i in indices], [split.origin[i] for i in indices])


def pool_indices(n: int, val: float, test: float, seed: int, train_size: int | None = None) -> dict[str, np.ndarray]:
    """Indices of train/val/test in a pool of ``n`` frames, each sorted (file order).

    A permutation of ``n`` by ``numpy.random.default_rng(seed)``: its first round(test n) are test, the
    next round(val n) validation, the rest the training pool, of which ``train_size`` takes the first
    (so a smaller training set is a subset of a larger one, and val/test do not depend on it).
    """
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(test * n)), int(round(val * n))
    rest = order[n_test + n_val :]
    if train_size is not None:
        if train_size > len(rest):
            raise DataError(f"dataset.train_size={train_size} is more than the {len(rest)} training frames of the pool ({n} frames)")
        rest = rest[:train_size]
    parts = {"train": rest, "val": order[n_test : n_test + n_val], "test": order[:n_test]}
    for name in ("train", "val"):
        if not len(parts[name]):
            raise DataError(f"dataset=pool: the {SPLIT_NAMES[name]} split of {n} frames is empty (dataset.split, dataset.train_size)")
    return {name: np.sort(indices) for name, indices in parts.items()}


def _splits(cfg, source: Source) -> dict[str, Split]:
    dataset = cfg.dataset
    if dataset.source == "files":
        return {label: _bulk(source, label) for label in source.frames}
    pool = Split([], [])
    for label in source.frames:
        bulk = _bulk(source, label)
        pool.frames += bulk.frames
        pool.origin += bulk.origin
    train_size = dataset.get("train_size")
    parts = pool_indices(
        len(pool.frames), float(dataset.split.val), float(dataset.split.test), int(dataset.split.seed),
        None if train_size is None else int(train_size),
    )
    return {name: _take(pool, indices) for name, indices in parts.items() if len(indices)}


def _require(split: Split, keys: dc.Keys, need: tuple[str, ...]) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Energies and forces of a split; DataError naming the original file, frame and key of a missing one."""
    energies, forces = [], []
    for atoms, (name, index) in zip(split.frames, split.origin):
        where = f"{name}, frame {index}"
        if "energy" in need:
            if keys.energy is None:
                raise DataError(f"{where}: no energy key found (tried {', '.join(dc.KEY_CANDIDATES['energy'])}); set dataset.keys.energy")
            energies.append(_frame_energy(atoms, keys.energy, where, "dataset.keys.energy"))
        if "force" in need and keys.forces is not None:
            forces.append(_frame_forces(atoms, keys.forces, where, "dataset.keys.forces"))
        if "polarizability" in need:
            if keys.polarizability is None:
                raise DataError(f"{where}: no polarizability key found; set dataset.keys.polarizability")
            if dc.tensor_of(atoms, keys.polarizability) is None:
                raise DataError(f"{where}: polarizability key {keys.polarizability!r} is missing or not 9 numbers (dataset.keys.polarizability)")
    bad = [(o, e) for o, e in zip(split.origin, energies) if not math.isfinite(e)]
    if bad:
        (name, index), value = bad[0]
        raise DataError(f"{name}, frame {index}: energy {keys.energy!r} is not finite: {value!r}")
    return (np.array(energies) if energies else None), forces


def _digest(cfg, source: Source, e0, average: bool) -> str:
    """Names the directory of the written splits: everything they depend on."""
    dataset = cfg.dataset
    recipe = {
        "files": {label: sha256sum(path) for label, path in source.paths.items()},
        "keys": source.keys.__dict__,
        "units": _units(dataset),
        "e0": e0,
        "average": average,
        "split": dict(dataset.get("split") or {}),
        "train_size": dataset.get("train_size"),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write(split: Split, path: Path, keys: dc.Keys, need) -> FrameSet:
    energies, forces = _require(split, keys, need)
    with atomic_write(path) as tmp:  # replaced whole: a worker's gap_fit reading the old copy is unaffected
        ase.io.write(tmp, split.frames, format="extxyz")
    found = FrameSet(path=path, frames=split.frames, sha256=sha256sum(path), energies=energies, forces=forces)
    check_finite(found)
    return found


def prepare(cfg, include_test: bool = True, need: tuple[str, ...] | None = None) -> tuple[dict[str, FrameSet], Datasets]:
    """The FrameSets of every split of an own dataset (written for gap_fit) and the fit settings.

    ``need``: the quantities every frame must carry; None: the targets of the config's model kind.
    """
    from hpo.models import kind

    need = kind(cfg.model.kind).targets if need is None else need
    source = read_source(own_files(cfg.dataset, include_test=include_test or cfg.dataset.source == "pool"), cfg.dataset)
    keys = source.keys
    if "force" in need and keys.forces is None:
        print("[hpo] no forces in the data: energies only", flush=True)
    e0, average = _e0(cfg.dataset, source) if "energy" in need else (None, False)
    splits = _splits(cfg, source)
    directory = resolve_path(cfg.experiments_dir).resolve() / "datasets" / f"{cfg.dataset.name}-{_digest(cfg, source, e0, average)}"
    sets = {name: _write(split, directory / f"{name}.xyz", keys, need) for name, split in splits.items()}
    refuse_shared_frames({SPLIT_NAMES[name]: frame_set for name, frame_set in sets.items()})
    for name in sets.keys() - {"train"}:
        check_species_covered(sets["train"], sets[name], SPLIT_NAMES[name])
    fit_keys = DataKeys(energy=keys.energy, force=keys.forces, polarizability=keys.polarizability)
    data = Datasets(train=sets["train"], val=sets["val"], keys=fit_keys, e0=e0, e0_average=average)
    return sets, data


def load_own(cfg, need: tuple[str, ...] | None = None) -> Datasets:
    """``load_datasets`` of ``dataset=files|pool``: training and validation sets (``need``: see ``prepare``)."""
    _, data = prepare(cfg, include_test=False, need=need)
    print(f"[hpo] own data: {len(data.train)} training, {len(data.val)} validation frames in {data.train.path.parent}", flush=True)
    return data


def load_own_test(cfg, data: Datasets) -> FrameSet | None:
    """``load_test_set`` of ``dataset=files|pool``: the test split, disjoint from ``data``; None without one."""
    sets, _ = prepare(cfg, include_test=True)
    test = sets.get("test")
    if test is None:
        return None
    refuse_shared_frames({"training": data.train, "validation": data.val, "test": test})
    return test
