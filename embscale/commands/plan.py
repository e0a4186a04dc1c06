"""``embscale plan SWEEP.yaml``: expand a sweep file into parameter-matched runs, with compute estimates.

Prints a table of the runs (id, family, width, depth, experts, top-k, N, K, table rows, total, activated,
NE share, target and achieved ratio, match error, tokens, epochs over the training split, training FLOPs,
GPU-hours at the stated MFU, hours of wall-clock time on the run's GPUs, GPUs of a run, shard degree, estimated
peak memory per GPU), the skipped points
with their reasons, warnings about runs that repeat their training data or evaluate on a validation split
smaller than ``eval_tokens``, and the sweep's total compute;
``--json`` prints the whole plan as JSON instead. Epochs are exact once a run has built the corpus's shards
and estimated from its bytes before (marked ``~``). The whole sweep file is validated, ``executor``,
``slurm`` and ``tune`` sections included. Writes nothing.

Memory (:mod:`embscale.sweeps.memory`): each run's steady-state peak per GPU is estimated and checked against the
memory of one GPU (``--gpu-memory``, else ``gpu_memory`` of the sweep's ``slurm``/``executor`` section, else this
machine's GPU, else not checked) on the GPUs a run may use (``--gpus-per-node`` x ``--nodes``, else the sweep's
sections). ``--shard auto`` picks the smallest shard degree that fits. A run that does not fit is refused: exit 2
naming each such run with its estimate and the memory and GPUs it has.

GPUs: a run is launched on ``nodes x gpus_per_node`` GPUs (Slurm: that many tasks, one per GPU) or on the local
queue's ``gpus_per_run`` (one process per GPU), the same numbers the memory check uses. GPU-hours are the run's
FLOPs at the stated MFU of each GPU, the same on any number of GPUs; ``hours`` is its wall-clock time on its GPUs
(GPU-hours / GPUs, at that MFU on every GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from typing import Any

from embscale.base.errors import ConfigError
from embscale.sweeps.expand import DEFAULT_MFU, DEFAULT_PEAK_FLOPS, Plan, PlannedRun
from embscale.sweeps.memory import HEADROOM, gib
from embscale.sweeps.plan import (
    DataCheck,
    MemoryCheck,
    MemoryLimits,
    data_checks,
    data_warnings,
    load_plan,
    memory_checks,
    memory_limits,
    memory_refusal,
)
from embscale.sweeps.sections import EXECUTORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="the sweep file (YAML)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model-FLOPs utilisation for the GPU-hour estimate (default {DEFAULT_MFU})")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_FLOPS / 1e12,
                        help="peak dense TFLOP/s of one GPU (default %(default)g, H100 SXM bf16)")
    parser.add_argument("--gpu-memory", default=None,
                        help="memory of one GPU, e.g. 80GiB, 141GiB, 80GB (default: gpu_memory of the sweep's "
                             "slurm/executor section, else this machine's GPU, else memory is not checked)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node a run may use (default: the sweep's slurm.gpus_per_node or "
                             "executor.gpus_per_run, else 1: what the local queue gives a run)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes a run may use (default: slurm.nodes or 1)")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="the executor the runs will be submitted to, whose section gives the GPUs per run "
                             "(default: the sweep's executor.type, else slurm when it has a slurm section)")
    parser.add_argument("--shard", default=None,
                        help="shard degree of parameters, gradients and optimizer state: 1 (DDP, the default), "
                             "2, 4, ... (FSDP, modelled; N-gram tables stay replicated) or auto (the smallest "
                             "that fits)")


def human(value: float) -> str:
    """1234567 -> '1.23M'."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def wall_hours(run: PlannedRun, mfu: float, peak: float, gpus: int) -> float:
    """Hours of wall-clock time of ``run`` on ``gpus`` GPUs, each at ``mfu`` of ``peak`` FLOP/s."""
    return run.gpu_hours(mfu, peak) / max(1, gpus)


def _row(run: PlannedRun, mfu: float, peak: float, check: DataCheck, memory: MemoryCheck | None) -> list[str]:
    model = run.config["model"]
    ngram = model.get("ngram") or (model.get("per_layer") or {}).get("ngram")
    return [
        run.run_id,
        run.family,
        str(model["d_model"]),
        str(model["n_layers"]),
        str(model["n_experts"]) + (f"+{model['n_zero_experts']}z" if model["n_zero_experts"] else ""),
        str(model["top_k"]),
        str(ngram["n"]) if ngram else "-",
        str(ngram["k"]) if ngram else "-",
        human(run.table_rows) if run.table_rows is not None else "-",
        human(run.total),
        human(run.activated),
        f"{run.ne_share:.1%}",
        _ratio(run.target_ratio),
        _ratio(run.achieved_ratio),
        "-" if run.match_error is None else f"{run.match_error:+.3%}" + ("" if run.matched else " !"),
        human(run.tokens),
        check.epochs_text() + (" !" if check.repeats_data else ""),
        f"{run.flops:.3g}",
        f"{run.gpu_hours(mfu, peak):.3g}",
        f"{wall_hours(run, mfu, peak, memory.estimate.gpus):.3g}" if memory else "-",
        str(memory.estimate.gpus) if memory else "-",
        str(memory.estimate.shard) if memory else "-",
        gib(memory.estimate.peak) + (" !" if memory.fits is False else "") if memory else "-",
    ]


HEADER = ["id", "family", "width", "depth", "experts", "top-k", "N", "K", "rows", "total", "activated", "NE",
          "target", "achieved", "match", "tokens", "epochs", "FLOPs", "GPU-h", "hours", "GPUs", "shard", "mem/GPU"]


