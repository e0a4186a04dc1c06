"""The plan of a sweep: its file, validated and expanded into parameter-matched runs, and where their results live.

:func:`load_plan` is the one way in to a sweep for every command (``plan``, ``submit``, ``status``, ``cancel``,
``tune``, ``demo``): the sweep file is validated whole (every section, ``executor``, ``slurm`` and ``tune``
included) before anything is written. Each planned run has a folder ``<results>/<sweep>/<run_id>/``
(:mod:`embscale.base.rundir`) whose run.json starts as :func:`planned_record`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embscale.base.errors import ConfigError
from embscale.base.rundir import PLANNED_BY
from embscale.sweeps.executors.jobmap import JOBS_FILE
from embscale.sweeps.expand import Plan, PlannedRun, expand
from embscale.sweeps.sweepfile import Sweep, load_sweep
from embscale.training.config import DataConfig, TrainingConfig
from embscale.training.data.sizes import SplitTokens, split_tokens

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


@dataclass(frozen=True)
class DataCheck:
    """What a planned run does with its corpus: its epochs over the training split and the validation splits
    smaller than its ``eval_tokens`` (their loss is measured on fewer tokens than asked)."""

    epochs: float  # NaN when the corpus is not on this machine
    exact: bool  # the split sizes come from built shards or token files, not an estimate from bytes
    train: SplitTokens | None
    small_val: tuple[str, ...]

    @property
    def repeats_data(self) -> bool:
        return self.epochs > 1.0

    def epochs_text(self) -> str:
        if self.train is None:
            return "?"
        return f"{self.epochs:.2f}" if self.exact else f"~{self.epochs:.1f}"


def data_checks(plan: Plan, cache: Path | None = None) -> dict[str, DataCheck]:
    """:class:`DataCheck` of every planned run, by run id; each distinct data section's corpus is sized once
    (:func:`~embscale.training.data.sizes.split_tokens`: no corpus is opened or tokenised)."""
    default_eval = TrainingConfig.__dataclass_fields__["eval_tokens"].default
    sizes: dict[str, dict[str, SplitTokens]] = {}
    checks: dict[str, DataCheck] = {}
    for run in plan.runs:
        data = dict(run.config.get("data") or {})
        key = json.dumps(data, sort_keys=True, default=str)
        if key not in sizes:
            sizes[key] = split_tokens(DataConfig(**data), cache)
        splits = sizes[key]
        if not splits:
            checks[str(run.run_id)] = DataCheck(float("nan"), False, None, ())
            continue
        train = splits["train"]
        eval_tokens = int((run.config.get("training") or {}).get("eval_tokens", default_eval))
        small = tuple(name for name, size in splits.items() if name != "train" and size.tokens < eval_tokens)
        epochs = run.tokens / train.tokens if train.tokens > 0 else float("inf")
        checks[str(run.run_id)] = DataCheck(epochs, all(s.exact for s in splits.values()), train, small)
    return checks


def data_warnings(plan: Plan, checks: dict[str, DataCheck]) -> list[str]:
    """One line for the runs that repeat their training data and one per validation split smaller than the
    runs' ``eval_tokens``."""
    lines = []
    repeating = [run for run in plan.runs if checks[str(run.run_id)].repeats_data]
    if repeating:
        worst = max((checks[str(run.run_id)] for run in repeating), key=lambda check: check.epochs)
        lines.append(
            f"{len(repeating)} of {len(plan.runs)} runs repeat their training data (up to "
            f"{worst.epochs_text()} epochs over {worst.train.describe()} of the training split): their losses "
            "measure memorisation of repeated text as much as scaling; fits exclude them unless told otherwise "
            "(embscale plots --repeated-data include). Train on a larger corpus or for fewer tokens.")
    unknown = [run for run in plan.runs if checks[str(run.run_id)].train is None]
    if unknown:
        corpora = sorted({str((run.config.get("data") or {}).get("corpus")) for run in unknown})
        lines.append(f"epochs unknown for {len(unknown)} run(s): corpus {', '.join(corpora)} is not on this machine")
    small = sorted({name for check in checks.values() for name in check.small_val})
    for name in small:
        count = sum(name in check.small_val for check in checks.values())
        lines.append(f"validation split {name} is smaller than training.eval_tokens for {count} run(s): its "
                     "loss is measured on the whole split, fewer tokens than asked")
    return lines


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
    record = dict(run.to_dict())
    record.setdefault("run_id", str(run.run_id))
    record["sweep"] = sweep_name
    record[PLANNED_BY] = planned_by
    return record


def run_config_dict(run: PlannedRun, plan: SweepPlan) -> dict[str, Any]:
    """The RunConfig mapping a job trains: the planned sections, plus the output: the sweep file's ``output``
    section (tracking, log interval) and where results go."""
    config = {key: value for key, value in dict(run.config).items() if key != "output"}
    output = {**plan.sweep.output, **dict(dict(run.config).get("output") or {})}
    output.update(root=str(plan.results_root), sweep=plan.name)
    config["output"] = output
    return config


__all__ = ["RESULTS_ENV", "DataCheck", "SweepPlan", "data_checks", "data_warnings", "load_plan", "planned_record",
           "results_root", "run_config_dict"]
