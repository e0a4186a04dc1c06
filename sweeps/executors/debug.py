"""The debug executor: each job runs in this process, one after the other (submitit's ``DebugExecutor``).

For debugging a run with pdb or a profiler, and for tests. A job starts when the driver next polls, so the driver
has recorded it before it runs; the driver waits for it by running it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import submitit

from embscale.sweeps.executors.base import Executor, Job, Record
from embscale.sweeps.executors.jobmap import first_line, hostname


class DebugExecutor(Executor):
    name = "debug"

    def __init__(self, folder: Path, log: Callable[[str], None]):
        super().__init__(folder, log)
        self._pending: dict[str, submitit.Job] = {}

    def slots(self) -> int:
        return 1

    def has_slot(self, gpus: int = 0, processes: int = 1) -> bool:
        return not self.tracked

    def start(self, jobs: list[Job]) -> list[tuple[Job, Record]]:
        if not jobs or self.tracked:
            return []
        job = jobs[0]
        handle = submitit.DebugExecutor(self.folder).submit(job.fn)
        record = {"job_id": handle.job_id, "executor": self.name, "host": hostname(), "pid": os.getpid(),
                  "started_at": time.time(), "folder": str(self.folder)}
        self.tracked[job.key] = record
        self._pending[job.key] = handle
        return [(job, dict(record))]

    def poll(self) -> list[tuple[str, Record]]:
        ended = []
        for key, handle in list(self._pending.items()):
            saved = dict(os.environ)
            os.environ["SUBMITIT_DEBUG_JOB_ID"] = handle.job_id
            exit_code = 0
            try:
                handle.submission().result()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - the run's status says how it ended
                exit_code = exc.code if isinstance(exc, SystemExit) else 1
                self.log(f"{key}: {type(exc).__name__}: {first_line(exc)}")
            finally:
                os.environ.clear()
                os.environ.update(saved)
            del self._pending[key]
            record = self.tracked.pop(key)
            ended.append((key, {**record, "ended_at": time.time(), "exit_code": exit_code}))
        return ended

    def describe(self, record: Record) -> str:
        return "this process (debug)"

    @classmethod
    def inspect(cls, records: list[Record], ask_scheduler: bool = True) -> list[tuple[bool | None, str | None]]:
        return [(False, None) for _ in records]  # a debug job lives and dies with its driver, which cancel stops

    @classmethod
    def stop(cls, records: list[Record], grace_s: float = 10.0) -> list[Record]:
        return []


__all__ = ["DebugExecutor"]
