"""``embscale status SWEEP.yaml``: every run's state, the counts, and an ETA.

States: ``pending`` (never started), ``queued``, ``running`` (step/total), ``completed``, ``failed`` (first line
of its error), ``diverged``, ``interrupted``, ``cancelled``, and two that reconciliation with the scheduler adds:
``lost`` (the status says running but its job is gone) and ``failed-to-start`` (queued, and its job is gone).

The ETA divides the work left (FLOPs of unfinished runs, scaled by the steps they still have) by the current
throughput (tokens/s of running runs, from their metrics, or their step rate since they started); see
:mod:`embscale.sweeps.status`.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from embscale.base.progress import format_duration
from embscale.sweeps.plan import load_plan
from embscale.sweeps.status import summarize, view_runs

ORDER = ("running", "queued", "pending", "interrupted", "lost", "failed-to-start", "failed", "diverged",
         "cancelled", "completed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (YAML)")
    parser.add_argument("--results", default=None, help="results root (default: $EMBSCALE_RESULTS or ./results)")
    parser.add_argument("--json", action="store_true", help="print the runs and totals as JSON")
    parser.add_argument("--no-scheduler", action="store_true", help="do not ask squeue (status files only)")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return format_duration(seconds)


def _point_text(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items() if k != "family")


def render(summary: dict[str, Any]) -> str:
    header = ["run", "family", "point", "state", "step", "info"]
    rows = []
    for row in summary["runs"]:
        step = ""
        if row["step"] is not None and row["total_steps"]:
            step = f"{row['step']}/{row['total_steps']}"
        info = row["detail"] or ""
        if row["state"] in ("failed", "diverged") and row["error"]:
            info = row["error"]
        elif row["state"] == "running" and row["eta_s"] is not None:
            info = f"eta {_duration(row['eta_s'])}" + (f", {info}" if info else "")
        if row["job_id"] and row["state"] in ("queued", "running"):
            info = f"job {row['job_id']}" + (f", {info}" if info else "")
        rows.append([row["run_id"], str(row["family"]), _point_text(row["point"]), row["state"], step, info])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = summary["counts"]
    parts = [f"{counts[s]} {s}" for s in ORDER if counts.get(s)]
    parts += [f"{n} {s}" for s, n in counts.items() if s not in ORDER]
    lines.append("")
    lines.append(f"sweep {summary['sweep']}: {summary['total']} runs: " + ", ".join(parts))
    if counts.get("completed", 0) < summary["total"]:
        lines.append(f"ETA: {_duration(summary['eta_s'])}"
                     + ("" if summary["eta_s"] is not None else " (no run is training now)"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    plan = load_plan(args.sweep, args.results)
    views = view_runs(plan, ask_scheduler=not args.no_scheduler)
    summary = summarize(plan, views)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(render(summary))
    return 0
