"""Checkpoints: atomic, checksummed, the last few kept, loaded with ``weights_only=True``.

``<run>/checkpoints/step_00001200.pt`` holds a plain dict (tensors, numbers, strings, lists, dicts: nothing
that needs unpickling code) and ``step_00001200.pt.sha256`` its sha256. The ``.pt`` is written to a temporary
file, flushed to disk and renamed, then the checksum file the same way; a checkpoint without its checksum file
is incomplete and never loaded. Loading tries the newest checkpoint first; one whose checksum does not match,
or that does not load, is renamed ``*.corrupt`` (kept for inspection, never deleted) and the one before is
used.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from sweeps.progress import log
from sweeps.status import atomic_write_bytes, atomic_write_text

CHECKPOINT_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints (``.pt`` with a ``.sha256`` beside it), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.with_name(path.name + ".sha256").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep`` checkpoints."""
    folder = Path(folder)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(folder, step)
    # A stale checksum of an older checkpoint at this step must not vouch for the new file being written.
    path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    atomic_write_bytes(path, data, fsync=True)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_text(path.with_name(path.name + ".sha256"), digest + "\n", fsync=True)
    _fsync_folder(folder)
    for _, old in list_checkpoints(folder)[:-keep]:
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify_checkpoint(path: str | Path) -> bool:
    """Whether the file's sha256 matches its ``.sha256`` file."""
    path = Path(path)
    try:
        expected = path.with_name(path.name + ".sha256").read_text().strip()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return False
    return digest == expected


def load_latest_checkpoint(folder: str | Path,
                           map_location: str | torch.device = "cpu") -> tuple[int, dict[str, Any]] | None:
    """``(step, state)`` of the newest intact checkpoint, or None when there is none.

    Corrupt or truncated checkpoints met on the way are renamed ``*.corrupt`` and reported, and temporary
    files of a save that was killed are removed.
    """
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(".step_*.tmp"):
            leftover.unlink(missing_ok=True)
    for step, path in reversed(list_checkpoints(folder)):
        problem = None
        if not verify_checkpoint(path):
            problem = "checksum mismatch (truncated or corrupt)"
        else:
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # unpickling errors come in many types
                problem = f"cannot be loaded: {exc}"
        if problem is None:
            return step, state
        log(f"checkpoint {path} is unusable ({problem}); falling back to the previous one")
        _quarantine(path)
    return None


def _quarantine(path: Path) -> None:
    for item in (path, path.with_name(path.name + ".sha256")):
        if item.exists():
            os.replace(item, item.with_name(item.name + ".corrupt"))


__all__ = ["checkpoint_path", "list_checkpoints", "load_latest_checkpoint", "save_checkpoint",
           "verify_checkpoint"]
