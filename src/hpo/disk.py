"""Disk used by hpo's outputs: the model caches against their bounds and a study's trial directories,
printed at the end of ``optimize`` and ``pipeline``."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from hpo.config import output_path
from hpo.models import kind


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


def no_space_left(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk (or quota): ENOSPC/EDQUOT, or
    SQLite's "database or disk is full" (which SQLAlchemy and Optuna wrap in their own errors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def full_disk_text(exc: BaseException, fallback: str | os.PathLike) -> str:
    """Where the disk is full and how much is free there: the file of the failed write when the error names
    it, else ``fallback`` (e.g. experiments_dir)."""
    found = exc
    while found is not None and not getattr(found, "filename", None):
        found = found.__cause__ or found.__context__
    path = Path(getattr(found, "filename", None) or fallback)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    usage = shutil.disk_usage(probe)
    return f"no space left on the file system of {path} ({size_text(usage.free)} free of {size_text(usage.total)})"


def size_text(n_bytes: int) -> str:
    """Bytes in the unit a reader takes in at a glance: 0.4 MB, 12 MB, 1.3 GB."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    if n_bytes < 1e5:
        return f"{n_bytes / 1e3:.0f} kB"
    return f"{n_bytes / 1e6:.{1 if n_bytes < 1e7 else 0}f} MB"


def disk_report(*cfgs) -> str:
    """What the commands' outputs hold on disk: each model cache against its bound, and the study's trial
    directories (printed at the end of ``optimize`` and ``pipeline``)."""
    lines, seen = ["[hpo] disk:"], set()
    for cfg in cfgs:
        dir_key, max_key = kind(str(cfg.model.kind)).cache_keys or (None, None)
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
