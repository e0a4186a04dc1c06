"""The sections of a sweep file that say where and how its runs are dispatched: ``executor``, ``slurm``, ``tune``.

:func:`embscale.sweeps.sweepfile.parse_sweep` validates them with the functions here, so ``embscale plan`` rejects
a misspelt key as ``submit`` and ``tune`` would; the command-line overrides of ``submit`` and ``tune`` go through
the same functions. Errors are :class:`~embscale.base.errors.ConfigError` naming ``<section>.<key>``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from embscale.base.errors import ConfigError

EXECUTORS = ("local", "slurm", "debug")

# The ``executor:`` section of a sweep file and what each key means.
EXECUTOR_KEYS = {
    "type": "default executor when --executor is not given (local, slurm, debug)",
    "cpu_jobs": "local: concurrent CPU jobs on a machine without GPU",
    "gpus_per_run": "local: GPUs each run gets, one process (rank) per GPU (default 1 on a GPU machine)",
    "processes": "local: processes (gloo ranks) of each run on a machine without GPU (default 1)",
    "runs_per_gpu": "local: one-GPU runs sharing each GPU at once (default 1; packs small runs)",
    "warm_workers": "local: one process per slot trains its one-process runs one after another (default false)",
    "timeout_min": "local: time limit of one job in minutes",
    "poll_s": "seconds between looks at the jobs",
    "log_interval_s": "seconds between progress lines",
    "gpu_memory": "memory of one GPU, e.g. 80GiB: embscale plan checks each run's estimated peak against it",
}
# The ``slurm:`` section: our name -> submitit SlurmExecutor parameter.
SLURM_KEYS = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "time": "time",
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "ntasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem",
    "constraint": "constraint",
    "exclude": "exclude",
    "nodelist": "nodelist",
    "array_parallelism": "array_parallelism",
    "signal_delay_s": "signal_delay_s",
    "job_name": "job_name",
    "setup": "setup",
    "sbatch": "additional_parameters",
    "srun_args": "srun_args",
    "max_requeues": None,  # how often a job near its time limit requeues itself (default 3)
    "gpu_memory": None,  # memory of one GPU of the partition, e.g. 80GiB (embscale plan's memory check only)
}


def executor_options(section: dict[str, Any]) -> dict[str, Any]:
    """Validate a sweep file's ``executor:`` section."""
    unknown = [key for key in section if key not in EXECUTOR_KEYS]
    if unknown:
        raise ConfigError(f"executor.{unknown[0]}", f"unknown key; known keys are {', '.join(EXECUTOR_KEYS)}")
    out = dict(section)
    if "type" in out and out["type"] not in EXECUTORS:
        raise ConfigError("executor.type", f"unknown value {out['type']!r}; expected one of {', '.join(EXECUTORS)}")
    for key in ("cpu_jobs", "gpus_per_run", "processes"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0):
            raise ConfigError(f"executor.{key}", f"must be a non-negative integer, got {out[key]!r}")
    for key in ("cpu_jobs", "processes"):
        if out.get(key) == 0:
            raise ConfigError(f"executor.{key}", "must be at least 1")
    if "gpu_memory" in out:
        gpu_memory(out["gpu_memory"], "executor.gpu_memory")
    if "runs_per_gpu" in out:
        check_runs_per_gpu(out["runs_per_gpu"], out.get("gpus_per_run"))
    if "warm_workers" in out and not isinstance(out["warm_workers"], bool):
        raise ConfigError("executor.warm_workers", f"must be true or false, got {out['warm_workers']!r}")
    for key in ("timeout_min", "poll_s", "log_interval_s"):
        if key in out and (not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or out[key] <= 0):
            raise ConfigError(f"executor.{key}", f"must be a positive number, got {out[key]!r}")
    return out


def gpu_memory(value: Any, where: str) -> int:
    """Bytes of a ``gpu_memory`` key (``80GiB``, ``141GiB``, ``80GB``, ``24576MiB``); ConfigError naming ``where``."""
    from embscale.sweeps.memory import parse_memory

    return parse_memory(value, where)


