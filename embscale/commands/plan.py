"""``embscale plan SWEEP.yaml``: expand a sweep file into parameter-matched runs, with compute estimates.

Prints a table of the runs (id, family, width, depth, experts, top-k, N, K, table rows, total, activated,
NE share, target and achieved ratio, match error, tokens, epochs over the training split, training FLOPs,
GPU-hours at the stated MFU), the skipped points with their reasons, warnings about runs that repeat their
training data or evaluate on a validation split smaller than ``eval_tokens``, and the sweep's total compute;
``--json`` prints the whole plan as JSON instead. Epochs are exact once a run has built the corpus's shards
and estimated from its bytes before (marked ``~``). The whole sweep file is validated, ``executor``,
``slurm`` and ``tune`` sections included. Writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from embscale.base.errors import ConfigError
from embscale.sweeps.expand import DEFAULT_MFU, DEFAULT_PEAK_FLOPS, Plan, PlannedRun
from embscale.sweeps.plan import DataCheck, data_checks, data_warnings, load_plan


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


def _row(run: PlannedRun, mfu: float, peak: float, check: DataCheck) -> list[str]:
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
    ]


HEADER = ["id", "family", "width", "depth", "experts", "top-k", "N", "K", "rows", "total", "activated", "NE",
          "target", "achieved", "match", "tokens", "epochs", "FLOPs", "GPU-h"]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_plan(plan: Plan, mfu: float, peak: float, checks: dict[str, DataCheck]) -> str:
    out = [f"sweep {plan.name}: {len(plan.runs)} runs, {len(plan.skipped)} skipped"
           + (f", {plan.duplicates} duplicate points collapsed" if plan.duplicates else "")]
    if plan.runs:
        out.append("")
        out.append(_table([_row(run, mfu, peak, checks[str(run.run_id)]) for run in plan.runs], HEADER))
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
    return "\n".join(out)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
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
    plan = load_plan(args.sweep).plan
    checks = data_checks(plan)
    if args.json:
        document = plan.to_dict(args.mfu, peak)
        for entry in document.get("runs", []):
            check = checks[str(entry["run_id"])]
            entry["epochs"] = check.epochs
            entry["epochs_exact"] = check.exact
            entry["small_val_splits"] = list(check.small_val)
        document["warnings"] = data_warnings(plan, checks)
        text = json.dumps(_json_safe(document), indent=1)
    else:
        text = format_plan(plan, args.mfu, peak, checks)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `embscale plan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
