"""The driver of ``embscale submit``: train the runs of a plan that need it, through one executor.

The run's ``status.json`` is the truth: completed runs are never submitted again, failed and diverged ones only
with ``retry_failed``, and a run whose recorded job still runs (local pid, Slurm job id) is left to it. Before its
job starts a run folder has its planned ``run.json`` and status ``queued``; the job map keeps every job a run ever
had. One driver (``submit`` or ``tune``) per sweep at a time, recorded in the job map so ``embscale cancel`` can
stop it.

The driver waits for its jobs (``wait``; the Slurm executor only with ``--wait``), reporting each as it ends; a job
that died without its trainer saying why leaves its run ``failed`` with the job's error and log. Killing the driver
loses nothing: running jobs go on in their own sessions, and the next driver adopts them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from embscale.base import rundir
from embscale.base.errors import ConfigError, UserError
from embscale.base.files import atomic_write_json
from embscale.base.progress import Progress, progress_mode
from embscale.base.progress import log as progress_log
from embscale.sweeps.executors.base import Executor, Job, Record, drive
from embscale.sweeps.executors.debug import DebugExecutor
from embscale.sweeps.executors.jobmap import JobMap, first_line, hostname, proc_start_time
from embscale.sweeps.executors.local import (
    LocalExecutor,
    SlotPool,
    available_gpus,
    default_cpu_jobs,
    ended_at,
)
from embscale.sweeps.executors.slurm import SlurmExecutor, slurm_executor
from embscale.sweeps.plan import SweepPlan, planned_record, run_config_dict
from embscale.sweeps.runjob import RunJob
from embscale.sweeps.sections import EXECUTORS, check_runs_per_gpu
from embscale.sweeps.snapshot import code_snapshot, job_environment
from embscale.sweeps.status import RunView, select_runs, view_runs


@dataclass
class SubmitOptions:
    """How to submit: the executor and its settings (command-line values over the sweep file's sections)."""

    executor: str = "local"
    retry_failed: bool = False
    cpu_jobs: int | None = None
    gpus_per_run: int | None = None
    processes: int | None = None  # local, without GPU: processes (gloo ranks) per run
    runs_per_gpu: int | None = None
    warm_workers: bool | None = None  # local: one-process runs trained by warm workers (None: the sweep's setting)
    timeout_min: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)  # overrides of the sweep's slurm: section
    wait: bool = True
    poll_s: float = 1.0
    log_interval_s: float = 30.0
    snapshot: bool = True
    dry_run: bool = False
    reuse_completed: bool = True  # copy a run another sweep of the results root completed instead of training it


@dataclass
class SubmitReport:
    submitted: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    adopted: list[str] = field(default_factory=list)
    job_ids: dict[str, str] = field(default_factory=dict)
    final: dict[str, str] = field(default_factory=dict)  # run id -> state when the driver returned
    reused: dict[str, str] = field(default_factory=dict)  # run id -> the other sweep's folder it was copied from
    interrupted: bool = False


