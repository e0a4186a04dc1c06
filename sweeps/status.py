"""Atomic file writes and the per-run ``status.json``.

Results are data: every file here is written to a temporary file in the destination folder and renamed over
the target, so a reader (or a run killed mid-write) only ever sees the old file or the new one, never a part.

``status.json`` holds ``state`` (one of :data:`STATES`), ``step``, ``total_steps``, ``error`` and
``updated_at`` (ISO 8601, UTC), plus ``diverged_at`` / ``signal`` where they apply.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# ``interrupted``: stopped cleanly on SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 after a checkpoint; resumable.
STATES = ("pending", "running", "completed", "failed", "diverged", "interrupted")
TERMINAL_STATES = ("completed", "diverged")


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | Path, data: Any, fsync: bool = False) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", fsync=fsync)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# Keys this module owns; other keys of an existing status.json (a dispatcher's ``job_id``, ...) are kept.
OWN_KEYS = ("state", "step", "total_steps", "error", "updated_at", "summary", "diverged_at", "signal",
            "traceback")


def write_status(run_dir: str | Path, state: str, step: int = 0, total_steps: int = 0,
                 error: str | None = None, **extra: Any) -> dict[str, Any]:
    """Replace ``run_dir/status.json`` (keeping keys other writers put there); returns what was written."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; expected one of {', '.join(STATES)}")
    previous = read_status(run_dir)
    kept = {k: v for k, v in previous.items() if k not in OWN_KEYS} if isinstance(previous, dict) else {}
    status = {**kept, "state": state, "step": int(step), "total_steps": int(total_steps), "error": error,
              "updated_at": utc_now(), **extra}
    atomic_write_json(Path(run_dir) / "status.json", status)
    return status


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's status, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None


__all__ = [
    "STATES",
    "TERMINAL_STATES",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_status",
    "utc_now",
    "write_status",
]