def check_runs_per_gpu(runs_per_gpu: Any, gpus_per_run: Any = None, where: str = "executor.runs_per_gpu") -> int:
    """A valid ``runs_per_gpu``: a positive integer, and 1 unless runs get one GPU each (a run of several GPUs
    holds them alone)."""
    if not isinstance(runs_per_gpu, int) or isinstance(runs_per_gpu, bool) or runs_per_gpu < 1:
        raise ConfigError(where, f"must be a positive integer, got {runs_per_gpu!r}")
    if runs_per_gpu > 1 and isinstance(gpus_per_run, int) and gpus_per_run > 1:
        raise ConfigError(where, f"packs runs of one GPU each; with gpus_per_run {gpus_per_run} it must be 1")
    return runs_per_gpu


def slurm_minutes(value: Any, where: str = "slurm.time") -> int:
    """Minutes from an int or a Slurm time string (``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``, ``D-HH``)."""
    if isinstance(value, bool):
        raise ConfigError(where, f"must be minutes or a time like 2:00:00, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(where, f"must be positive, got {value!r}")
        return int(-(-value // 1))
    text = str(value).strip()
    parts = re.match(r"^(\d+)-(\d+)$", text)
    if parts:  # D-HH
        return int(parts.group(1)) * 1440 + int(parts.group(2)) * 60
    pieces = text.split("-")
    days = 0
    if len(pieces) == 2 and pieces[0].isdigit():
        days, text = int(pieces[0]), pieces[1]
    fields = text.split(":")
    if not all(f.isdigit() for f in fields) or not 1 <= len(fields) <= 3:
        raise ConfigError(where, f"must be minutes or a time like 2:00:00 or 1-00:00:00, got {value!r}")
    numbers = [int(f) for f in fields]
    if len(fields) == 1:
        hours, minutes, seconds = 0, numbers[0], 0
    elif len(fields) == 2:
        hours, minutes, seconds = (0, numbers[0], numbers[1]) if not days else (numbers[0], numbers[1], 0)
    else:
        hours, minutes, seconds = numbers
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ConfigError(where, f"must be positive, got {value!r}")
    return total


def slurm_parameters(section: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters from a ``slurm:`` section with command-line ``overrides`` on top.

    Returns the parameters plus ``_max_requeues`` (popped by the caller). Unknown keys are errors.
    """
    merged = {**section, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if "sbatch" in section and "sbatch" in (overrides or {}) and overrides["sbatch"]:
        merged["sbatch"] = {**section["sbatch"], **overrides["sbatch"]}
    unknown = [key for key in merged if key not in SLURM_KEYS]
    if unknown:
        raise ConfigError(f"slurm.{unknown[0]}", f"unknown key; known keys are {', '.join(SLURM_KEYS)}")
    params: dict[str, Any] = {}
    for key, value in merged.items():
        if value is None:
            continue
        target = SLURM_KEYS[key]
        if key == "gpu_memory":  # not a submitit parameter: validated, left to embscale plan
            gpu_memory(value, "slurm.gpu_memory")
            continue
        if key == "time":
            value = slurm_minutes(value)
        elif key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "array_parallelism",
                     "signal_delay_s", "max_requeues"):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "gpus_per_node" else 1):
                raise ConfigError(f"slurm.{key}", f"must be a positive integer, got {value!r}")
        elif key == "mem_gb":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError("slurm.mem_gb", f"must be a positive number of GB, got {value!r}")
            value = f"{int(value)}GB" if value == int(value) else f"{int(value * 1024)}MB"
        elif key == "sbatch":
            if not isinstance(value, dict):
                raise ConfigError("slurm.sbatch", "must be a mapping of sbatch option to value, e.g. {mail-type: END}")
            value = {str(k): v for k, v in value.items()}
        elif key in ("setup", "srun_args"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"slurm.{key}", "must be a list of strings")
        elif not isinstance(value, str):
            value = str(value)
        if target is None:
            params["_max_requeues"] = value
        else:
            params[target] = value
    return params


TUNE_KEYS = ("param", "low", "high", "log", "trials", "per", "metric", "direction", "where", "pruner",
             "startup_trials", "parallel", "seed")
AXIS_PARAMS = ("lr", "seed")  # training fields that are also sweep axes (a per-axis value is expressible)


@dataclass
class TuneSpec:
    param: str
    low: float
    high: float
    log: bool = False
    trials: int = 8
    per: str | None = None
    metric: str | None = None  # None: the first validation loss the runs write
    direction: str = "minimize"
    where: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    startup_trials: int = 2
    parallel: int | None = None
    seed: int = 0


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(where, f"must be a finite number, got {value!r}")
    return float(value)


def _count(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(where, f"must be an integer of at least {low}, got {value!r}")
    return value


def parse_tune(section: Any, axes: tuple[str, ...]) -> TuneSpec:
    """Validate a whole ``tune:`` mapping (the sweep file's with the command line's flags on top); errors name
    ``tune.<key>``."""
    spec = _check_tune(section, axes, partial=False)
    assert spec is not None
    return spec


def check_tune_section(section: Any, axes: tuple[str, ...]) -> None:
    """Validate a sweep file's ``tune:`` section as far as it goes: ``param``, ``low`` and ``high`` may still come
    from ``embscale tune``'s flags, every key given must be known and valid."""
    _check_tune(section, axes, partial=True)


def _check_tune(section: Any, axes: tuple[str, ...], partial: bool) -> TuneSpec | None:
    from embscale.training.config import TrainingConfig

    if not isinstance(section, dict) or not (section or partial):
        raise ConfigError("tune", "must be a mapping with at least param, low and high "
                                  "(e.g. {param: lr, low: 1.0e-4, high: 1.0e-2, log: true})")
    unknown = [key for key in section if key not in TUNE_KEYS]
    if unknown:
        raise ConfigError(f"tune.{unknown[0]}", f"unknown key; known keys are {', '.join(TUNE_KEYS)}")
    if not partial:
        for key in ("param", "low", "high"):
            if section.get(key) is None:
                raise ConfigError(f"tune.{key}", "is required")
    param = None
    if section.get("param") is not None:
        param = str(section["param"]).removeprefix("training.")
        fields = TrainingConfig.__dataclass_fields__
        if param not in fields:
            raise ConfigError("tune.param", f"{param!r} is not a training field; one of {', '.join(sorted(fields))}")
    low = None if section.get("low") is None else _number(section["low"], "tune.low")
    high = None if section.get("high") is None else _number(section["high"], "tune.high")
    if low is not None and high is not None and not low < high:
        raise ConfigError("tune.high", f"must be above tune.low ({low:g}), got {high:g}")
    log = section.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError("tune.log", f"must be true or false, got {log!r}")
    if log and low is not None and low <= 0:
        raise ConfigError("tune.low", f"must be positive on a log scale, got {low:g}")
    per = section.get("per")
    if per is not None:
        if per not in axes:
            raise ConfigError("tune.per", f"{per!r} is not an axis of this sweep; its axes are "
                                          f"{', '.join(axes) or 'none'}")
        if param is not None and param not in AXIS_PARAMS:
            raise ConfigError("tune.per", f"a value of training.{param} per {per} cannot be written to a sweep "
                                          f"file (only {', '.join(AXIS_PARAMS)} are axes); tune it without per")
    direction = section.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise ConfigError("tune.direction", f"unknown value {direction!r}; expected minimize or maximize")
    pruner = section.get("pruner", "median")
    if pruner not in ("median", "none"):
        raise ConfigError("tune.pruner", f"unknown value {pruner!r}; expected median or none")
    where = section.get("where") or {}
    if not isinstance(where, dict):
        raise ConfigError("tune.where", f"must be a mapping of point values, e.g. {{family: moe}}, got {where!r}")
    metric = section.get("metric")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ConfigError("tune.metric", f"must be a metrics column name such as val_code_loss, got {metric!r}")
    parallel = section.get("parallel")
    trials = _count(section.get("trials", 8), "tune.trials", 1)
    startup_trials = _count(section.get("startup_trials", 2), "tune.startup_trials", 0)
    parallel = None if parallel is None else _count(parallel, "tune.parallel", 1)
    seed = _count(section.get("seed", 0), "tune.seed", 0)
    if partial:
        return None
    return TuneSpec(param=param, low=low, high=high, log=log, trials=trials, per=per, metric=metric,
                    direction=direction, where=dict(where), pruner=pruner, startup_trials=startup_trials,
                    parallel=parallel, seed=seed)