# ----------------------------------------------------------------------------------------------------- executors
def make_executor(plan: SweepPlan, options: SubmitOptions, snapshot: Path | None, log: Callable[[str], None],
                  job_name: str) -> tuple[Executor, int]:
    """The executor ``options.executor`` for ``plan``, and the GPUs each of its jobs gets."""
    folder = plan.sweep_dir / "submitit"
    if options.executor == "debug":
        return DebugExecutor(folder, log), 0
    if options.executor == "slurm":
        return slurm_executor(folder, log, dict(plan.sweep.slurm), options.slurm, job_name,
                              job_environment(snapshot)), 0
    section = dict(plan.sweep.executor)
    try:
        gpus = available_gpus()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    cpu_jobs = options.cpu_jobs or section.get("cpu_jobs") or default_cpu_jobs()
    gpus_per_run = options.gpus_per_run if options.gpus_per_run is not None else section.get("gpus_per_run")
    if gpus_per_run is None:
        gpus_per_run = 1 if gpus else 0
    if gpus and gpus_per_run == 0:
        gpus = []  # asked for CPU runs on a GPU machine
    if not gpus and gpus_per_run > 0:
        raise UserError(f"runs need {gpus_per_run} GPUs each but no GPU is visible (CUDA_VISIBLE_DEVICES, "
                        "EMBSCALE_FAKE_GPUS); use --gpus-per-run 0 for CPU runs")
    if gpus and gpus_per_run > len(gpus):
        raise UserError(f"runs need {gpus_per_run} GPUs each but only {len(gpus)} are visible")
    runs_per_gpu = local_runs_per_gpu(options, section, gpus, gpus_per_run, log)
    timeout = options.timeout_min or section.get("timeout_min")
    executor = LocalExecutor(folder, SlotPool(gpus, cpu_jobs, runs_per_gpu), log=log, timeout_min=timeout,
                             extra_env=job_environment(snapshot),
                             cwd=snapshot if sys.version_info < (3, 11) else None)  # no PYTHONSAFEPATH before 3.11
    executor.processes = local_processes(options, section, gpus_per_run if gpus else 0, log)
    warm = options.warm_workers if options.warm_workers is not None else bool(section.get("warm_workers", False))
    ranks = gpus_per_run if gpus else executor.processes
    if warm and ranks > 1:
        log(f"warm workers set aside: runs of {ranks} processes each keep a process group per run")
    executor.warm_workers = warm and ranks == 1
    return executor, gpus_per_run


def local_processes(options: SubmitOptions, section: dict[str, Any], gpus_per_run: int,
                    log: Callable[[str], None]) -> int:
    """Processes (ranks) of each local run without GPUs: ``--processes``, else ``executor.processes``, else 1.
    Runs on GPUs have one process per GPU (``gpus_per_run``): there a sweep's ``processes`` is set aside with a log
    line, and a ``--processes`` other than ``gpus_per_run`` is an error."""
    given = options.processes
    value = given if given is not None else section.get("processes", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"--processes must be a positive integer, got {value!r}")
    if gpus_per_run > 0 and value not in (1, gpus_per_run):
        if given is not None:
            raise UserError(f"--processes {value}: runs on GPUs have one process per GPU ({gpus_per_run}); "
                            "use --gpus-per-run")
        log(f"executor.processes {value} set aside: runs on GPUs have one process per GPU ({gpus_per_run})")
        return 1
    return int(value) if gpus_per_run == 0 else 1


def local_runs_per_gpu(options: SubmitOptions, section: dict[str, Any], gpus: list[str], gpus_per_run: int,
                       log: Callable[[str], None]) -> int:
    """How many runs share one GPU: ``--runs-per-gpu``, else the sweep's ``executor.runs_per_gpu``, else 1.

    Packing applies to runs of one GPU each; the sweep file's value is set aside (with a log line) where runs get
    no GPU (a CPU machine, ``--gpus-per-run 0``) or several, while a ``--runs-per-gpu`` that cannot apply is an
    error."""
    given = options.runs_per_gpu
    value = given if given is not None else section.get("runs_per_gpu", 1)
    where = "--runs-per-gpu" if given is not None else "executor.runs_per_gpu"
    if given is not None:
        try:
            check_runs_per_gpu(given, gpus_per_run, where)
        except ConfigError as exc:
            raise UserError(str(exc)) from None
    if value > 1 and (not gpus or gpus_per_run != 1):
        why = "the runs get no GPU" if not gpus else f"each run gets {gpus_per_run} GPUs"
        if given is not None:
            raise UserError(f"{where} {value}: packing needs runs of one GPU each, and {why}")
        log(f"{where} {value} set aside: {why}")
        return 1
    return int(value)


def run_job(plan: SweepPlan, view: RunView, executor: str, gpus: int, processes: int = 1) -> Job:
    """The job that trains ``view``'s run (on ``gpus`` GPUs, else as ``processes`` CPU processes)."""
    fn = RunJob(view.run_id, str(view.run_dir), run_config_dict(view.run, plan), executor=executor,
                planned=planned_record(view.run, plan.name))
    return Job(key=view.run_id, fn=fn, gpus=gpus, processes=processes)


