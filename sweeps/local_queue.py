"""A queue in front of submitit's LocalExecutor, which on its own starts every job at once.

At most one job per free GPU, each pinned with ``CUDA_VISIBLE_DEVICES``; a run that needs ``g`` GPUs waits for
``g`` free ones. Without GPUs, a fixed number of CPU jobs run at once. Each job is a submitit local job
(``python -m submitit.local._local``) started in a session of its own, so that

- killing the driver (even with SIGKILL) leaves running jobs running: the next driver finds them through the
  job map (pid, process start time) and waits for them instead of starting them twice;
- ``embscale cancel`` stops a job and everything it started by signalling its process group.

``EMBSCALE_FAKE_GPUS=N`` pretends the machine has N GPUs (ids 0..N-1), to test the pinning on a CPU machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from sweeps import jobs as jobs_mod

FAKE_GPUS_ENV = "EMBSCALE_FAKE_GPUS"
# submitit's local jobs time out after 2 minutes unless told otherwise; a training run may take days.
DEFAULT_LOCAL_TIMEOUT_MIN = 60 * 24 * 30


def available_gpus() -> list[str]:
    """The GPU ids jobs may be pinned to: ``EMBSCALE_FAKE_GPUS``, else ``CUDA_VISIBLE_DEVICES``, else all."""
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake not in (None, ""):
        try:
            count = int(fake)
        except ValueError as exc:
            raise ValueError(f"{FAKE_GPUS_ENV} must be a whole number, got {fake!r}") from exc
        return [str(i) for i in range(count)]
    if not any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")):
        return []  # no GPU driver: spare the driver process the seconds of importing torch
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        return ids[:count] if count else []
    return [str(i) for i in range(count)]


def _usable_cpus() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_cpu_jobs() -> int:
    return max(1, _usable_cpus() // 2)


def cpu_job_environment(cpu_jobs: int) -> dict[str, str]:
    """Thread limits for a CPU job that shares the machine with ``cpu_jobs - 1`` others: torch would otherwise
    start one intra-op thread per core in every job, and oversubscribed OpenMP threads spin against each other
    (several times slower than one thread per job). An ``OMP_NUM_THREADS`` the user set is kept."""
    if os.environ.get("OMP_NUM_THREADS"):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, _usable_cpus() // max(1, cpu_jobs)))}


class SlotPool:
    """Who holds which GPU (or CPU slot). GPU runs get ids; CPU runs count against ``cpu_jobs`` slots."""

    def __init__(self, gpus: list[str], cpu_jobs: int):
        self.gpus = list(gpus)
        self.cpu_jobs = max(1, int(cpu_jobs))
        self.free_gpus = list(self.gpus)
        self.busy_cpu = 0

    @property
    def has_gpus(self) -> bool:
        return bool(self.gpus)

    def capacity(self) -> int:
        return len(self.gpus) if self.gpus else self.cpu_jobs

    def fits_ever(self, n_gpus: int) -> bool:
        return n_gpus <= len(self.gpus) if self.gpus else n_gpus == 0

    def acquire(self, n_gpus: int) -> list[str] | None:
        """The GPUs given to a job that needs ``n_gpus`` (``[]`` for a CPU job), or None when it must wait."""
        if self.gpus:
            need = max(1, n_gpus)  # on a GPU machine every job gets at least one GPU
            if len(self.free_gpus) < need:
                return None
            taken, self.free_gpus = self.free_gpus[:need], self.free_gpus[need:]
            return taken
        if n_gpus > 0:
            raise ValueError(f"a run needs {n_gpus} GPUs but this machine has none")
        if self.busy_cpu >= self.cpu_jobs:
            return None
        self.busy_cpu += 1
        return []

    def take(self, gpus: list[str]) -> None:
        """Mark ``gpus`` (or one CPU slot when empty) as held by a job this driver did not start."""
        if self.gpus:
            for gpu in gpus:
                if gpu in self.free_gpus:
                    self.free_gpus.remove(gpu)
        else:
            self.busy_cpu += 1

    def release(self, gpus: list[str]) -> None:
        if self.gpus:
            for gpu in gpus:
                if gpu in self.gpus and gpu not in self.free_gpus:
                    self.free_gpus.append(gpu)
            self.free_gpus.sort(key=self.gpus.index)
        else:
            self.busy_cpu = max(0, self.busy_cpu - 1)


class PinnedLocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor whose job controller starts in a new session, pinned to given GPUs.

    Set :attr:`devices` (the ``CUDA_VISIBLE_DEVICES`` value), :attr:`cwd` and :attr:`extra_env` before each
    ``submit``. The job id is the controller's pid, which is also its process group id.
    """

    def __init__(self, folder: Path | str, **kwargs: Any):
        super().__init__(folder, **kwargs)
        self.devices: str = ""
        self.cwd: Path | None = None
        self.extra_env: dict[str, str] = {}

    def _submit_command(self, command: str) -> submitit.local.local.LocalJob:
        ntasks = int(self.parameters.get("tasks_per_node", 1))
        timeout_min = self.parameters.get("timeout_min", DEFAULT_LOCAL_TIMEOUT_MIN)
        env = dict(os.environ)
        env.update(self.extra_env)
        # The same variables as submitit.local.local.start_controller, which cannot start a new session.
        env.update(
            SUBMITIT_LOCAL_NTASKS=str(ntasks),
            SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * timeout_min)),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_STDERR_TO_STDOUT="1" if self.parameters.get("stderr_to_stdout", False) else "",
            SUBMITIT_EXECUTOR="local",
            CUDA_VISIBLE_DEVICES=self.devices,
            SUBMITIT_LOCAL_WITH_SHELL="",
        )
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        # The controller must not hold the driver's stdout: a killed driver's pipe would stay open for ever.
        with open(folder / "controllers.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "submitit.local._local", str(folder)],
                env=env,
                cwd=str(self.cwd) if self.cwd else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return submitit.local.local.LocalJob(
            folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks))
        )


