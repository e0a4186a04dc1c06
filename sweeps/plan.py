"""The plan of a sweep: its file, validated and expanded into parameter-matched runs, and where their results live.

:func:`load_plan` is the one way in to a sweep for every command (``plan``, ``submit``, ``status``, ``cancel``,
``tune``, ``demo``): the sweep file is validated whole (every section, ``executor``, ``slurm`` and ``tune``
included) before anything is written. Each planned run has a folder ``<results>/<sweep>/<run_id>/``
(:mod:`embscale.base.rundir`) whose run.json starts as :func:`planned_record`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embscale.base.errors import ConfigError
from embscale.sweeps.executors.jobmap import JOBS_FILE
from embscale.sweeps.expand import Plan, PlannedRun, expand
from embscale.sweeps.sweepfile import Sweep, load_sweep

RESULTS_ENV = "EMBSCALE_RESULTS"


@dataclass
class SweepPlan:
    """A loaded sweep, its expansion, and where its results live."""

    sweep: Sweep
    plan: Plan
    results_root: Path
    sweep_path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.sweep.name)

    @property
    def sweep_dir(self) -> Path:
        return self.results_root / self.name

    @property
    def job_map_path(self) -> Path:
        return self.sweep_dir / JOBS_FILE

    @property
    def runs(self) -> list[PlannedRun]:
        return list(self.plan.runs)

    def run_dir(self, run: PlannedRun) -> Path:
        return self.sweep_dir / str(run.run_id)


def results_root(given: str | Path | None = None) -> Path:
    """The results folder: ``given``, else ``$EMBSCALE_RESULTS``, else ``./results``."""
    return Path(given or os.environ.get(RESULTS_ENV) or "results").resolve()


def load_plan(sweep_path: str | Path, results: str | Path | None = None) -> SweepPlan:
    """Load, validate and expand a sweep file (ConfigError naming the file and field when it is bad)."""
    path = Path(sweep_path)
    sweep = load_sweep(path)
    try:
        plan = expand(sweep)
    except ConfigError as exc:
        raise exc.in_file(str(path)) from None
    return SweepPlan(sweep=sweep, plan=plan, results_root=results_root(results), sweep_path=path)


def planned_record(run: PlannedRun, sweep_name: str, planned_by: str = "embscale submit") -> dict[str, Any]:
    """What run.json holds for a planned run before its trainer starts: the planned run, the sweep's name, and
    which command planned it."""
    from embscale.base.rundir import PLANNED_BY  # here: the run folder's module (and tqdm) cost `plan` a third
    # of its start-up, and only writing a run needs it

    record = dict(run.to_dict())
    record.setdefault("run_id", str(run.run_id))
    record["sweep"] = sweep_name
    record[PLANNED_BY] = planned_by
    return record


def run_config_dict(run: PlannedRun, plan: SweepPlan) -> dict[str, Any]:
    """The RunConfig mapping a job trains: the planned sections, plus where results go."""
    config = {key: value for key, value in dict(run.config).items() if key != "output"}
    output = dict(dict(run.config).get("output") or {})
    output.update(root=str(plan.results_root), sweep=plan.name)
    config["output"] = output
    return config


__all__ = ["RESULTS_ENV", "SweepPlan", "load_plan", "planned_record", "results_root", "run_config_dict"]