# ----------------------------------------------------------------------------------------------------- the driver
def submit(plan: SweepPlan, options: SubmitOptions, log: Callable[[str], None] | None = None) -> SubmitReport:
    """Submit the runs of ``plan`` that need it, and wait for them unless ``options.wait`` is off."""
    log = safe_log(log)
    if options.executor not in EXECUTORS:
        raise UserError(f"unknown executor {options.executor!r}; expected one of {', '.join(EXECUTORS)}")
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    with driver_lock(plan, options.executor):
        views = view_runs(plan, ask_scheduler=options.executor == "slurm" or _has_slurm_jobs(plan))
        chosen, skipped = select_runs(views, options.retry_failed)
        report = SubmitReport(skipped=skipped)
        parts = [f"{len(chosen)} to run"] + [f"{len(v)} {k}" for k, v in skipped.items() if v]
        log(f"sweep {plan.name}: {len(views)} runs; " + ", ".join(parts)
            + ("" if options.retry_failed or not skipped["failed"] else " (use --retry-failed to rerun failed)"))
        if options.dry_run:
            report.submitted = [v.run_id for v in chosen]
            return report
        if options.reuse_completed:
            chosen = reuse_completed_runs(plan, chosen, report, log)
            if not chosen:
                return report
        snapshot = code_snapshot(plan.sweep_dir / "code") if options.snapshot else None
        executor, gpus_per_run = make_executor(plan, options, snapshot, log, f"embscale-{plan.name}")
        _Driver(plan, options, executor, report, log).run(views, chosen, gpus_per_run)
        return report


def reuse_completed_runs(plan: SweepPlan, chosen: list[RunView], report: SubmitReport,
                         log: Callable[[str], None]) -> list[RunView]:
    """Copy into this sweep the chosen runs that another sweep of the same results root has completed (same run
    id: the same model, training and data), instead of training them again; returns the runs still to train.
    Only runs that have not started here (pending, or cancelled before their first step) are candidates: a run
    with an attempt of its own resumes that attempt."""
    left = []
    for view in chosen:
        source = None
        if view.state in ("pending", "cancelled") and not (view.status or {}).get("step"):
            source = rundir.completed_copy_source(plan.results_root, plan.name, view.run_id)
        if source is None:
            left.append(view)
            continue
        rundir.copy_completed_run(source, view.run_dir, planned_record(view.run, plan.name))
        report.reused[view.run_id] = str(source)
    if report.reused:
        sources = sorted({Path(s).parent.name for s in report.reused.values()})
        log(f"{len(report.reused)} runs completed in another sweep ({', '.join(sources)}): copied, not trained again")
    return left


