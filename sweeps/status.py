"""Where each run of a sweep stands: its status file reconciled with its latest job, and the sweep's ETA.

A run's ``status.json`` is the truth about the run; the job map says which job had it last. Reconciling the two
adds what neither says alone: ``lost`` (status says running, and its job is gone), ``failed-to-start`` (queued,
and its job is gone before training began), a run queued in a driver that has exited (back to ``pending``), and a
Slurm job requeued after an interruption (``queued`` or ``running`` again, whatever the last attempt wrote).

The ETA divides the work left (FLOPs of unfinished runs, scaled by the steps they still have) by the current
throughput (tokens/s of running runs, from their metrics, or their step rate since they started).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embscale.base import rundir
from embscale.sweeps.executors.jobmap import JobMap, first_line, hostname, parse_time, process_alive
from embscale.sweeps.executors.jobs import inspect_jobs
from embscale.sweeps.expand import PlannedRun
from embscale.sweeps.plan import SweepPlan


@dataclass
class RunView:
    """One run as a driver sees it: planned run, status file, latest job and whether that job lives."""

    run: PlannedRun
    run_dir: Path
    status: dict[str, Any] | None
    job: dict[str, Any] | None
    alive: bool | None  # True/False, None when it cannot be told (another host, no squeue)
    state: str = "pending"  # the state shown: the status's, or lost / failed-to-start / pending
    detail: str = ""

    @property
    def run_id(self) -> str:
        return str(self.run.run_id)

    @property
    def raw_state(self) -> str:
        return str((self.status or {}).get("state", "pending"))

    @property
    def in_flight(self) -> bool:
        return self.state in rundir.IN_FLIGHT_STATES


def driver_alive(job_map: JobMap) -> bool:
    """Whether the sweep's driver (``submit`` or ``tune``) still runs; another machine's is assumed to."""
    driver = job_map.data.get("driver") or {}
    if driver.get("host") not in (None, hostname()):
        return True
    return process_alive(driver.get("pid"), driver.get("proc_start")) and not driver.get("ended_at")


def view_runs(plan: SweepPlan, job_map: JobMap | None = None, ask_scheduler: bool = True) -> list[RunView]:
    """Every planned run with its state reconciled against its latest job."""
    job_map = job_map or JobMap.load(plan.job_map_path)
    latest = {str(run.run_id): job_map.latest(str(run.run_id)) for run in plan.runs}
    jobs = inspect_jobs({key: job for key, job in latest.items() if job}, ask_scheduler)
    driver_lives = driver_alive(job_map)
    views = []
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        job = latest[str(run.run_id)]
        alive, scheduler_state = jobs.get(str(run.run_id), (False, None))
        view = RunView(run=run, run_dir=run_dir, status=rundir.read_status(run_dir), job=job, alive=alive)
        _reconcile(view, driver_lives, scheduler_state)
        views.append(view)
    return views


def _reconcile(view: RunView, driver_lives: bool, scheduler_state: str | None) -> None:
    state = view.raw_state
    status = view.status or {}
    job = view.job or {}
    view.state = state
    if state in rundir.FAILED_STATES:
        view.detail = first_line(status.get("error"))
    if state == "running":
        if view.alive is False:
            view.state = rundir.LOST
            view.detail = f"job {job.get('job_id', '?')} is gone"
        elif view.alive is None and job.get("host") not in (None, hostname()):
            view.detail = f"on {job.get('host')}"
    elif state == "pending" and view.alive:
        view.state = "queued"
        view.detail = "starting"
    elif state == "queued":
        if not status.get("job_id"):  # waiting in a driver's queue, no job yet
            if not driver_lives:
                view.state = "pending"
                view.detail = "not started: its driver exited"
        elif view.alive is False:
            view.state = rundir.FAILED_TO_START
            view.detail = f"job {job.get('job_id', '?')} is gone"
    if scheduler_state is not None and view.alive:
        # Requeued (scontrol requeue, preemption, time-out): the status file still tells the last attempt.
        normal = state == "queued" or (state == "running" and scheduler_state == "RUNNING")
        if state not in rundir.TERMINAL_STATES and not normal:
            view.state = "running" if scheduler_state == "RUNNING" else "queued"
            view.detail = f"requeued after {state} ({scheduler_state.lower()} in the scheduler)"


def select_runs(views: list[RunView], retry_failed: bool) -> tuple[list[RunView], dict[str, list[str]]]:
    """The runs to submit, and the others grouped by why they are left alone."""
    chosen: list[RunView] = []
    skipped: dict[str, list[str]] = {"completed": [], "failed": [], "in flight": []}
    for view in views:
        if view.state == "completed":
            skipped["completed"].append(view.run_id)
        elif view.state in rundir.FAILED_STATES and not retry_failed:
            skipped["failed"].append(view.run_id)
        elif view.state in rundir.IN_FLIGHT_STATES and view.alive is not False:
            skipped["in flight"].append(view.run_id)
        else:
            chosen.append(view)
    return chosen, skipped


# ----------------------------------------------------------------------------------------------------- progress
def _metrics_rate(run_dir: Path) -> tuple[float | None, float | None]:
    """(tokens/s, tokens per step) of the last logged steps, or Nones when there are no metrics yet."""
    table = rundir.read_metrics(run_dir, columns=["step", "tokens", "tokens_per_s"])
    if table is None or table.num_rows == 0:
        return None, None
    steps = table.column("step").to_pylist()
    tokens = table.column("tokens").to_pylist()
    rates = [r for r in table.column("tokens_per_s").to_pylist()[-20:] if r is not None and r == r and r > 0]
    per_step = tokens[-1] / steps[-1] if steps[-1] else None
    return (sum(rates) / len(rates) if rates else None), per_step


def run_rate(view: RunView) -> dict[str, float | None]:
    """Progress and speed of one run: fraction done, steps/s and tokens/s (None where unknown)."""
    status = view.status or {}
    step = float(status.get("step") or 0)
    total = float(status.get("total_steps") or 0)
    fraction = min(1.0, step / total) if total else 0.0
    if view.state == "completed":
        fraction = 1.0
    tokens_per_s, tokens_per_step = _metrics_rate(view.run_dir) if view.state == "running" else (None, None)
    steps_per_s = None
    if tokens_per_s and tokens_per_step:
        steps_per_s = tokens_per_s / tokens_per_step
    elif view.state == "running" and step > 0:
        job = view.job or {}
        started = parse_time(job.get("started_at")) or parse_time(job.get("submitted_at"))
        updated = parse_time(status.get("updated_at"))
        if started and updated and updated > started:
            steps_per_s = step / (updated - started)
    if tokens_per_s is None and steps_per_s and total and view.run.tokens:
        tokens_per_s = steps_per_s * view.run.tokens / total
    return {"fraction": fraction, "steps_per_s": steps_per_s, "tokens_per_s": tokens_per_s,
            "step": step, "total": total}


def summarize(plan: SweepPlan, views: list[RunView]) -> dict[str, Any]:
    """Every run's state, step, job and ETA, the counts by state, and the sweep's ETA (``eta_s``; None when no
    run trains now)."""
    counts = Counter(view.state for view in views)
    flops_rate = 0.0
    remaining_flops = 0.0
    rows = []
    for view in views:
        rate = run_rate(view)
        run = view.run
        flops_per_token = run.flops / run.tokens if run.tokens else 0.0
        eta_run = None
        if view.state == "running" and rate["steps_per_s"] and rate["total"]:
            eta_run = max(0.0, (rate["total"] - rate["step"]) / rate["steps_per_s"])
        if view.state == "running" and rate["tokens_per_s"]:
            flops_rate += rate["tokens_per_s"] * flops_per_token
        if view.state not in ("completed", "failed", "diverged", "cancelled"):
            remaining_flops += run.flops * (1.0 - rate["fraction"])
        status = view.status or {}
        rows.append({
            "run_id": view.run_id, "family": run.family, "point": run.point, "state": view.state,
            "step": status.get("step"), "total_steps": status.get("total_steps"),
            "job_id": (view.job or {}).get("job_id"), "detail": view.detail,
            "error": first_line(status.get("error")) or None, "eta_s": eta_run,
            "tokens_per_s": rate["tokens_per_s"],
        })
    eta = remaining_flops / flops_rate if flops_rate > 0 else (0.0 if remaining_flops == 0 else None)
    return {"sweep": plan.name, "runs": rows, "counts": dict(counts), "total": len(views),
            "eta_s": eta, "remaining_flops": remaining_flops, "checked_at": time.time()}


__all__ = ["RunView", "driver_alive", "run_rate", "select_runs", "summarize", "view_runs"]
