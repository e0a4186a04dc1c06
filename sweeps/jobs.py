"""What the dispatcher keeps on disk: run states, the job map, and whether a recorded job is still alive.

Per run, ``results/<sweep>/<run_id>/status.json`` is the truth about the run (the trainer writes it while it
trains; the dispatcher writes ``queued`` before a job starts and ``cancelled``/``pending`` when it takes a run
back). Per sweep, ``results/<sweep>/jobs.json`` maps every run id to the history of jobs that ran it::

    {"sweep": "tiny", "driver": {...}, "runs": {"<run_id>": [{"job_id": "1234", "executor": "local",
     "submitted_at": 1.7e9, "host": "vm", "pid": 1234, "proc_start": 98765, "gpus": ["0"], ...}, ...]}}

Every write is atomic (temporary file, then rename) and read-modify-writes of the job map hold a file lock,
so a driver, ``embscale cancel`` and ``embscale status`` may touch one sweep at the same time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sweeps.status import atomic_write_json, utc_now
from sweeps.status import read_status as _read_status

STATUS_FILE = "status.json"
RUN_FILE = "run.json"
JOBS_FILE = "jobs.json"

# States written to status.json (the trainer writes the first six, the dispatcher the others).
TERMINAL_STATES = ("completed", "failed", "diverged")
FAILED_STATES = ("failed", "diverged")
IN_FLIGHT_STATES = ("queued", "running")
# Display states that reconciliation adds: a run whose job vanished.
LOST = "lost"  # status says running, no job runs it any more
FAILED_TO_START = "failed-to-start"  # status says queued, its job is gone and never started training


# --------------------------------------------------------------------------------------------- files
def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same folder and a rename."""
    atomic_write_json(path, data)


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it does not exist or cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------- run status
def now_iso() -> str:
    return utc_now()


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


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's status.json, or None when the run never had one."""
    status = _read_status(run_dir)
    return status if isinstance(status, dict) else None


def run_state(run_dir: Path) -> str:
    """The state in the run's status.json; ``pending`` when there is none."""
    status = read_status(run_dir)
    return str(status.get("state", "pending")) if status else "pending"


def write_status(run_dir: Path, state: str, **fields: Any) -> dict[str, Any]:
    """Set the run's state, keeping the other fields of its status.json (step, total_steps, ...)."""
    status = read_status(run_dir) or {"step": 0, "total_steps": None, "error": None}
    status.update(fields)
    status["state"] = state
    status["updated_at"] = now_iso()
    if state not in ("failed", "diverged") and "error" not in fields:
        status["error"] = None
    write_json_atomic(Path(run_dir) / STATUS_FILE, status)
    return status


def first_line(text: Any) -> str:
    lines = [line.strip() for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


# --------------------------------------------------------------------------------------------- processes
def proc_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
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


# --------------------------------------------------------------------------------------------- job map
class JobMap:
    """``results/<sweep>/jobs.json``: run id -> history of job records, newest last.

    Open it with :meth:`locked` for a read-modify-write (the lock is released and the file written when the
    block ends) or :meth:`load` to read.
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
        write_json_atomic(self.path, self.data)

    @property
    def runs(self) -> dict[str, list[dict[str, Any]]]:
        return self.data["runs"]

    def history(self, run_id: str) -> list[dict[str, Any]]:
        return self.runs.get(run_id, [])

    def latest(self, run_id: str) -> dict[str, Any] | None:
        history = self.history(run_id)
        return history[-1] if history else None

    def record(self, run_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        entry = dict(entry)
        entry.setdefault("submitted_at", time.time())
        self.runs.setdefault(run_id, []).append(entry)
        return entry

    def update_latest(self, run_id: str, **fields: Any) -> None:
        latest = self.latest(run_id)
        if latest is not None:
            latest.update(fields)


# --------------------------------------------------------------------------------------------- scheduler view
def local_job_alive(entry: dict[str, Any] | None) -> bool | None:
    """Whether a local job still runs: True/False, None when it ran on another host (cannot tell)."""
    if not entry or entry.get("ended_at") or not entry.get("pid"):
        return False
    if entry.get("host") not in (None, hostname()):
        return None
    return process_alive(entry.get("pid"), entry.get("proc_start"))


def squeue_states(job_ids: list[str], timeout: float = 60) -> dict[str, str] | None:
    """Slurm states (PENDING, RUNNING, ...) of those of ``job_ids`` that the controller still knows.

    Array tasks are listed one by one (``123_4``). Returns None when ``squeue`` cannot be run or fails, so a
    caller can tell "gone" (absent from the dict) from "cannot ask".
    """
    if not job_ids:
        return {}
    wanted = sorted({str(j).split("_")[0] for j in job_ids})
    command = ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(wanted)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # all of them already purged from the controller
            return {}
        return None
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            job_id, state = line.strip().split("|", 1)
            states[job_id] = state
    return states


def slurm_job_alive(entry: dict[str, Any] | None, states: dict[str, str] | None) -> bool | None:
    if not entry or entry.get("ended_at"):
        return False
    if states is None:
        return None
    return str(entry.get("job_id")) in states
