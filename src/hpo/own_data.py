"""Bring your own data: ``dataset=files`` / ``dataset=pool`` and ``python -m hpo data check``.

Wires the pure functions of ``hpo.datacheck`` to the config, the files, MLflow and the CLI:

1. read every file (``dataset.train/val/test`` or ``dataset.files``), find the keys
   (``dataset.keys``, null entries detected and printed), convert to eV and Angstrom (``dataset.units``);
2. e0 (``dataset.e0``): a mapping, ``isolated_atoms`` (taken from the isolated-atom frames of the data)
   or ``average`` (gap_fit's ``e0_method=average``); isolated atoms are then removed from every split;
3. split (``pool``: permuted with ``dataset.split.seed``), check that every frame carries what the model
   needs (errors name the original file, frame and key), and write each split under
   ``experiments_dir/datasets/<digest>/`` with the detected keys: gap_fit reads its training set from there.

The data checks (``run_checks``) see the converted frames as read, isolated atoms included: the splits
of ``dataset=files``, the files of ``dataset=pool``, the workshop files of ``dataset=water``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import ase
import ase.io
import numpy as np

from hpo import datacheck as dc
from hpo.atomic import atomic_write
from hpo.data import (
    DataError,
    DataKeys,
    Datasets,
    FrameSet,
    _frame_energy,
    _frame_forces,
    find_data_dir,
    is_own_data,
    refuse_shared_frames,
    resolve_path,
    sha256sum,
    shared_frames,
    train_file,
)

E0_MODES = ("isolated_atoms", "average")
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def read_file(path: str | Path) -> list[ase.Atoms]:
    """Every frame of an extended XYZ file; DataError naming the file when it cannot be read."""
    path = resolve_path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
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
    return FrameSet(path=path, frames=split.frames, sha256=sha256sum(path), energies=energies, forces=forces)


def prepare(cfg, include_test: bool = True) -> tuple[dict[str, FrameSet], Datasets]:
    """The FrameSets of every split of an own dataset (written for gap_fit) and the fit settings."""
    from hpo.config import output_path
    from hpo.models import kind

    need = kind(cfg.model.kind).targets
    source = read_source(own_files(cfg.dataset, include_test=include_test or cfg.dataset.source == "pool"), cfg.dataset)
    keys = source.keys
    if "force" in need and keys.forces is None:
        print("[hpo] no forces in the data: energies only", flush=True)
    e0, average = _e0(cfg.dataset, source) if "energy" in need else (None, False)
    splits = _splits(cfg, source)
    directory = output_path(cfg.experiments_dir) / "datasets" / f"{cfg.dataset.name}-{_digest(cfg, source, e0, average)}"
    sets = {name: _write(split, directory / f"{name}.xyz", keys, need) for name, split in splits.items()}
    refuse_shared_frames({SPLIT_NAMES[name]: frame_set for name, frame_set in sets.items()})
    fit_keys = DataKeys(energy=keys.energy, force=keys.forces, polarizability=keys.polarizability)
    data = Datasets(train=sets["train"], val=sets["val"], keys=fit_keys, e0=e0, e0_average=average)
    return sets, data


def load(cfg) -> Datasets:
    """``load_datasets`` of ``dataset=files|pool``: training and validation sets."""
    _, data = prepare(cfg, include_test=False)
    print(f"[hpo] own data: {len(data.train)} training, {len(data.val)} validation frames in {data.train.path.parent}", flush=True)
    return data


def load_test(cfg, data: Datasets) -> FrameSet | None:
    """``load_test_set`` of ``dataset=files|pool``: the test split, disjoint from ``data``; None without one."""
    sets, _ = prepare(cfg, include_test=True)
    test = sets.get("test")
    if test is None:
        return None
    refuse_shared_frames({"training": data.train, "validation": data.val, "test": test})
    return test


# --------------------------------------------------------------------------- checks


def check_source(cfg, include_test: bool = True) -> Source:
    """The frames the checks see: ``data.files`` when given, else every split of the dataset config.

    Workshop water set: its training file and validation file (and, with ``include_test``, the frames of
    its test file that are not in the training file), keys from ``dataset.property_keys``.
    """
    files = (cfg.get("data") or {}).get("files")
    dataset = cfg.dataset
    own = is_own_data(dataset)
    settings = dataset if own else {"keys": None, "units": None}
    if files:
        return read_source({Path(str(p)).name: p for p in files}, settings)
    if own:
        return read_source(own_files(dataset, include_test), dataset)
    # the workshop set: keys as configured, eV and Angstrom
    names = [train_file(dataset), dataset.validation_file]
    directory = find_data_dir(dataset, names)
    frames = {name: read_file(directory / name) for name in names}
    paths = {name: directory / name for name in names}
    test = dataset.get("test_file")
    if include_test and test and test not in frames:
        pool = read_file(find_data_dir(dataset, [test]) / test)
        if dataset.get("test_excludes_train"):
            seen = {j for _, j in shared_frames(frames[names[0]], pool)}
            pool = [atoms for j, atoms in enumerate(pool) if j not in seen]
        frames[test], paths[test] = pool, find_data_dir(dataset, [test]) / test
    property_keys = dataset.property_keys
    explicit = {"energy": property_keys.get("energy"), "forces": property_keys.get("force")}
    keys, report = dc.detect_keys([a for f in frames.values() for a in f], explicit)
    print(f"[hpo] data keys: {report}", flush=True)
    return Source(frames=frames, paths=paths, keys=keys, report=report)


def run_checks(cfg, include_test: bool = True) -> tuple[Source, list[dc.Check], str]:
    """Checks of the dataset (or ``data.files``): the source, the checks and the printed table."""
    source = check_source(cfg, include_test)
    checks = dc.run_checks(source.frames, source.keys)
    stats = {label: dc.statistics(frames, source.keys) for label, frames in source.frames.items()}
    return source, checks, dc.render_table(checks, stats)


def verdict_tags(checks: list[dc.Check]) -> dict[str, str]:
    return {f"check.{check.name}": check.verdict for check in checks}


def failure_message(checks: list[dc.Check]) -> str:
    failed = [check for check in checks if check.verdict == "fail"]
    return "data check failed: " + "; ".join(f"{check.name}: {check.message}" for check in failed) + (
        " (python -m hpo data check shows every check)"
    )


def preflight(cfg) -> dict[str, str]:
    """What ``optimize`` runs before any fit: the checks of the training and validation data, printed;
    DataError on a fail. Returns the verdicts as tags (``check.<name>``) for the study's parent run."""
    _, checks, table = run_checks(cfg, include_test=False)
    print(table, flush=True)
    if dc.exit_code(checks):
        raise DataError(failure_message(checks))
    return verdict_tags(checks)


