"""Write files so that a crash never leaves a half-written one under the final name.

Also the one place that knows where an ``sqlite:///`` URL keeps its file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: Path):
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600; outputs are meant to be shared like any file the user writes (umask)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_npz(path: Path, **arrays) -> None:
    """Write an .npz so that readers (parallel workers) see either nothing or the whole file."""
    import numpy as np

    with atomic_write(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def sqlite_file(url: str) -> Path | None:
    """The database file of an ``sqlite:///path`` URL, None for any other URL."""
    if not str(url).startswith("sqlite:///"):
        return None
    return Path(str(url).removeprefix("sqlite:///")).expanduser()


def write_text(path: Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path


@contextlib.contextmanager
def creation_lock(url: str):
    """Serialise first creation of an SQLite database between processes on one machine.

    Two processes creating the same schema at once fail in many ways (alembic
    version conflicts, "table already exists"); holding an flock on a file next
    to the database while opening it avoids the race. Server URLs pass through.
    """
    database = sqlite_file(url)
    if database is None:
        yield
        return
    with file_lock(database.with_suffix(".lock")):
        yield


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive flock on ``path`` (made if missing) for the block: processes on one machine, or on shared
    file systems that honour flock, take turns."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
