"""The executor interface: how a driver (``embscale submit``, ``embscale tune``) has jobs run, and stops them.

A driver owns the loop; an executor only starts jobs, says which ended, stops them and takes over the jobs an
earlier driver left running::

    executor.adopt(key, record)        # a job of a killed driver that still runs: track it, count its slots
    started = executor.start(jobs)     # as many of `jobs` as the slots allow, in order: [(job, record), ...]
    ended = executor.poll()            # jobs that ended since the last poll: [(key, record), ...]
    executor.cancel(keys)              # stop jobs this executor tracks (a pruned trial)

``record`` is the job's entry in the job map (:mod:`embscale.sweeps.executors.jobmap`): ``job_id``, ``executor``,
``host`` and what the executor needs to find the job again (a local job's pid and start time, a Slurm job id, its
submitit folder); ``poll`` adds ``ended_at`` and, where known, ``exit_code``. Two class methods work on records
alone, for commands that started nothing (``embscale status``, ``embscale cancel``): :meth:`Executor.inspect`
(is the job alive, and what does its scheduler say) and :meth:`Executor.stop`.

Each job runs :class:`embscale.sweeps.runjob.RunJob`, which trains one run; the run folder's status says how the
run ended, whatever became of the job.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

Record = dict[str, Any]


@dataclass
class Job:
    """One job: ``fn`` (picklable, called with no arguments in the job) runs under ``key`` with ``gpus`` GPUs, as
    one process (rank) per GPU; without GPUs (``gpus`` 0) as ``processes`` processes, the gloo ranks of the run."""

    key: str
    fn: Callable[[], Any]
    gpus: int = 0
    processes: int = 1

    @property
    def ranks(self) -> int:
        """The processes the job runs as: one per GPU, else ``processes``."""
        return self.gpus if self.gpus > 0 else max(1, self.processes)


class Executor(ABC):
    """Starts jobs and tells which ended; see the module docstring. ``folder`` holds submitit's job files."""

    name: ClassVar[str]

    def __init__(self, folder: Path, log: Callable[[str], None]):
        self.folder = Path(folder)
        self.log = log
        self.tracked: dict[str, Record] = {}  # key -> record of every job started or adopted and not yet ended

    # ----- what a driver calls
    @abstractmethod
    def slots(self) -> int:
        """How many jobs may run at once."""

    @abstractmethod
    def has_slot(self, gpus: int = 0, processes: int = 1) -> bool:
        """Whether a job needing ``gpus`` GPUs (or, without GPUs, ``processes`` CPU processes) could start now."""

    @abstractmethod
    def start(self, jobs: list[Job]) -> list[tuple[Job, Record]]:
        """Start as many of ``jobs`` as the slots allow, in order; returns those started with their records."""

    @abstractmethod
    def poll(self) -> list[tuple[str, Record]]:
        """The tracked jobs that ended since the last call, with ``ended_at`` (and ``exit_code``) added."""

    def adopt(self, key: str, record: Record) -> bool:
        """Track a job an earlier driver started, if it still runs (it then holds its slots); whether it does."""
        if self.alive([record])[0] is False:
            return False
        self.tracked[key] = dict(record)
        return True

    def cancel(self, keys: list[str], grace_s: float = 10.0) -> None:
        """Stop tracked jobs (they checkpoint and exit); the next :meth:`poll` reports them ended."""
        self.stop([self.tracked[key] for key in keys if key in self.tracked], grace_s)

    def running(self) -> list[str]:
        return list(self.tracked)

    def close(self) -> None:
        """Let go of what the executor keeps between jobs (the local executor's idle warm workers); running jobs
        go on. Nothing by default."""
        return None

    def describe(self, record: Record) -> str:
        """Where a started job runs, for a log line."""
        return f"job {record.get('job_id')}"

    # ----- what works on records alone
    @classmethod
    @abstractmethod
    def inspect(cls, records: list[Record], ask_scheduler: bool = True) -> list[tuple[bool | None, str | None]]:
        """For each recorded job: whether it still runs (None where it cannot be told: another host, or the
        scheduler not asked or not answering) and the scheduler's own word for its state (Slurm's ``PENDING``,
        ``RUNNING``, ...; None where there is none)."""

    @classmethod
    def alive(cls, records: list[Record]) -> list[bool | None]:
        """Whether each recorded job still runs; None where it cannot be told."""
        return [alive for alive, _ in cls.inspect(records)]

    @classmethod
    @abstractmethod
    def stop(cls, records: list[Record], grace_s: float = 10.0) -> list[Record]:
        """Stop the recorded jobs (SIGTERM first: the trainer checkpoints); returns those still running after
        ``grace_s``."""




def drive(executor: Executor, jobs: list[Job], *, poll_s: float = 0.5,
          on_start: Callable[[Job, Record], None] | None = None,
          on_end: Callable[[str, Record], None] | None = None,
          on_tick: Callable[[list[Job]], None] | None = None,
          stopping: Callable[[], bool] = lambda: False) -> list[Job]:
    """Start ``jobs`` as slots free up (the first that fits first) and return when every tracked job has ended
    (adopted ones included). ``stopping()`` true makes it return at once: running jobs go on. Returns the jobs
    not started (none unless stopped)."""
    waiting = list(jobs)
    while waiting or executor.running():
        ended = executor.poll()
        for key, record in ended:
            if on_end is not None:
                on_end(key, record)
        if stopping():
            break
        started = executor.start(waiting) if waiting else []
        for job, record in started:
            waiting.remove(job)
            if on_start is not None:
                on_start(job, record)
        if on_tick is not None:
            on_tick(waiting)
        if not (ended or started) and (waiting or executor.running()):
            time.sleep(poll_s)
    return waiting


__all__ = ["Executor", "Job", "Record", "drive"]