def _table(rows: list[list[str]], header: list[str]) -> str:
    table = [header, *rows]
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)  # each cell left-aligned in its column, as str.ljust
    lines = [line.format(*r).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def memory_lines(plan: Plan, memory: dict[str, MemoryCheck], limits: MemoryLimits) -> list[str]:
    """What the memory column assumed, and what is not checked."""
    lines = [f"memory: {limits.describe()}; mem/GPU is the estimated steady-state peak (parameters, gradients, "
             f"optimizer state, one micro-batch's activations); a run fits when it and {gib(HEADROOM)} of headroom "
             "(CUDA context, workspaces, fragmentation) do"]
    if limits.gpu_memory is None:
        lines.append("memory is not checked: no --gpu-memory, no gpu_memory in the sweep's slurm or executor "
                     "section, and no GPU on this machine")
    sharded = [run for run in plan.runs if memory[str(run.run_id)].estimate.shard > 1]
    if sharded:
        lines.append(f"shard > 1 ({len(sharded)} run(s)) is modelled as FSDP: parameters, gradients and optimizer "
                     "state divided by the shard degree, except the N-gram tables, which stay replicated (unless "
                     "training.table_sharding is rows)")
    return lines


def format_plan(plan: Plan, mfu: float, peak: float, checks: dict[str, DataCheck] | None = None,
                memory: dict[str, MemoryCheck] | None = None, limits: MemoryLimits | None = None) -> str:
    """The plan as text (module docstring); ``checks`` default to :func:`data_checks`, the memory columns are
    ``-`` without ``memory`` and ``limits``."""
    checks = data_checks(plan) if checks is None else checks
    out = [f"sweep {plan.name}: {len(plan.runs)} runs, {len(plan.skipped)} skipped"
           + (f", {plan.duplicates} duplicate points collapsed" if plan.duplicates else "")]
    if plan.runs:
        out.append("")
        out.append(_table([_row(run, mfu, peak, checks[str(run.run_id)], (memory or {}).get(str(run.run_id)))
                           for run in plan.runs], HEADER))
        if memory is not None and limits is not None:
            out.append("")
            out.extend(memory_lines(plan, memory, limits))
    unmatched = [run for run in plan.runs if run.matched is False]
    if unmatched:
        out.append("")
        out.append(f"! {len(unmatched)} run(s) not within the match tolerance of their parameter-equivalent "
                   "MoE (no size knob, e.g. PLE): " + ", ".join(run.run_id for run in unmatched))
    warnings = data_warnings(plan, checks)
    if warnings:
        out.append("")
        out.extend(f"warning: {line}" for line in warnings)
        if not all(check.exact for check in checks.values()):
            out.append("  (~: split sizes estimated from the corpus's bytes; exact once a run has built its shards)")
    if plan.skipped:
        out.append("")
        out.append("skipped:")
        for skipped in plan.skipped:
            point = ", ".join(f"{k}={v}" for k, v in skipped.point.items())
            out.append(f"  {point}: {skipped.reason}")
    out.append("")
    out.append(f"total: {plan.total_flops:.3g} training FLOPs = {plan.gpu_hours(mfu, peak):.4g} GPU-hours at "
               f"{mfu:.0%} MFU of {peak / 1e12:g} TFLOP/s")
    if limits is not None:
        out.append(f"each run on {limits.gpus} GPU(s) ({limits.nodes} node(s) x {limits.gpus_per_node}, one process "
                   f"per GPU): {plan.gpu_hours(mfu, peak) / limits.gpus:.4g} hours of wall-clock time for the "
                   "runs one after another (hours: GPU-h / GPUs)")
    return "\n".join(out)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN); containers copied, tuples as lists."""
    kind = type(value)  # exact types first: this runs over every number of a 10,000-run plan
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    if not (0 < args.mfu <= 1):
        raise ConfigError("--mfu", f"must be in (0, 1], got {args.mfu}")
    if not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        raise ConfigError("--peak-tflops", f"must be positive, got {args.peak_tflops}")
    peak = args.peak_tflops * 1e12
    # the plan and its text are a dict or list for every run, all kept: the cyclic collector's passes over them
    # found nothing to free and cost a tenth of the time
    collecting = gc.isenabled()
    gc.disable()
    try:
        loaded = load_plan(args.sweep)
        plan = loaded.plan
        limits = memory_limits(loaded.sweep, args.gpu_memory, args.gpus_per_node, args.nodes, args.shard,
                               executor_type=args.executor)
        memory = memory_checks(plan, limits)
        refusal = memory_refusal(plan, memory, limits)
        if refusal is not None:
            raise refusal
        checks = data_checks(plan)
        if args.json:
            document = plan.to_dict(args.mfu, peak)
            for entry in document.get("runs", []):
                check = checks[str(entry["run_id"])]
                entry["epochs"] = check.epochs
                entry["epochs_exact"] = check.exact
                entry["small_val_splits"] = list(check.small_val)
                entry["memory"] = memory[str(entry["run_id"])].to_dict()
                entry["gpus"] = limits.gpus
                entry["nodes"] = limits.nodes
                entry["gpus_per_node"] = limits.gpus_per_node
                entry["wall_hours"] = entry["gpu_hours"] / limits.gpus
            document["memory_limits"] = limits.to_dict()
            document["gpus_per_run"] = limits.gpus
            document["wall_hours"] = document["gpu_hours"] / limits.gpus
            document["warnings"] = data_warnings(plan, checks)
            text = json.dumps(_json_safe(document), indent=1)
        else:
            text = format_plan(plan, args.mfu, peak, checks, memory, limits)
    finally:
        if collecting:
            gc.enable()
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `embscale plan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
