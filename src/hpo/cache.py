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

from hpo.atomic import atomic_write_npz


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


def directory_bytes(path: str | os.PathLike | None) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    if path is None or not Path(path).is_dir():
        return 0
    total = 0
    for entry in Path(path).rglob("*"):
        with contextlib.suppress(OSError):  # removed by another worker meanwhile
            if entry.is_file():
                total += entry.stat().st_size
    return total


def size_text(n_bytes: int) -> str:
    """Bytes in the unit a reader takes in at a glance: 0.4 MB, 12 MB, 1.3 GB."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    return f"{n_bytes / 1e6:.{1 if n_bytes < 1e7 else 0}f} MB"


# model kind -> (key of the cache directory, key of its bound in GB) in the model config
CACHE_KEYS = {"gap": ("descriptor_cache_dir", "descriptor_cache_max_gb"), "sagpr": ("cache_dir", "cache_max_gb")}


def disk_report(*cfgs) -> str:
    """What the commands' outputs hold on disk: each model cache against its bound, and the study's trial
    directories (printed at the end of ``optimize`` and ``pipeline``)."""
    from hpo.config import output_path

    lines, seen = ["[hpo] disk:"], set()
    for cfg in cfgs:
        dir_key, max_key = CACHE_KEYS.get(str(cfg.model.kind), (None, None))
        cache_dir = cfg.model.get(dir_key) if dir_key else None
        if cache_dir and ("cache", str(cache_dir)) not in seen:
            seen.add(("cache", str(cache_dir)))
            path = output_path(cache_dir)
            lines.append(
                f"  model.{dir_key} {path}: {size_text(directory_bytes(path))} "
                f"(model.{max_key}={cfg.model[max_key]} GB; deleting it is always safe)"
            )
        trials = output_path(cfg.experiments_dir) / str(cfg.study.name)
        if ("trials", str(trials)) not in seen and trials.is_dir():
            seen.add(("trials", str(trials)))
            lines.append(f"  trial directories {trials}: {size_text(directory_bytes(trials))}")
    return "\n".join(lines)
