"""``embscale plan SWEEP.yaml``: expand a sweep file into parameter-matched runs, with compute estimates.

Prints a table of the runs (id, family, width, depth, experts, top-k, N, K, table rows, total, activated,
NE share, target and achieved ratio, match error, tokens, training FLOPs, GPU-hours at the stated MFU), the
skipped points with their reasons, and the sweep's total compute; ``--json`` prints the whole plan as JSON
instead. The whole sweep file is validated, ``executor``, ``slurm`` and ``tune`` sections included. Writes
nothing.
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
from embscale.sweeps.plan import load_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="the sweep file (YAML)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model-FLOPs utilisation for the GPU-hour estimate (default {DEFAULT_MFU})")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_FLOPS / 1e12,
                        help="peak dense TFLOP/s of one GPU (default %(default)g, H100 SXM bf16)")


def human(value: float) -> str:
    """1234567 -> '1.23M'."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(run: PlannedRun, mfu: float, peak: float) -> list[str]:
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
        f"{run.flops:.3g}",
        f"{run.gpu_hours(mfu, peak):.3g}",
    ]


HEADER = ["id", "family", "width", "depth", "experts", "top-k", "N", "K", "rows", "total", "activated", "NE",
          "target", "achieved", "match", "tokens", "FLOPs", "GPU-h"]


def _table(rows: list[list[str]], header: list[str]) -> str:
    table = [header, *rows]
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)  # each cell left-aligned in its column, as str.ljust
    lines = [line.format(*r).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_plan(plan: Plan, mfu: float, peak: float) -> str:
    out = [f"sweep {plan.name}: {len(plan.runs)} runs, {len(plan.skipped)} skipped"
           + (f", {plan.duplicates} duplicate points collapsed" if plan.duplicates else "")]
    if plan.runs:
        out.append("")
        out.append(_table([_row(run, mfu, peak) for run in plan.runs], HEADER))
    unmatched = [run for run in plan.runs if run.matched is False]
    if unmatched:
        out.append("")
        out.append(f"! {len(unmatched)} run(s) not within the match tolerance of their parameter-equivalent "
                   "MoE (no size knob, e.g. PLE): " + ", ".join(run.run_id for run in unmatched))
    if plan.skipped:
        out.append("")
        out.append("skipped:")
        for skipped in plan.skipped:
            point = ", ".join(f"{k}={v}" for k, v in skipped.point.items())
            out.append(f"  {point}: {skipped.reason}")
    out.append("")
    out.append(f"total: {plan.total_flops:.3g} training FLOPs = {plan.gpu_hours(mfu, peak):.4g} GPU-hours at "
               f"{mfu:.0%} MFU of {peak / 1e12:g} TFLOP/s")
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
        plan = load_plan(args.sweep).plan
        text = (json.dumps(_json_safe(plan.to_dict(args.mfu, peak)), indent=1) if args.json
                else format_plan(plan, args.mfu, peak))
    finally:
        if collecting:
            gc.enable()
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `embscale plan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
