"""The job map, ``results/<sweep>/jobs.json``: every job that ever ran a run of the sweep, and the sweep's driver.

::

    {"sweep": "tiny", "driver": {"pid": 1234, "host": "vm", "executor": "local", ...},
     "runs": {"<run_id>": [{"job_id": "1234", "executor": "local", "submitted_at": 1.7e9, "host": "vm",
                            "pid": 1234, "proc_start": 98765, "gpus": ["0"], "ended_at": ...}, ...]}}

Keys are run ids, or ``tune:<group>:<trial>`` for tune trials. Read-modify-writes hold a file lock, so a driver,
``embscale cancel`` and ``embscale status`` may touch one sweep at the same time; every write is atomic. Also here:
whether a recorded process still lives (pid and start time, so a recycled pid does not count).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embscale.base.files import atomic_write_json, read_json

JOBS_FILE = "jobs.json"


class JobMap:
    """``results/<sweep>/jobs.json``: key -> history of job records, newest last.

    Open it with :meth:`locked` for a read-modify-write (the lock is released and the file written when the block
    ends) or :meth:`load` to read.
    """

    def __init__(self, path: Path, data: dict[str, Any] | None = None):
        self.path = Path(path)
        self.data: dict[str, Any] = data or {}
        self.data.setdefault("runs", {})

    @classmethod
    def load(cls, path: Path) -> JobMap:
        data = read_json(path)
        return cls(path, data if isinstance(data, dict) else None)

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path: Path) -> Iterator[JobMap]:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                job_map = cls.load(path)
                yield job_map
                job_map.save()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    @property
    def runs(self) -> dict[str, list[dict[str, Any]]]:
        return self.data["runs"]

    def history(self, key: str) -> list[dict[str, Any]]:
        return self.runs.get(key, [])

    def latest(self, key: str) -> dict[str, Any] | None:
        history = self.history(key)
        return history[-1] if history else None

    def record(self, key: str, entry: dict[str, Any]) -> dict[str, Any]:
        entry = dict(entry)
        entry.setdefault("submitted_at", time.time())
        self.runs.setdefault(key, []).append(entry)
        return entry

    def update_latest(self, key: str, **fields: Any) -> None:
        latest = self.latest(key)
        if latest is not None:
            latest.update(fields)

    def update_job(self, key: str, job_id: Any, **fields: Any) -> None:
        """Update the record of job ``job_id`` in ``key``'s history (the newest one with that id)."""
        for entry in reversed(self.history(key)):
            if str(entry.get("job_id")) == str(job_id):
                entry.update(fields)
                return


# --------------------------------------------------------------------------------------------- processes
def proc_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):  # a zombie has finished
        return None
    return int(fields[19])


def process_alive(pid: int | None, start: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when ``start`` is given, is the process that started then."""
    if not pid:
        return False
    current = proc_start_time(int(pid))
    if current is None:
        return False
    return start is None or current == int(start)


def hostname() -> str:
    return socket.gethostname()


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch from an ISO string or a number; None when absent or unreadable."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        parsed = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.timestamp()


def first_line(text: Any) -> str:
    lines = [line.strip() for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


__all__ = ["JOBS_FILE", "JobMap", "first_line", "hostname", "parse_time", "proc_start_time", "process_alive"]