def kill_process_group(pgid: int, grace_s: float = 10.0, start: int | None = None) -> bool:
    """SIGTERM a job's process group (its trainer checkpoints and exits), SIGKILL what is left after
    ``grace_s``. ``start`` guards against a recycled pid. Returns whether anything was signalled."""
    return bool(kill_process_groups([(pgid, start)], grace_s))


def kill_process_groups(groups: list[tuple[int, int | None]], grace_s: float = 10.0) -> list[int]:
    """:func:`kill_process_group` for several jobs at once (one grace period for all); returns those signalled."""
    signalled = []
    for pgid, start in groups:
        if not jobs_mod.process_alive(pgid, start):
            continue
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        signalled.append(pgid)
    deadline = time.monotonic() + grace_s
    left = list(signalled)
    while left and time.monotonic() < deadline:
        for pgid in list(left):
            _reap(pgid)
            if not _group_alive(pgid):
                left.remove(pgid)
        if left:
            time.sleep(0.1)
    for pgid in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        _reap(pgid)
    return signalled


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies of the group still count for killpg; look for a live member.
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@dataclass
class QueueItem:
    """One job for the queue: ``fn`` (a picklable callable) runs with ``gpus`` GPUs under id ``key``."""

    key: str
    fn: Callable[[], Any]
    gpus: int = 0


@dataclass
class _Running:
    item: QueueItem | None
    key: str
    gpus: list[str]
    record: dict[str, Any]
    job: Any = None  # a LocalJob when this driver started it

    def alive(self) -> bool:
        if self.job is not None:
            return self.job._process is not None and self.job._process.poll() is None
        return jobs_mod.process_alive(self.record.get("pid"), self.record.get("proc_start"))


