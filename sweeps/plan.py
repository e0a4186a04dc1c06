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

from embscale.base.errors import ConfigError, UserError
from embscale.models.config import ModelConfig
from embscale.sweeps.executors.jobmap import JOBS_FILE
from embscale.sweeps.expand import Plan, PlannedRun, expand
from embscale.sweeps.memory import (
    HEADROOM,
    MemoryEstimate,
    estimate_memory,
    fits,
    gib,
    parse_memory,
    shard_degrees,
    smallest_fitting,
)
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


def _section_key(section: dict[str, Any]) -> object:
    """A key equal for equal config sections (a run's ``data`` or ``training``), so that each distinct one is
    built once: its items as nested tuples, each value with its type (``1``, ``1.0`` and ``True`` are equal in
    Python, not in a config), when it holds plain scalars, lists and dicts only, as the sections a plan makes do
    (the same section written in another key order only costs a second build); else its canonical JSON, which
    10,000 runs paid twice, at three times the cost."""
    try:  # the top level in one pass: most values are scalars, keyed without a call each
        return tuple([(name, type(value), value) if type(value) in _SCALARS else (name, _plain_key(value))
                      for name, value in section.items()])
    except TypeError:
        return json.dumps(section, sort_keys=True, default=str)


_SCALARS = frozenset({int, float, str, bool, type(None)})


def _plain_key(value: Any) -> object:
    kind = type(value)
    if kind in _SCALARS:
        return kind, value
    if kind is dict:
        return dict, tuple((name, _plain_key(item)) for name, item in value.items())
    if kind is list:
        return list, tuple(_plain_key(item) for item in value)
    raise TypeError(kind)


def data_checks(plan: Plan, cache: Path | None = None) -> dict[str, DataCheck]:
    """:class:`DataCheck` of every planned run, by run id; each distinct data section's corpus is sized once
    (:func:`~embscale.training.data.sizes.split_tokens`: no corpus is opened or tokenised)."""
    default_eval = TrainingConfig.__dataclass_fields__["eval_tokens"].default
    sizes: dict[object, dict[str, SplitTokens]] = {}
    checks: dict[str, DataCheck] = {}
    for run in plan.runs:
        data = run.config.get("data") or {}
        key = _section_key(data)
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


# ----- memory ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryLimits:
    """What a run may use: the memory of one GPU (None: not known, memory is not checked) and where that came
    from, the GPUs per node and nodes of a run, and the shard degree asked for (``"auto"``: the smallest that
    fits)."""

    gpu_memory: int | None
    source: str
    gpus_per_node: int
    nodes: int
    shard: int | str = 1

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def describe(self) -> str:
        memory = f"{gib(self.gpu_memory)} per GPU ({self.source})" if self.gpu_memory else "memory not checked"
        shard = "auto (smallest that fits)" if self.shard == "auto" else str(self.shard)
        return (f"{self.gpus} GPU(s) per run ({self.nodes} node(s) x {self.gpus_per_node}), {memory}, "
                f"shard {shard}")

    def to_dict(self) -> dict[str, Any]:
        return {"gpu_memory": self.gpu_memory, "source": self.source, "gpus_per_node": self.gpus_per_node,
                "nodes": self.nodes, "gpus": self.gpus, "shard": self.shard}


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(where, f"must be a positive integer, got {value!r}")
    return value


