"""The Slurm executor: each job an sbatch job (one job array per :meth:`SlurmExecutor.start`), through submitit.

Jobs run :class:`embscale.sweeps.runjob.RunJob`, a ``submitit.helpers.Checkpointable``: on preemption or
``scontrol requeue`` the trainer saves a checkpoint and stops (state ``interrupted``) and Slurm requeues the job;
near its time limit the job requeues itself (at most ``slurm.max_requeues`` times); a requeued job resumes from
the checkpoint. A run of ``nodes x gpus_per_node`` GPUs is one job of that many tasks (``ntasks_per_node =
gpus_per_node``), the ranks of the run, each setting up ``torch.distributed`` from submitit's
``TorchDistributedEnvironment`` (:class:`~embscale.sweeps.runjob.RunJob`); without GPUs, ``tasks_per_node`` gloo
ranks per node. A requeue restarts every task of the job, and the run resumes from its newest checkpoint.

Which jobs still exist is asked of ``squeue``; a job it no longer lists has ended (the run's status says how).
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from embscale.base.errors import UserError
from embscale.sweeps.executors.base import Executor, Job, Record
from embscale.sweeps.executors.jobmap import first_line, hostname
from embscale.sweeps.sections import slurm_parameters

DEFAULT_TIME_MIN = 60 * 24
DEFAULT_PARALLEL = 4  # trials at once for `embscale tune` when neither tune.parallel nor array_parallelism says


class SlurmExecutor(Executor):
    """sbatch jobs with ``params`` (submitit ``SlurmExecutor`` parameters, from :func:`slurm_executor`)."""

    name = "slurm"

    def __init__(self, folder: Path, log: Callable[[str], None], params: dict[str, Any], max_requeues: int = 3):
        super().__init__(folder, log)
        self.params = dict(params)
        self.max_requeues = max_requeues

    def slots(self) -> int:
        return int(self.params.get("array_parallelism") or DEFAULT_PARALLEL)

    def has_slot(self, gpus: int = 0, processes: int = 1) -> bool:
        return True  # Slurm queues what it cannot start yet

    def start(self, jobs: list[Job]) -> list[tuple[Job, Record]]:
        if not jobs:
            return []
        try:
            executor = submitit.SlurmExecutor(self.folder, max_num_timeout=self.max_requeues)
        except RuntimeError as exc:
            raise UserError(f"cannot submit to Slurm: {exc}") from None
        params = dict(self.params)
        if len(jobs) == 1:
            params.pop("array_parallelism", None)
        try:
            executor.update_parameters(**params)
        except ValueError as exc:
            raise UserError(f"bad Slurm parameters: {first_line(exc)}") from None
        for job in jobs:  # a RunJob requeues itself near the limit and checks the requeue budget
            if hasattr(job.fn, "timeout_min"):
                job.fn.timeout_min = params["time"]
                job.fn.signal_delay_s = float(params.get("signal_delay_s", 90))
                job.fn.max_requeues = self.max_requeues
        try:
            with executor.batch():
                submitted = [executor.submit(job.fn) for job in jobs]
        except Exception as exc:  # noqa: BLE001 - sbatch's own message says why
            raise UserError(f"sbatch failed: {first_line(exc)}") from None
        started = []
        for job, handle in zip(jobs, submitted, strict=True):
            job_id = str(handle.job_id)
            record = {"job_id": job_id, "executor": self.name, "host": hostname(), "folder": str(self.folder),
                      "array_job_id": job_id.split("_")[0], "started_at": time.time()}
            self.tracked[job.key] = record
            started.append((job, dict(record)))
        return started

    def poll(self) -> list[tuple[str, Record]]:
        if not self.tracked:
            return []
        states = squeue_states([r["job_id"] for r in self.tracked.values()])
        if states is None:  # squeue cannot be asked now: nothing is known to have ended
            return []
        ended = []
        for key, record in list(self.tracked.items()):
            if str(record["job_id"]) not in states:
                del self.tracked[key]
                ended.append((key, {**record, "ended_at": time.time()}))
        return ended

    def describe(self, record: Record) -> str:
        return f"Slurm job {record.get('job_id')}"

    @classmethod
    def inspect(cls, records: list[Record], ask_scheduler: bool = True) -> list[tuple[bool | None, str | None]]:
        open_ids = [str(r["job_id"]) for r in records if r.get("job_id") and not r.get("ended_at")]
        states = (squeue_states(open_ids) if ask_scheduler else None) if open_ids else {}
        return [(slurm_job_alive(record, states), (states or {}).get(str(record.get("job_id"))))
                for record in records]

    @classmethod
    def stop(cls, records: list[Record], grace_s: float = 60.0) -> list[Record]:
        job_ids = [str(r["job_id"]) for r in records if r.get("job_id")]
        if not job_ids:
            return []
        # a failed scancel (a job that ended meanwhile) shows in what is still listed below
        subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=120, check=False)
        deadline = time.monotonic() + grace_s
        remaining = set(job_ids)
        while remaining and time.monotonic() < deadline:
            states = squeue_states(sorted(remaining))
            remaining = set() if states is None else {j for j in remaining if j in states}
            if remaining:
                time.sleep(0.5)
        return [r for r in records if str(r.get("job_id")) in remaining]


def slurm_executor(folder: Path, log: Callable[[str], None], section: dict[str, Any],
                   overrides: dict[str, Any] | None, job_name: str, environment: dict[str, str]) -> SlurmExecutor:
    """A :class:`SlurmExecutor` from a sweep's ``slurm:`` section with command-line ``overrides`` on top.

    Defaults: ``job_name``, a day's time limit, one task per GPU; ``environment`` is exported by the job script
    before the job starts (the code snapshot's ``PYTHONPATH``)."""
    params = slurm_parameters(section, overrides)
    max_requeues = int(params.pop("_max_requeues", 3))
    params.setdefault("job_name", job_name)
    params.setdefault("time", DEFAULT_TIME_MIN)
    if "ntasks_per_node" not in params and params.get("gpus_per_node"):
        params["ntasks_per_node"] = params["gpus_per_node"]  # one task (rank) per GPU
    elif params.get("gpus_per_node") and params["ntasks_per_node"] != params["gpus_per_node"]:
        log(f"slurm.tasks_per_node {params['ntasks_per_node']} with gpus_per_node {params['gpus_per_node']}: each "
            "task is one rank on one GPU (cuda:LOCAL_RANK), so a node's GPUs and tasks should be as many")
    setup = list(params.get("setup") or []) + [f"export {k}={shlex.quote(v)}" for k, v in environment.items()]
    if setup:
        params["setup"] = setup
    return SlurmExecutor(folder, log, params, max_requeues)


def squeue_states(job_ids: list[str], timeout: float = 60) -> dict[str, str] | None:
    """Slurm states (PENDING, RUNNING, ...) of those of ``job_ids`` that the controller still knows.

    Array tasks are listed one by one (``123_4``). Returns None when ``squeue`` cannot be run or fails, so a caller
    can tell "gone" (absent from the dict) from "cannot ask".
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


def slurm_job_alive(record: Record | None, states: dict[str, str] | None) -> bool | None:
    if not record or record.get("ended_at"):
        return False
    if states is None:
        return None
    return str(record.get("job_id")) in states


__all__ = ["SlurmExecutor", "slurm_executor", "slurm_job_alive", "squeue_states"]