class LocalQueue:
    """Runs :class:`QueueItem` s through :class:`PinnedLocalExecutor`, never more than the slots allow.

    ``record_job(key, record)`` is called when a job starts (the record has ``job_id``, ``pid``,
    ``proc_start``, ``gpus``, ``host``), ``finish_job(key, record)`` when it ends (adds ``ended_at``,
    ``exit_code``).
    """

    def __init__(
        self,
        folder: Path,
        pool: SlotPool,
        *,
        cwd: Path | None = None,
        extra_env: dict[str, str] | None = None,
        timeout_min: float = DEFAULT_LOCAL_TIMEOUT_MIN,
        record_job: Callable[[str, dict[str, Any]], None] | None = None,
        finish_job: Callable[[str, dict[str, Any]], None] | None = None,
        poll_s: float = 0.25,
        log: Callable[[str], None] | None = None,
    ):
        self.folder = Path(folder)
        self.pool = pool
        self.cwd = cwd
        self.extra_env = dict(extra_env or {})
        self.timeout_min = timeout_min
        self.record_job = record_job
        self.finish_job = finish_job
        self.poll_s = poll_s
        self.log = log or (lambda message: print(message, flush=True))
        self.running: list[_Running] = []
        self.stopping = False

    def adopt(self, key: str, record: dict[str, Any]) -> bool:
        """Count a job started by an earlier driver (still alive) against the slots and wait for it too."""
        if not jobs_mod.process_alive(record.get("pid"), record.get("proc_start")):
            return False
        gpus = [str(g) for g in record.get("gpus") or []]
        self.pool.take(gpus)
        self.running.append(_Running(item=None, key=key, gpus=gpus, record=dict(record)))
        return True

    def _start(self, item: QueueItem, gpus: list[str]) -> None:
        executor = PinnedLocalExecutor(self.folder)
        ntasks = max(1, len(gpus))
        executor.update_parameters(
            timeout_min=self.timeout_min, tasks_per_node=ntasks, gpus_per_node=len(gpus)
        )
        executor.devices = ",".join(gpus)
        executor.cwd = self.cwd
        executor.extra_env = dict(self.extra_env)
        if not self.pool.has_gpus:
            executor.extra_env = {**cpu_job_environment(self.pool.cpu_jobs), **executor.extra_env}
        job = executor.submit(item.fn)
        pid = int(job.job_id)
        record = {
            "job_id": job.job_id,
            "executor": "local",
            "pid": pid,
            "pgid": pid,
            "proc_start": jobs_mod.proc_start_time(pid),
            "host": jobs_mod.hostname(),
            "gpus": gpus,
            "started_at": time.time(),
            "folder": str(self.folder),
        }
        self.running.append(_Running(item=item, key=item.key, gpus=gpus, record=record, job=job))
        if self.record_job:
            self.record_job(item.key, record)

    def _finish(self, entry: _Running) -> None:
        exit_code = None
        if entry.job is not None and entry.job._process is not None:
            exit_code = entry.job._process.poll()
        entry.record.update(ended_at=time.time(), exit_code=exit_code)
        self.pool.release(entry.gpus)
        if self.finish_job:
            self.finish_job(entry.key, entry.record)

    def try_start(self, item: QueueItem) -> bool:
        """Start ``item`` now if its GPUs (or a CPU slot) are free; False when it has to wait."""
        gpus = self.pool.acquire(item.gpus)
        if gpus is None:
            return False
        try:
            self._start(item, gpus)
        except BaseException:
            self.pool.release(gpus)
            raise
        return True

    def kill(self, key: str, grace_s: float = 10.0) -> bool:
        """Stop the running job ``key`` (its process group); it is reaped by the next :meth:`poll`."""
        for entry in self.running:
            if entry.key == key:
                return kill_process_group(int(entry.record["pid"]), grace_s, entry.record.get("proc_start"))
        return False

    def poll(self) -> list[_Running]:
        """Reap finished jobs; returns them."""
        done = [entry for entry in self.running if not entry.alive()]
        for entry in done:
            self.running.remove(entry)
            self._finish(entry)
        return done

    def run(
        self,
        items: list[QueueItem],
        *,
        on_tick: Callable[[LocalQueue, list[QueueItem]], None] | None = None,
    ) -> list[QueueItem]:
        """Start ``items`` as slots free up (first that fits first) and return when all jobs have ended.

        ``on_tick`` runs every poll. Setting :attr:`stopping` (from a signal handler) makes it return at once:
        running jobs go on in their own sessions. Returns the items not started (none unless stopped).
        """
        waiting = list(items)
        for item in waiting:
            if not self.pool.fits_ever(item.gpus):
                have = f"{len(self.pool.gpus)} GPUs" if self.pool.has_gpus else "no GPU"
                raise ValueError(f"{item.key} needs {item.gpus} GPUs but this machine has {have}")
        while waiting or self.running:
            self.poll()
            if self.stopping:
                break
            for item in list(waiting):
                if self.try_start(item):
                    waiting.remove(item)
            if on_tick is not None:
                on_tick(self, waiting)
            if waiting or self.running:
                time.sleep(self.poll_s)
        return waiting