def _local_gpus() -> tuple[int, int | None]:
    """(count, memory of GPU 0 in bytes) of this machine's CUDA GPUs; (0, None) without torch or CUDA."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return 0, None
    if not any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia")):
        return 0, None  # no NVIDIA driver: spare the plan the second that importing torch takes
    import torch

    if not torch.cuda.is_available():
        return 0, None
    return torch.cuda.device_count(), int(torch.cuda.get_device_properties(0).total_memory)


def memory_limits(sweep: Sweep, gpu_memory: str | None = None, gpus_per_node: int | None = None,
                  nodes: int | None = None, shard: str | int | None = None,
                  executor_type: str | None = None) -> MemoryLimits:
    """The limits of the memory check, and the GPUs each run is launched with: the command line's values first, else
    the sweep's ``slurm`` section (``gpu_memory``, ``gpus_per_node``, ``nodes``: a Slurm job of ``nodes x
    gpus_per_node`` tasks) when it dispatches to Slurm, else its ``executor`` section (``gpu_memory``,
    ``gpus_per_run``), else what the local queue gives a run: one GPU (of this machine's GPU 0's memory, else of
    unknown memory). ``executor_type`` (``embscale plan --executor``) names the executor the runs will be submitted
    to, else the sweep's ``executor.type``, else Slurm when the sweep has a ``slurm`` section. ``shard``: ``auto``,
    a power of two, or None: the sweep's ``training.parallel`` and ``training.shard_degree`` (``fsdp``: that degree,
    else all the run's GPUs; ``hsdp``: that degree, else one node's; ``ddp`` or not given: 1)."""
    slurm = sweep.slurm or {}
    executor = sweep.executor or {}
    if executor_type is not None:
        on_slurm = executor_type == "slurm"
    else:
        on_slurm = executor.get("type") == "slurm" or (bool(slurm) and "type" not in executor)
    sections = [("slurm", slurm), ("executor", executor)] if on_slurm else [("executor", executor), ("slurm", slurm)]
    source, memory = "", None
    if gpu_memory is not None:
        memory, source = parse_memory(gpu_memory, "--gpu-memory"), "--gpu-memory"
    else:
        for name, section in sections:
            if section.get("gpu_memory") is not None:
                memory = parse_memory(section["gpu_memory"], f"{name}.gpu_memory")
                source = f"{name}.gpu_memory"
                break
    if memory is None:
        _, local_memory = _local_gpus()
        if local_memory:
            memory, source = local_memory, "this machine's GPU 0"
    if gpus_per_node is not None:
        per_node = _positive_int(gpus_per_node, "--gpus-per-node")
    elif on_slurm and slurm.get("gpus_per_node"):
        per_node = int(slurm["gpus_per_node"])
    elif executor.get("gpus_per_run"):
        per_node = int(executor["gpus_per_run"])
    else:  # the local queue's default (executor.gpus_per_run): one GPU per run
        per_node = 1
    if nodes is not None:
        node_count = _positive_int(nodes, "--nodes")
    else:
        node_count = int(slurm.get("nodes") or 1) if on_slurm else 1
    if shard is None:  # the sweep's training.parallel (ddp, fsdp, hsdp) and shard_degree (0: a node's GPUs)
        training = sweep.training or {}
        degree = int(training.get("shard_degree") or 0)
        shard = {"auto": "auto", "fsdp": degree or per_node * node_count, "hsdp": degree or per_node}.get(
            str(training.get("parallel")), 1)
    elif shard != "auto":
        try:
            shard = int(shard)
        except (TypeError, ValueError):
            raise ConfigError("--shard", f"must be auto or a power of two, got {shard!r}") from None
        degrees = shard_degrees(per_node * node_count)
        if shard not in degrees:
            raise ConfigError("--shard", f"must be auto or one of {', '.join(map(str, degrees))} (powers of two "
                                         f"dividing the run's {per_node * node_count} GPU(s)), got {shard}")
    return MemoryLimits(gpu_memory=memory, source=source, gpus_per_node=per_node, nodes=node_count, shard=shard)


@dataclass(frozen=True)
class MemoryCheck:
    """A run's memory per GPU at its shard degree (the asked one, or with ``auto`` the smallest that fits, or
    the largest when none does) and whether it fits (None: memory unknown)."""

    estimate: MemoryEstimate
    fits: bool | None
    fitting_shard: int | None  # the smallest shard degree that fits, None when none does or memory is unknown

    def to_dict(self) -> dict[str, Any]:
        return {**self.estimate.to_dict(), "fits": self.fits, "fitting_shard": self.fitting_shard}


def memory_checks(plan: Plan, limits: MemoryLimits) -> dict[str, MemoryCheck]:
    """:class:`MemoryCheck` of every planned run, by run id (see :mod:`embscale.sweeps.memory`)."""
    checks: dict[str, MemoryCheck] = {}
    models: dict[str, ModelConfig] = {}
    trainings: dict[str, TrainingConfig] = {}
    gpus, memory = limits.gpus, limits.gpu_memory
    for run in plan.runs:
        cfg = plan.model_configs.get(str(run.run_id))
        if cfg is None:  # a plan put together by hand
            key = json.dumps(run.config["model"], sort_keys=True, default=str)
            if key not in models:
                models[key] = ModelConfig.from_dict(run.config["model"])
            cfg = models[key]
        groups = run.accounting["groups"]
        training_key = _section_key(run.config.get("training") or {})
        if training_key not in trainings:
            trainings[training_key] = TrainingConfig(**(run.config.get("training") or {}))
        training = trainings[training_key]
        fitting = smallest_fitting(cfg, groups, training, gpus, memory) if memory else None
        if limits.shard == "auto":
            shard = fitting.shard if fitting else (shard_degrees(gpus)[-1] if memory else 1)
        else:
            shard = int(limits.shard)
        estimate = fitting if fitting is not None and fitting.shard == shard else \
            estimate_memory(cfg, groups, training, gpus, shard)
        fitting_now = None if memory is None else fits(estimate, memory)
        checks[str(run.run_id)] = MemoryCheck(estimate, fitting_now, fitting.shard if fitting else None)
    return checks


def memory_refusal(plan: Plan, checks: dict[str, MemoryCheck], limits: MemoryLimits) -> UserError | None:
    """The error naming every run that does not fit in the GPUs it may use (None when all fit or memory is not
    known): its id, its estimate per GPU at its shard degree, the memory and GPUs it has, and the shard degree
    that would fit or why none does."""
    if limits.gpu_memory is None:
        return None
    failing = [run for run in plan.runs if checks[str(run.run_id)].fits is False]
    if not failing:
        return None
    lines = [f"{len(failing)} of {len(plan.runs)} run(s) do not fit in {gib(limits.gpu_memory)} per GPU "
             f"({limits.source}) on {limits.gpus} GPU(s) ({limits.nodes} node(s) x {limits.gpus_per_node}):"]
    for run in failing:
        check = checks[str(run.run_id)]
        estimate = check.estimate
        ratio = f" ratio {run.target_ratio:g}" if run.target_ratio is not None else ""
        line = (f"  {run.run_id} ({run.family}{ratio}, {run.total / 1e9:.2f}B parameters): needs "
                f"{gib(estimate.peak)} per GPU at shard {estimate.shard}")
        if check.fitting_shard is not None:
            line += f"; fits at shard {check.fitting_shard} (--shard {check.fitting_shard} or --shard auto)"
        elif estimate.replicated_tables:
            line += (f"; fits at no shard degree up to {limits.gpus}: its N-gram tables stay replicated "
                     f"({gib(estimate.replicated_tables)} per GPU with their gradients and optimizer state; "
                     "training.table_optimizer dense with table_optimizer_moments compact keeps about 6 bytes per "
                     "table element instead of AdamW's 16, and training.table_sharding rows divides them by the "
                     "shard degree)")
        else:
            line += f"; fits at no shard degree up to {limits.gpus}: give it more GPUs (--gpus-per-node, --nodes)"
        lines.append(line)
    lines.append(f"memory is the estimate of embscale.sweeps.memory (steady state: parameters, gradients, "
                 f"optimizer state, activations of one micro-batch), with {gib(HEADROOM)} per GPU kept for the CUDA "
                 "context, workspaces and fragmentation")
    return UserError("\n".join(lines))


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
    """The RunConfig mapping a job trains: the planned sections, plus the output: the sweep file's ``output``
    section (tracking, log interval) and where results go."""
    config = {key: value for key, value in dict(run.config).items() if key != "output"}
    output = {**plan.sweep.output, **dict(dict(run.config).get("output") or {})}
    output.update(root=str(plan.results_root), sweep=plan.name)
    config["output"] = output
    return config


__all__ = ["RESULTS_ENV", "DataCheck", "MemoryCheck", "MemoryLimits", "SweepPlan", "data_checks", "data_warnings",
           "load_plan", "memory_checks", "memory_limits", "memory_refusal", "planned_record", "results_root",
           "run_config_dict"]
