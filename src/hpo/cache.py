"""On-disk, content-addressed cache of arrays shared by worker processes.

Keys are sha256 digests of everything a cached array depends on (frames bit for
bit, hyperparameters, package versions), so a hit can never be stale; files are
written by temp-and-rename, so a reader sees a whole file or none; entries are
evicted least-recently-used past a size bound. Deleting the directory is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import ase
import numpy as np

from hpo.safe_files import atomic_write_npz


def frame_digests(frames: Sequence[ase.Atoms]) -> list[str]:
    """sha256 of what the features depend on: numbers, positions, cell, pbc.

    Bit-exact on purpose: a frame that moved by 1e-15 gets a new digest, so a
    cache hit can never return features of a different geometry.
    """
    out = []
    for atoms in frames:
        h = hashlib.sha256()
        for array, dtype in (
            (atoms.numbers, np.int64),
            (atoms.positions, np.float64),
            (atoms.cell.array, np.float64),
            (atoms.pbc, np.bool_),
        ):
            h.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
        out.append(h.hexdigest())
    return out


def digest_array(array: np.ndarray) -> str:
    """sha256 of an array's values (float64, C order) and shape."""
    array = np.ascontiguousarray(array, dtype=np.float64)
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


def digest(*parts: Any) -> str:
    """Stable sha256 of JSON-serialisable parts (used as cache file names)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """Arrays of a cached .npz, or None if absent or unreadable (then recompute)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError):
        return None


class Cache:
    """On-disk, content-addressed store of intermediate arrays.

    Layout: ``<cache_dir>/<kind>/<key[:2]>/<key>.npz`` with kinds
      raw            raw features of one frame (key: frame + rc, sigma, n_max, l_max, species)
      fit            normalised training features + FPS columns and A matrices
                     (key: raw key + nc + seed + the training frames)
      train_kernels  K0, K2 of the training set (key: fit key + zeta)
      test_kernels   K0, K2 of predicted frames vs training set (key: fit key + zeta + frames)
    A refit changing only reg0/reg2 therefore loads kernels and solves; one
    changing zeta reuses the features; a fit on a subset of seen frames
    reuses their raw features. Raw entries are the bulk (about 1.1 MB per
    12-atom frame at n_max=8, l_max=6: 330 MB for the 300 workshop frames,
    per (rc, sigma, n_max, l_max)); deleting the directory is always safe.
    With ``cache_dir=None`` every method is a no-op miss.
    """

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.root = None if cache_dir is None else Path(cache_dir)
        self.stats: Counter = Counter()

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.npz"

    def get(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        if self.root is None:
            return None
        path = self._path(kind, key)
        arrays = load_npz(path)
        self.stats[f"{kind}_{'miss' if arrays is None else 'hit'}"] += 1
        if arrays is not None:
            with contextlib.suppress(FileNotFoundError):  # trimmed by another worker meanwhile
                path.touch()  # mtime = last use, so trim() evicts the least recently used entries
        return arrays

    def put(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is not None:
            atomic_write_npz(self._path(kind, key), **arrays)

    def trim(self, max_bytes: int) -> int:
        """Delete least recently used entries until the cache holds at most ``max_bytes``; return bytes freed.

        Safe with parallel workers: a reader that loses an entry just recomputes it.
        """
        if self.root is None or not self.root.is_dir():
            return 0
        entries = []
        for path in self.root.rglob("*.npz"):
            try:
                info = path.stat()
            except FileNotFoundError:  # removed by another worker meanwhile
                continue
            entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, path in sorted(entries):
            if total - freed <= max_bytes:
                break
            path.unlink(missing_ok=True)
            freed += size
        return freed

