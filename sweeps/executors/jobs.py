"""Jobs of any executor, by their job-map records: which executor a record belongs to, whether its job still
lives, and stopping it (for ``embscale status`` and ``embscale cancel``, which started nothing themselves)."""

from __future__ import annotations

from embscale.sweeps.executors.base import Executor, Record
from embscale.sweeps.executors.debug import DebugExecutor
from embscale.sweeps.executors.local import LocalExecutor
from embscale.sweeps.executors.slurm import SlurmExecutor

EXECUTOR_CLASSES: dict[str, type[Executor]] = {cls.name: cls for cls in (DebugExecutor, LocalExecutor,
                                                                          SlurmExecutor)}


def inspect_jobs(records: dict[str, Record], ask_scheduler: bool = True
                 ) -> dict[str, tuple[bool | None, str | None]]:
    """:meth:`Executor.inspect` of jobs of any executor, each executor asked once: key -> (alive, scheduler's
    state). A record of an unknown executor is not alive."""
    out: dict[str, tuple[bool | None, str | None]] = {key: (False, None) for key in records}
    for name, cls in EXECUTOR_CLASSES.items():
        keys = [key for key, record in records.items() if record.get("executor") == name]
        if keys:
            out.update(zip(keys, cls.inspect([records[k] for k in keys], ask_scheduler), strict=True))
    return out


def stop_jobs(records: dict[str, Record], grace_s: float) -> list[str]:
    """:meth:`Executor.stop` of jobs of any executor; returns the keys of those still running after ``grace_s``."""
    left: list[str] = []
    for name, cls in EXECUTOR_CLASSES.items():
        keys = [key for key, record in records.items() if record.get("executor") == name]
        if keys:
            still = cls.stop([records[k] for k in keys], grace_s)
            left += [k for k in keys if records[k] in still]
    return left


__all__ = ["EXECUTOR_CLASSES", "inspect_jobs", "stop_jobs"]