class _Driver:
    """One submission: adopt, prepare, start, record, wait, report."""

    def __init__(self, plan: SweepPlan, options: SubmitOptions, executor: Executor, report: SubmitReport,
                 log: Callable[[str], None]):
        self.plan, self.options, self.executor, self.report, self.log = plan, options, executor, report, log
        self.views: dict[str, RunView] = {}
        self.started_at: dict[str, float] = {}
        self.bar: Progress | None = None

    def run(self, views: list[RunView], chosen: list[RunView], gpus_per_run: int) -> None:
        plan, executor, report = self.plan, self.executor, self.report
        self.views = {view.run_id: view for view in views}
        close_unwatched_jobs(plan)
        # Jobs a killed driver left running keep their slots; this driver waits for them too (even a job whose
        # run has just completed holds its slot until its process exits).
        for view in views:
            if view.job and view.job.get("executor") == executor.name and view.alive:
                if executor.adopt(view.run_id, view.job):
                    report.adopted.append(view.run_id)
        if report.adopted:
            self.log(f"{len(report.adopted)} jobs still running from an earlier driver: {', '.join(report.adopted)}")
        jobs = []
        for view in chosen:
            rundir.write_planned_record(view.run_dir, planned_record(view.run, plan.name))
            rundir.write_status(view.run_dir, "queued", job_id=None)
            processes = executor.processes if isinstance(executor, LocalExecutor) else 1
            jobs.append(run_job(plan, view, executor.name, gpus_per_run, processes))
            report.submitted.append(view.run_id)
        if isinstance(executor, LocalExecutor):
            pool = executor.pool
            where = f"{len(pool.gpus)} GPUs" if pool.has_gpus else f"{pool.cpu_jobs} CPU jobs at a time"
            if pool.has_gpus and pool.runs_per_gpu > 1:
                where += f", {pool.runs_per_gpu} runs per GPU"
            if pool.has_gpus and gpus_per_run > 1:
                where += f", {gpus_per_run} GPUs (processes) per run"
            if not pool.has_gpus and executor.processes > 1:
                where += f", {executor.processes} processes (gloo ranks) per run"
            if executor.warm_workers:
                where += ", warm workers (one process per slot trains its runs one after another)"
            self.log(f"local queue: {len(jobs)} runs, {where}")
        if isinstance(executor, SlurmExecutor):  # all at once, as one job array: Slurm queues them
            try:
                for job, record in executor.start(jobs):
                    self.on_start(job, record)
            except BaseException:
                for view in chosen:
                    if view.run_id not in report.job_ids:
                        self.restore_status(view)
                raise
            arrays = sorted({job_id.split("_")[0] for job_id in report.job_ids.values()})
            if arrays:
                self.log(f"submitted {len(report.job_ids)} runs as Slurm job array {', '.join(arrays)} "
                         f"(at most {executor.slots()} at once)")
            jobs = []
        if self.options.wait:
            self.wait(jobs)

    def wait(self, jobs: list[Job]) -> None:
        total = len(jobs) + len(self.executor.running())  # to start, and started (adopted or submitted)
        interval = self.options.log_interval_s
        last_line = [time.monotonic()]
        if progress_mode() == "bar" and total:
            self.bar = Progress(total, desc=f"sweep {self.plan.name}", unit="run", mode="bar")

        def on_tick(waiting: list[Job]) -> None:
            if self.bar is None and time.monotonic() - last_line[0] >= interval:
                last_line[0] = time.monotonic()
                running = len(self.executor.running())
                self.log(f"[{self.plan.name}] {len(self.report.final)}/{total} done, {running} running, "
                         f"{len(waiting)} waiting")

        stopping = {"now": False}

        def stop(signum: int, frame: Any) -> None:
            stopping["now"] = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            not_started = drive(self.executor, jobs, poll_s=self.options.poll_s, on_start=self.on_start,
                                on_end=self.on_end, on_tick=on_tick, stopping=lambda: stopping["now"])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.executor.close()  # idle warm workers exit; busy ones after their run
            if self.bar is not None:
                self.bar.close()
        if stopping["now"]:
            self.report.interrupted = True
            for job in not_started:  # back to pending so status does not call them queued
                rundir.write_status(self.views[job.key].run_dir, "pending", job_id=None)
            running = self.executor.running()
            self.log(f"driver stopped: {len(running)} jobs keep running ({', '.join(running) or 'none'}), "
                     f"{len(not_started)} not started; `embscale submit` again resumes, `embscale cancel` stops "
                     "them")

    def on_start(self, job: Job, record: Record) -> None:
        with JobMap.locked(self.plan.job_map_path) as job_map:
            job_map.record(job.key, record)
        rundir.write_status(self.views[job.key].run_dir, "queued", job_id=str(record["job_id"]))
        self.report.job_ids[job.key] = str(record["job_id"])
        self.started_at[job.key] = time.time()
        if self.executor.name != "slurm":
            self.log(f"started {job.key} on {self.executor.describe(record)}")

    def on_end(self, key: str, record: Record) -> None:
        with JobMap.locked(self.plan.job_map_path) as job_map:
            job_map.update_job(key, record.get("job_id"), ended_at=record.get("ended_at"),
                               exit_code=record.get("exit_code"))
        view = self.views[key]
        state = finish_state(view.run_dir, record)
        self.report.final[key] = state
        took = time.time() - self.started_at.get(key, record.get("started_at") or time.time())
        detail = first_line((rundir.read_status(view.run_dir) or {}).get("error")) if state != "completed" else ""
        self.log(f"{key}: {state} after {took:.0f}s" + (f": {detail}" if detail else ""))
        if self.bar is not None:
            self.bar.update(1)

    def restore_status(self, view: RunView) -> None:
        """Put back the status a run had before this driver queued it (its job could not be submitted)."""
        if view.status is None:
            with contextlib.suppress(FileNotFoundError):
                (view.run_dir / rundir.STATUS_FILE).unlink()
        else:
            atomic_write_json(view.run_dir / rundir.STATUS_FILE, view.status)


