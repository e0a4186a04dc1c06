"""The local executor: jobs on this machine, at most ``runs_per_gpu`` per GPU (or a fixed number of CPU jobs).

submitit's own LocalExecutor starts every job at once; this one hands each job ``g`` free GPUs, pinned with
``CUDA_VISIBLE_DEVICES``, and a job that needs ``g`` GPUs waits for ``g`` free ones (it runs as ``g`` tasks, the
ranks of the run: ``CUDA_VISIBLE_DEVICES`` keeps the job's GPUs, rank ``r`` uses ``cuda:LOCAL_RANK``, and the ranks
meet on a free port of this machine, ``MASTER_PORT``). With ``runs_per_gpu`` K above 1, up to K one-GPU runs share
each GPU (small runs that leave most of a GPU idle, and whose start-up then overlaps the others' training); each
packed run gets its share of the cores as ``OMP_NUM_THREADS``. Without GPUs, ``cpu_jobs`` processes run at once,
each with ``OMP_NUM_THREADS`` set to its share of the cores; a run of ``processes`` processes (gloo ranks) takes
that many of the ``cpu_jobs`` slots (all of them when it has more processes than slots, then running alone). Each
job is a submitit local job (``python -m submitit.local._local``) started in a session of its own, so

- killing the driver (even with SIGKILL) leaves running jobs running: the next driver finds them through the
  job map (pid, process start time) and waits for them instead of starting them twice;
- ``embscale cancel`` stops a job and everything it started by signalling its process group.

With ``warm_workers`` on, one-process runs go to warm workers instead (:mod:`.warm`): one long-lived process per
slot, pinned to the slot's GPU, trains the slot's runs one after another (imports, CUDA context and kernel builds
paid once per worker, not once per run). Each run is still a job of its own in the job map: job id
``<worker pid>.<n>`` (the worker's n-th run), the worker's pid and process group, and its own logs and result file;
the same two guarantees hold (a killed driver's workers finish their run and exit; cancel signals the worker's
group). Runs of several processes keep a process group per run.

``EMBSCALE_FAKE_GPUS=N`` pretends the machine has N GPUs (ids 0..N-1), to test the pinning on a CPU machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from embscale.sweeps.executors.base import Executor, Job, Record
from embscale.sweeps.executors.jobmap import hostname, proc_start_time, process_alive
from embscale.sweeps.executors.warm import job_paths, result_exit_code, run_ended, worker_stops

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
    """Who holds which GPU (or CPU slot). GPU runs get ids; CPU runs count against ``cpu_jobs`` slots, one per
    process (a run of more processes than there are slots takes them all).

    ``runs_per_gpu`` (K) packs small runs: a one-GPU job goes to the least-loaded GPU that holds fewer than K
    runs (the lowest id on a tie), so K runs share each GPU and a GPU is filled only once every GPU has as many
    runs. A job of several GPUs takes idle GPUs for itself alone (no packed run joins them while it runs).
    """

    def __init__(self, gpus: list[str], cpu_jobs: int, runs_per_gpu: int = 1):
        if int(runs_per_gpu) < 1:
            raise ValueError(f"runs_per_gpu must be at least 1, got {runs_per_gpu!r}")
        self.gpus = list(gpus)
        self.cpu_jobs = max(1, int(cpu_jobs))
        self.runs_per_gpu = int(runs_per_gpu)
        self.load = {gpu: 0 for gpu in self.gpus}  # runs holding each GPU
        self.exclusive: set[str] = set()  # GPUs held by a job of several GPUs
        self.busy_cpu = 0

    @property
    def has_gpus(self) -> bool:
        return bool(self.gpus)

    @property
    def free_gpus(self) -> list[str]:
        """The GPUs no job holds, in id order."""
        return [gpu for gpu in self.gpus if self.load[gpu] == 0]

    def capacity(self) -> int:
        return len(self.gpus) * self.runs_per_gpu if self.gpus else self.cpu_jobs

    def fits_ever(self, n_gpus: int) -> bool:
        return n_gpus <= len(self.gpus) if self.gpus else n_gpus == 0

    def cpu_slots(self, processes: int = 1) -> int:
        """The CPU slots a run of ``processes`` processes holds on a machine without GPU."""
        return min(max(1, int(processes)), self.cpu_jobs)

    def _choose(self, n_gpus: int) -> list[str] | None:
        need = max(1, n_gpus)  # on a GPU machine every job gets at least one GPU
        if need == 1:
            open_gpus = [g for g in self.gpus if g not in self.exclusive and self.load[g] < self.runs_per_gpu]
            return [min(open_gpus, key=lambda g: self.load[g])] if open_gpus else None  # min keeps id order
        idle = self.free_gpus
        return idle[:need] if len(idle) >= need else None

    def can_acquire(self, n_gpus: int, processes: int = 1) -> bool:
        """Whether a job needing ``n_gpus`` (without GPUs: ``processes`` processes) could start now."""
        if self.gpus:
            return self._choose(n_gpus) is not None
        return self.busy_cpu + self.cpu_slots(processes) <= self.cpu_jobs

    def acquire(self, n_gpus: int, processes: int = 1) -> list[str] | None:
        """The GPUs given to a job that needs ``n_gpus`` (``[]`` for a CPU job of ``processes`` processes, which
        holds :meth:`cpu_slots` slots), or None when it must wait."""
        if self.gpus:
            taken = self._choose(n_gpus)
            if taken is not None:
                self.take(taken)
            return taken
        if n_gpus > 0:
            raise ValueError(f"a run needs {n_gpus} GPUs but this machine has none")
        if not self.can_acquire(0, processes):
            return None
        self.busy_cpu += self.cpu_slots(processes)
        return []

    def take(self, gpus: list[str], cpu_slots: int = 1) -> None:
        """Mark ``gpus`` (or ``cpu_slots`` CPU slots when empty) as held by one more job (also one this driver did
        not start: an adopted job holds its GPUs even beyond this pool's ``runs_per_gpu``)."""
        if self.gpus:
            held = [gpu for gpu in gpus if gpu in self.load]
            for gpu in held:
                self.load[gpu] += 1
            if len(held) > 1:
                self.exclusive.update(held)
        else:
            self.busy_cpu += max(1, int(cpu_slots))

    def release(self, gpus: list[str], cpu_slots: int = 1) -> None:
        if self.gpus:
            for gpu in gpus:
                if gpu in self.load and self.load[gpu] > 0:
                    self.load[gpu] -= 1
                    if self.load[gpu] == 0:
                        self.exclusive.discard(gpu)
        else:
            self.busy_cpu = max(0, self.busy_cpu - max(1, int(cpu_slots)))


def free_port() -> int:
    """A TCP port of this machine that nothing listens on now: where a local job's ranks meet (``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def kill_process_groups(groups: list[tuple[int, int | None]], grace_s: float = 10.0) -> list[int]:
    """SIGTERM each job's process group (its trainer checkpoints and exits), SIGKILL what is left after ``grace_s``
    (one grace period for all). ``(pgid, start)``: ``start`` guards against a recycled pid. Returns the groups
    signalled."""
    signalled = []
    for pgid, start in groups:
        if not process_alive(pgid, start):
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


class LocalExecutor(Executor):
    """Jobs on this machine through :class:`PinnedLocalExecutor`, never more than the slots allow. A job is
    stopped after ``timeout_min`` minutes (default: :data:`DEFAULT_LOCAL_TIMEOUT_MIN`)."""

    name = "local"

    def __init__(self, folder: Path, pool: SlotPool, *, log: Callable[[str], None],
                 timeout_min: float | None = None, extra_env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        super().__init__(folder, log)
        self.pool = pool
        self.timeout_min = timeout_min
        self.extra_env = dict(extra_env or {})
        self.cwd = cwd
        self.processes = 1  # processes (gloo ranks) per run without GPUs, for the driver's jobs
        self.warm_workers = False  # one-process runs go to warm workers (see the module docstring)
        self.max_requeues = 6  # restarts of a warm run near its time limit, as submitit's local controller allows
        self._jobs: dict[str, Any] = {}  # key -> submitit LocalJob of the jobs started here (adopted ones have none)
        self._workers: list[WarmWorker] = []  # the warm workers this executor started and that may take a run
        self._warm_jobs: dict[str, WarmWorker] = {}  # key -> the warm worker training it

    def slots(self) -> int:
        return self.pool.capacity()

    def has_slot(self, gpus: int = 0, processes: int = 1) -> bool:
        return self.pool.can_acquire(gpus, processes)

    def adopt(self, key: str, record: Record) -> bool:
        if not super().adopt(key, record):
            return False
        self.pool.take([str(g) for g in record.get("gpus") or []], int(record.get("cpu_slots") or 1))
        return True

    def start(self, jobs: list[Job]) -> list[tuple[Job, Record]]:
        for job in jobs:
            if not self.pool.fits_ever(job.gpus):
                have = f"{len(self.pool.gpus)} GPUs" if self.pool.has_gpus else "no GPU"
                raise ValueError(f"{job.key} needs {job.gpus} GPUs but this machine has {have}")
        started = []
        for job in jobs:
            gpus = self.pool.acquire(job.gpus, job.processes)
            if gpus is None:
                continue
            cpu_slots = 0 if gpus else self.pool.cpu_slots(job.processes)
            try:
                started.append((job, self._start(job, gpus, cpu_slots)))
            except BaseException:
                self.pool.release(gpus, cpu_slots)
                raise
        return started

    def _start(self, job: Job, gpus: list[str], cpu_slots: int) -> Record:
        if self.timeout_min and hasattr(job.fn, "timeout_min"):  # a RunJob restarts itself near the limit
            job.fn.timeout_min = self.timeout_min
        ranks = len(gpus) if gpus else max(1, job.processes)  # one process per GPU, else the CPU processes
        if self.warm_workers and ranks == 1:
            return self._start_warm(job, gpus, cpu_slots)
        executor = PinnedLocalExecutor(self.folder)
        executor.update_parameters(timeout_min=self.timeout_min or DEFAULT_LOCAL_TIMEOUT_MIN,
                                   tasks_per_node=ranks, gpus_per_node=len(gpus))
        executor.devices = ",".join(gpus)
        executor.cwd = self.cwd
        executor.extra_env = dict(self.extra_env)
        if ranks > 1:  # the ranks meet on this machine, on a port nothing else uses (submitit's own choice is
            # a port drawn from the job id, which may be taken)
            executor.extra_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        executor.extra_env = {**self._thread_environment(ranks), **executor.extra_env}
        submitted = executor.submit(job.fn)
        pid = int(submitted.job_id)
        record = {"job_id": submitted.job_id, "executor": self.name, "pid": pid, "pgid": pid,
                  "proc_start": proc_start_time(pid), "host": hostname(), "gpus": gpus, "started_at": time.time(),
                  "folder": str(self.folder), "ranks": ranks}
        if cpu_slots:
            record["cpu_slots"] = cpu_slots
        self.tracked[job.key] = record
        self._jobs[job.key] = submitted
        return dict(record)

    def _thread_environment(self, ranks: int) -> dict[str, str]:
        if not self.pool.has_gpus:  # each process its share of the cores
            return cpu_job_environment(max(self.pool.cpu_jobs, ranks))
        if self.pool.runs_per_gpu > 1:  # packed runs share the cores as CPU jobs do
            return cpu_job_environment(self.pool.capacity())
        return {}

    # ----- warm workers
    def _start_warm(self, job: Job, gpus: list[str], cpu_slots: int) -> Record:
        """Hand ``job`` to an idle warm worker pinned to ``gpus`` (a fresh one if there is none)."""
        started_at = time.time()  # before a fresh worker starts: its process start counts for the run
        for _ in range(2):  # a worker that died while idle is replaced once
            worker = next((w for w in self._workers if w.key is None and w.gpus == tuple(gpus) and w.alive()),
                          None) or self._spawn_worker(gpus)
            job_id = f"{worker.pid}.{worker.runs + 1}"
            pickle = job_paths(self.folder, job_id).submitted_pickle
            submitit.core.utils.cloudpickle_dump(job.fn, pickle)
            timeout_s = 60 * (self.timeout_min or DEFAULT_LOCAL_TIMEOUT_MIN)
            task = {"job_id": job_id, "pickle": str(pickle), "timeout_s": timeout_s, "signal_delay_s": 30,
                    "max_requeues": self.max_requeues}
            if worker.send(task):
                break
            self._drop(worker)
        else:
            raise RuntimeError(f"no warm worker could take {job.key}: see {self.folder / WORKER_LOG}")
        worker.runs += 1
        worker.key, worker.job_id = job.key, job_id
        record = {"job_id": job_id, "executor": self.name, "pid": worker.pid, "pgid": worker.pid,
                  "proc_start": worker.proc_start, "host": hostname(), "gpus": list(gpus), "started_at": started_at,
                  "folder": str(self.folder), "ranks": 1, "worker_run": worker.runs}
        if cpu_slots:
            record["cpu_slots"] = cpu_slots
        self.tracked[job.key] = record
        self._warm_jobs[job.key] = worker
        return dict(record)

    def _spawn_worker(self, gpus: list[str]) -> WarmWorker:
        env = dict(os.environ)
        env.update(self._thread_environment(1))
        env.update(self.extra_env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self.folder.mkdir(parents=True, exist_ok=True)
        # like a job controller, a worker must not hold the driver's stdout, and lives in a session of its own
        with open(self.folder / WORKER_LOG, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "embscale.sweeps.executors.warm", str(self.folder)],
                env=env, cwd=str(self.cwd) if self.cwd else None, stdin=subprocess.PIPE, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, text=True)
        worker = WarmWorker(process, tuple(gpus))
        self._workers.append(worker)
        return worker

    def _drop(self, worker: WarmWorker) -> None:
        """Take no further run to ``worker``: it exits once its stdin ends (after the run it has, if any)."""
        worker.close()
        if worker in self._workers:
            self._workers.remove(worker)

    def _warm_ended(self, key: str, record: Record) -> tuple[bool, int | None]:
        """Whether the warm run ``key`` ended, and its exit code (0/1 from its result; the worker's exit code
        when the worker died without one)."""
        worker = self._warm_jobs[key]
        job_id = str(record["job_id"])
        if run_ended(self.folder, job_id):
            worker.key = worker.job_id = None
            if worker_stops(self.folder, job_id) or not worker.alive():
                self._drop(worker)
            return True, result_exit_code(self.folder, job_id)
        if worker.process.poll() is not None:
            self._drop(worker)
            return True, worker.process.returncode
        return False, None

    def close(self) -> None:
        """End every warm worker's stdin: idle ones exit now, busy ones after their run."""
        for worker in list(self._workers):
            self._drop(worker)

    def poll(self) -> list[tuple[str, Record]]:
        ended = []
        for key, record in list(self.tracked.items()):
            submitted = self._jobs.get(key)
            if key in self._warm_jobs:
                done, exit_code = self._warm_ended(key, record)
                if not done:
                    continue
            elif submitted is not None:
                process = submitted._process
                exit_code = process.poll() if process is not None else None
                if process is not None and exit_code is None:
                    continue
            elif process_alive(record.get("pid"), record.get("proc_start")) and not (
                    record.get("worker_run") and run_ended(record.get("folder") or self.folder, str(record["job_id"]))):
                continue
            else:
                exit_code = (result_exit_code(record.get("folder") or self.folder, str(record["job_id"]))
                             if record.get("worker_run") else None)
            del self.tracked[key]
            self._jobs.pop(key, None)
            self._warm_jobs.pop(key, None)
            self.pool.release([str(g) for g in record.get("gpus") or []], int(record.get("cpu_slots") or 1))
            ended.append((key, {**record, "ended_at": time.time(), "exit_code": exit_code}))
        return ended

    def describe(self, record: Record) -> str:
        where = f"GPU {','.join(record['gpus'])}" if record.get("gpus") else "CPU"
        if record.get("worker_run"):
            return f"{where} (warm worker pid {record.get('pid')}, its run {record['worker_run']})"
        ranks = int(record.get("ranks") or 1)
        return f"{where} (pid {record.get('pid')}" + (f", {ranks} processes)" if ranks > 1 else ")")

    @classmethod
    def inspect(cls, records: list[Record], ask_scheduler: bool = True) -> list[tuple[bool | None, str | None]]:
        return [(local_job_alive(record), None) for record in records]

    @classmethod
    def stop(cls, records: list[Record], grace_s: float = 10.0) -> list[Record]:
        groups = [(int(r.get("pgid") or r["pid"]), r.get("proc_start")) for r in records if r.get("pid")]
        kill_process_groups(groups, grace_s)
        return [r for r in records if local_job_alive(r)]


def local_job_alive(record: Record | None) -> bool | None:
    """Whether a local job still runs: True/False, None when it ran on another host (cannot tell)."""
    if not record or record.get("ended_at") or not record.get("pid"):
        return False
    if record.get("host") not in (None, hostname()):
        return None
    if record.get("worker_run") and run_ended(record.get("folder") or ".", str(record.get("job_id"))):
        return False  # a warm worker's run that ended: the worker may live on with another run
    return process_alive(record.get("pid"), record.get("proc_start"))


WORKER_LOG = "warm_workers.log"  # what warm workers print outside their runs


class WarmWorker:
    """The driver's handle on one warm worker: its process, the GPUs it is pinned to, the runs it took, and the
    run it trains now (``key``, ``job_id``; None while idle)."""

    def __init__(self, process: subprocess.Popen, gpus: tuple[str, ...]):
        self.process = process
        self.pid = process.pid
        self.proc_start = proc_start_time(process.pid)
        self.gpus = gpus
        self.runs = 0
        self.key: str | None = None
        self.job_id: str | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, task: dict[str, Any]) -> bool:
        """Write one task line; False when the worker is gone."""
        if not self.alive() or self.process.stdin is None or self.process.stdin.closed:
            return False
        try:
            self.process.stdin.write(json.dumps(task) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError, ValueError):
                self.process.stdin.close()


def ended_at(record: Record) -> float:
    """When a local job that ended unwatched (its driver was killed) ended: when submitit wrote its result, else
    now."""
    paths = submitit.core.utils.JobPaths(record.get("folder") or ".", job_id=str(record["job_id"]), task_id=0)
    try:
        return paths.result_pickle.stat().st_mtime
    except OSError:
        return time.time()


__all__ = ["DEFAULT_LOCAL_TIMEOUT_MIN", "LocalExecutor", "PinnedLocalExecutor", "SlotPool", "WarmWorker",
           "available_gpus",
           "cpu_job_environment", "default_cpu_jobs", "ended_at", "free_port", "kill_process_groups",
           "local_job_alive"]
