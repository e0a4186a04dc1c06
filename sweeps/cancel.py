"""``embscale cancel``: stop a sweep's driver and every queued or running job of its runs and tune trials.

Local jobs get SIGTERM on their process group (the trainer checkpoints and exits), then SIGKILL; Slurm jobs are
``scancel``-ed. Their runs are marked ``cancelled`` (runs that completed, failed or diverged meanwhile keep their
state); a cancelled run resumes from its last checkpoint when the sweep is submitted again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from embscale.base import rundir
from embscale.sweeps.executors.jobmap import JobMap, hostname, process_alive
from embscale.sweeps.executors.jobs import inspect_jobs, stop_jobs
from embscale.sweeps.plan import SweepPlan
from embscale.sweeps.status import driver_alive, view_runs
from embscale.sweeps.submit import safe_log


@dataclass
class CancelReport:
    cancelled: list[str] = field(default_factory=list)
    driver_stopped: bool = False
    still_running: list[str] = field(default_factory=list)


def cancel(plan: SweepPlan, log: Callable[[str], None] | None = None, wait_s: float = 60.0) -> CancelReport:
    """Stop the sweep's driver (``submit`` or ``tune``), cancel every queued or running job of its runs and tune
    trials, and mark those runs ``cancelled``."""
    log = safe_log(log)
    report = CancelReport()
    job_map = JobMap.load(plan.job_map_path)
    # Runs waiting in a driver's queue: the driver puts them back to pending when it stops; they are cancelled.
    waiting = {v.run_id for v in view_runs(plan, job_map, ask_scheduler=False)
               if v.raw_state == "queued" and not (v.status or {}).get("job_id")}
    driver = job_map.data.get("driver") or {}
    if driver_alive(job_map) and driver.get("host") in (None, hostname()) and driver.get("pid") != os.getpid():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(driver["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process_alive(driver.get("pid"), driver.get("proc_start")):
            time.sleep(0.1)
        report.driver_stopped = True
        log(f"stopped the driver (pid {driver['pid']})")

    job_map = JobMap.load(plan.job_map_path)
    targets: dict[str, tuple[Path, dict | None]] = {}
    for view in view_runs(plan, job_map):
        if view.raw_state in rundir.IN_FLIGHT_STATES or (view.alive and view.job) or view.run_id in waiting:
            targets[view.run_id] = (view.run_dir, view.job if view.alive is not False else None)
    # Jobs of the job map that are not planned runs: tune trials.
    planned = {str(run.run_id) for run in plan.runs}
    trials = {key: history[-1] for key, history in job_map.runs.items()
              if key not in planned and history and not history[-1].get("ended_at")}
    for key, (alive, _) in inspect_jobs(trials).items():
        if alive is not False and trials[key].get("run_dir"):
            targets[key] = (Path(trials[key]["run_dir"]), trials[key])

    running = {key: job for key, (_, job) in targets.items() if job and job.get("job_id")}
    report.still_running = sorted(str(running[key]["job_id"]) for key in stop_jobs(running, grace_s=wait_s))
    now = time.time()
    with JobMap.locked(plan.job_map_path) as locked:
        for key in targets:
            latest = locked.latest(key)
            if latest is not None and latest.get("job_id") and not latest.get("ended_at"):
                latest.update(ended_at=now, cancelled_at=now)
    for key, (run_dir, _) in targets.items():
        if rundir.run_state(run_dir) in rundir.TERMINAL_STATES:
            continue
        rundir.write_status(run_dir, "cancelled")
        report.cancelled.append(key)
    log(f"cancelled {len(report.cancelled)} runs of sweep {plan.name}")
    return report


__all__ = ["CancelReport", "cancel"]