def finish_state(run_dir: Path, record: Record) -> str:
    """After a job ended: the run's state, writing ``failed`` when the job died without its trainer saying why."""
    state = rundir.run_state(run_dir)
    if state in ("queued", "running", "pending"):
        reason = _job_error(record)
        logs = _job_log(record)
        where = f" (log: {logs})" if logs else ""
        if reason is None:
            reason = f"job {record.get('job_id')} exited with code {record.get('exit_code')} before finishing"
        prefix = "failed to start: " if state != "running" else ""
        rundir.write_status(run_dir, "failed", error=f"{prefix}{reason}{where}")
        state = "failed"
    return state


def _job_error(record: Record) -> str | None:
    """The exception a submitit job ended with, from its result pickle (its last line)."""
    folder, job_id = record.get("folder"), record.get("job_id")
    if not folder or not job_id:
        return None
    paths = submitit.core.utils.JobPaths(folder, job_id=str(job_id), task_id=0)
    try:
        outcome, value = submitit.core.utils.pickle_load(paths.result_pickle)
    except Exception:  # noqa: BLE001 - absent or unreadable: the caller says so
        return None
    if outcome != "error":
        return None
    lines = [line for line in str(value).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def _job_log(record: Record) -> str | None:
    folder, job_id = record.get("folder"), record.get("job_id")
    if not folder or not job_id or record.get("executor") == "debug":
        return None
    return str(submitit.core.utils.JobPaths(folder, job_id=str(job_id), task_id=0).stderr)


def close_unwatched_jobs(plan: SweepPlan) -> None:
    """Give local jobs that ended while no driver watched them (a killed driver's) their end time."""
    from embscale.sweeps.executors.local import local_job_alive

    with JobMap.locked(plan.job_map_path) as job_map:
        for history in job_map.runs.values():
            for entry in history:
                if entry.get("executor") != "local" or entry.get("ended_at") or not entry.get("pid"):
                    continue
                if local_job_alive(entry) is False:
                    entry["ended_at"] = ended_at(entry)


# ----------------------------------------------------------------------------------------------------- one driver
@contextlib.contextmanager
def driver_lock(plan: SweepPlan, executor: str) -> Iterator[None]:
    """One driver per sweep at a time; recorded in the job map so ``cancel`` can stop it."""
    lock_path = plan.sweep_dir / "driver.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            driver = JobMap.load(plan.job_map_path).data.get("driver") or {}
            message = (f"another embscale driver (pid {driver.get('pid', '?')}) is submitting sweep {plan.name};"
                       " watch it with `embscale status` or stop it with `embscale cancel`")
            raise UserError(message) from None
        pid = os.getpid()
        with JobMap.locked(plan.job_map_path) as job_map:
            job_map.data["sweep"] = plan.name
            job_map.data["driver"] = {"pid": pid, "proc_start": proc_start_time(pid), "host": hostname(),
                                      "executor": executor, "started_at": time.time()}
        try:
            yield
        finally:
            with JobMap.locked(plan.job_map_path) as job_map:
                driver = job_map.data.get("driver") or {}
                if driver.get("pid") == pid:
                    driver["ended_at"] = time.time()
            fcntl.flock(lock, fcntl.LOCK_UN)


def safe_log(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """A logger that outlives its terminal: a closed stdout/stderr must not kill a driver mid-sweep."""
    target = log or progress_log

    def write(message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            target(message)

    return write


def _has_slurm_jobs(plan: SweepPlan) -> bool:
    job_map = JobMap.load(plan.job_map_path)
    return any(h and h[-1].get("executor") == "slurm" for h in job_map.runs.values())


__all__ = ["SubmitOptions", "SubmitReport", "driver_lock", "finish_state", "make_executor", "run_job",
           "safe_log", "submit"]
