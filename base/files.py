"""The one atomic writer: every result, status, checkpoint, figure and cache entry is written through it.

A file is written to a temporary file in its destination folder, given the results' mode (0644: readable by the
group that shares the results; ``mkstemp`` alone would leave 0600), optionally flushed to disk, and renamed over
the target. A reader, or a process killed mid-write, only ever sees the old file or the new one, never a part;
a failed write leaves the target as it was and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_file(path: str | Path, *, fsync: bool = False, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success it replaces ``path``.

    ``fsync`` flushes the file and its folder to disk before and after the rename (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries (a rename into it), to disk; best effort where the OS refuses."""
    _fsync(Path(path))


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | Path, data: Any, *, fsync: bool = False) -> None:
    """``data`` as indented JSON with sorted keys (values JSON cannot hold are written as their ``str``)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", fsync=fsync)


def read_json(path: str | Path) -> Any | None:
    """The JSON in ``path``, or None when it does not exist or cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


__all__ = ["FILE_MODE", "atomic_file", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_path",
           "read_json"]
