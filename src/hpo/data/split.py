"""Splits: which frames train, validate and test a model, and the guarantees between them.

A pool is permuted with a seed (``pool_indices``); every split keeps file order and where each frame came
from, so a message about a frame names its original file and index. Splits must be disjoint, and a species
outside the training set has no model: both are refused before any fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ase
import ase.io
import numpy as np

from hpo.safe_files import atomic_write
from hpo.cache import frame_digests
from hpo.data.read import FrameSet, Source, bulk, sha256sum
from hpo.errors import DataError

SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


@dataclass
class Split:
    """Frames of one split with where each came from (file name and index in its file), for messages."""

    frames: list[ase.Atoms]
    origin: list[tuple[str, int]]

    def take(self, indices) -> "Split":
        return Split([self.frames[i] for i in indices], [self.origin[i] for i in indices])


def bulk_split(source: Source, labels) -> Split:
    """The frames of ``labels`` (in order) that are not isolated atoms, with their origin."""
    found = Split([], [])
    for label, index, atoms in bulk({label: source.frames[label] for label in labels}):
        found.frames.append(atoms)
        found.origin.append((source.paths[label].name, index))
    return found


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


def own_splits(dataset_cfg, source: Source) -> dict[str, Split]:
    """``dataset=files``: each file is its split; ``dataset=pool``: the files' frames split by ``pool_indices``.
    Isolated atoms are in no split (they gave e0)."""
    if dataset_cfg.source == "files":
        return {label: bulk_split(source, [label]) for label in source.frames}
    pool = bulk_split(source, list(source.frames))
    train_size = dataset_cfg.get("train_size")
    parts = pool_indices(
        len(pool.frames), float(dataset_cfg.split.val), float(dataset_cfg.split.test), int(dataset_cfg.split.seed),
        None if train_size is None else int(train_size),
    )
    return {name: pool.take(indices) for name, indices in parts.items() if len(indices)}


def shared_frames(a: list[ase.Atoms], b: list[ase.Atoms]) -> list[tuple[int, int]]:
    """Index pairs (i in a, j in b) of identical frames (same species, positions, cell, pbc, bit for bit)."""
    where = {}
    for i, key in enumerate(frame_digests(a)):
        where.setdefault(key, i)
    return [(where[key], j) for j, key in enumerate(frame_digests(b)) if key in where]


def outside(train: list[ase.Atoms], pool: list[ase.Atoms]) -> list[int]:
    """Indices of the frames of ``pool`` not in ``train``: the workshop's test file contains every smaller
    training file, and a frame a model learned from cannot test it."""
    seen = {j for _, j in shared_frames(train, pool)}
    return [j for j in range(len(pool)) if j not in seen]


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
        keys=pool.keys,
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
        keys=sets[0].keys,
    )