def _tag_safe(name: str) -> str:
    """MLflow tag keys allow letters, digits, _ - . / and spaces only."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def check_command(cfg) -> None:
    """``python -m hpo data check``: table, PNG of the distributions, one MLflow run; exit 1 on a fail."""
    from hpo.config import output_path
    from hpo.tracking import Tracker, provenance_tags

    source, checks, table = run_checks(cfg, include_test=True)
    print(table, flush=True)
    name = cfg.dataset.get("name", "data")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory = output_path(cfg.experiments_dir) / "data_check"
    everything = [atoms for frames in source.frames.values() for atoms in frames]
    title = f"{name}: " + ", ".join(f"{label} ({len(frames)})" for label, frames in source.frames.items())
    plot = dc.distributions_plot(directory / f"{name}-{stamp}.png", everything, source.keys, title)
    report = directory / f"{name}-{stamp}.txt"
    with atomic_write(report) as tmp:
        Path(tmp).write_text(table + "\n")
    tracker = Tracker(cfg.tracking)
    tags = {
        **provenance_tags(),
        **verdict_tags(checks),
        **{f"sha256.{_tag_safe(path.name)}": sha256sum(path) for path in source.paths.values()},
        "run_type": "data_check",
        "command": "data check",
        "data_keys": source.report,
    }
    with tracker.run(f"data-check-{name}", tags=tags) as run_id:
        details = {check.name: {"verdict": check.verdict, "message": check.message, "details": check.details} for check in checks}
        tracker.client.log_text(run_id, json.dumps(details, indent=1, default=str), "data_check.json")
        tracker.log_artifacts(run_id, [plot, report])
    print(f"[hpo] data check: {plot} (MLflow run {run_id})", flush=True)
    code = dc.exit_code(checks)
    if code:
        raise SystemExit(code)
