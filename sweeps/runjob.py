"""What every executor runs: :class:`RunJob`, one planned run trained by :func:`embscale.training.trainer.train_run`.

A ``submitit.helpers.Checkpointable`` holding plain data only (picklable). On preemption or time-out the trainer
saves a checkpoint and stops (state ``interrupted``); submitting the same call again resumes from it. Near its time
limit a job requeues itself: a Slurm job with ``scontrol requeue`` (at most ``max_requeues`` times), a local job by
exiting with the code that makes submitit's local controller restart it. A preempted or requeued job is requeued by
Slurm, and a cancelled one must not come back, so nothing is done for those.

Jobs share one folder of compiled kernels (:func:`share_compile_caches`), and the trainer times each job's start-up
from its process's start (run.json ``startup``).

Multi-task jobs (several GPUs, or nodes, or several CPU processes) get the ``torch.distributed`` environment from
submitit's ``TorchDistributedEnvironment`` (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); ``CUDA_VISIBLE_DEVICES`` keeps all of the job's GPUs and rank ``r`` uses
``cuda:LOCAL_RANK`` (gloo on CPU). Every task trains; only rank 0 writes the run folder, marks a crashed run
failed and requeues a timed-out job. Interrupted (``scontrol requeue``, preemption), every task checkpoints
together (the trainer's ranks agree on the step to stop at) and stops; the requeued job starts every task again,
and they resume from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit

from embscale.base import rundir

LOCAL_REQUEUE_EXIT_CODE = 144  # submitit's local controller restarts a task that exits with it


class RunJob(submitit.helpers.Checkpointable):
    """Train run ``run_id`` in ``run_dir`` from its RunConfig mapping ``config``; ``planned`` is its planned
    run.json record, whose keys the trainer keeps in the run.json it writes."""

    def __init__(self, run_id: str, run_dir: str, config: dict[str, Any], executor: str = "local",
                 timeout_min: float | None = None, signal_delay_s: float = 90.0,
                 planned: dict[str, Any] | None = None, max_requeues: int = 3):
        self.run_id = run_id
        self.run_dir = str(run_dir)
        self.config = config
        self.executor = executor
        self.timeout_min = timeout_min
        self.signal_delay_s = signal_delay_s
        self.planned = planned or {}
        self.max_requeues = max_requeues
        # set by a warm worker (embscale.sweeps.executors.warm) for its second and later runs: start-up counts
        # from when it took the run, not from its process's start
        self.started_at: float | None = None
        self.startup_since: str | None = None

    def __call__(self) -> dict[str, Any]:
        share_compile_caches()
        import embscale
        from embscale.training.config import RunConfig
        from embscale.training.trainer import process_started_at, train_run

        started = time.time()
        rank = self._setup_distributed()
        run_dir = Path(self.run_dir)
        print(f"embscale: run {self.run_id} in {run_dir}; code from {Path(embscale.__file__).parent.parent}; "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}; rank {rank}", flush=True)
        # A job of its own (local, Slurm) times start-up from its process's start; a debug job shares the driver's;
        # a warm worker's later run counts from when the worker took it.
        process_start = getattr(self, "started_at", None)
        if process_start is None and self.executor != "debug":
            process_start = process_started_at()
        try:
            summary = train_run(RunConfig.from_dict(self.config), run_dir, resume=True, planned=self.planned,
                                started_at=process_start, startup_since=getattr(self, "startup_since", None))
        except SystemExit as exc:  # a trainer that exits on a signal after checkpointing
            self._after_interruption(rank, started)
            raise SystemExit(exc.code) from None
        except BaseException as exc:
            if rank == 0:
                _mark_failed(run_dir, exc)
            raise
        if summary.get("state") == "interrupted":
            self._after_interruption(rank, started)
        return summary

    def _setup_distributed(self) -> int:
        try:
            env = submitit.JobEnvironment()
        except RuntimeError:  # not inside a submitit job (called directly)
            return 0
        if env.num_tasks > 1:
            # A local job's ranks meet where the local executor said (127.0.0.1, a free port); submitit would name
            # this machine's host name. MASTER_PORT, when set, is submitit's own choice too.
            given_address = os.environ.get("MASTER_ADDR") if self.executor == "local" else None
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            if given_address:
                os.environ["MASTER_ADDR"] = given_address
        return env.global_rank

    def _timed_out(self, started: float) -> bool:
        """Whether the job is near its time limit, counted from when its clock started: a warm worker's task sets
        ``clock_started`` when it arms the time-limit signal; else from ``started`` (this call's start)."""
        if not self.timeout_min:
            return False
        limit = 60.0 * float(self.timeout_min)
        started = min(started, getattr(self, "clock_started", started))
        return time.time() - started >= limit - self.signal_delay_s - 30.0

    def _after_interruption(self, rank: int, started: float) -> None:
        if rank != 0 or not self._timed_out(started):
            return
        if self.executor == "slurm":
            job_id = submitit.JobEnvironment().job_id
            shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                                   check=False, timeout=60).stdout
            restarts = re.search(r"Restarts=(\d+)", shown)
            if restarts and int(restarts.group(1)) >= self.max_requeues:
                print(f"embscale: run {self.run_id} timed out again after {restarts.group(1)} requeues; "
                      "not requeued (raise slurm.max_requeues or slurm.time)", flush=True)
                return
            subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)
            print(f"embscale: run {self.run_id} timed out; requeued job {job_id}", flush=True)
        elif self.executor == "local":
            print(f"embscale: run {self.run_id} timed out; restarting", flush=True)
            raise SystemExit(LOCAL_REQUEUE_EXIT_CODE)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The trainer keeps its own checkpoints in the run folder; resubmitting the same call resumes from them.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


COMPILE_CACHE_ENV = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor"}


def share_compile_caches() -> dict[str, str]:
    """Point Triton's kernel cache and TorchInductor's cache (``torch.compile``) at ``<embscale cache>/compile/``
    unless the environment already names them, so every run of a sweep, on this machine or (with a shared cache
    folder) on any node, reuses the kernels and graphs the first runs compiled instead of compiling them again.
    Both are keyed by everything that makes a compilation differ (source, shapes, device, versions). Returns the
    variables set."""
    from embscale.training.data.tokenizer import cache_root

    chosen = {}
    for variable, folder in COMPILE_CACHE_ENV.items():
        if not os.environ.get(variable):
            chosen[variable] = os.environ[variable] = str(cache_root() / "compile" / folder)
    return chosen


def _mark_failed(run_dir: Path, exc: BaseException) -> None:
    """Status ``failed`` for a run whose trainer raised before it could say so itself (bad input, say)."""
    if rundir.run_state(run_dir) in rundir.TERMINAL_STATES:
        return
    with contextlib.suppress(OSError):
        rundir.write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}".strip())


__all__ = ["COMPILE_CACHE_ENV", "LOCAL_REQUEUE_EXIT_CODE", "RunJob", "share_compile_caches"]
