"""``embscale status SWEEP.yaml``: every run's state, the counts, and an ETA.

States: ``pending`` (never started), ``queued``, ``running`` (step/total), ``completed``, ``failed`` (first line
of its error), ``diverged``, ``interrupted``, ``cancelled``, and two that reconciliation with the scheduler adds:
``lost`` (the status says running but its job is gone) and ``failed-to-start`` (queued, and its job is gone).

The ETA divides the work left (FLOPs of unfinished runs, scaled by the steps they still have) by the current
throughput (tokens/s of running runs, from their metrics.parquet, or their step rate since they started).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sweeps import dispatch
from sweeps import jobs as J

ORDER = ("running", "queued", "pending", "interrupted", "lost", "failed-to-start", "failed", "diverged",
         "cancelled", "completed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (YAML)")
    parser.add_argument("--results", default=None, help="results root (default: $EMBSCALE_RESULTS or ./results)")
    parser.add_argument("--json", action="store_true", help="print the runs and totals as JSON")
    parser.add_argument("--no-scheduler", action="store_true", help="do not ask squeue (status files only)")


def _metrics_rate(run_dir: Path) -> tuple[float | None, float | None]:
    """(tokens/s, tokens per step) of the last logged steps, or Nones when metrics.parquet is not there."""
    path = run_dir / "metrics.parquet"
    if not path.exists():
        return None, None
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["step", "tokens", "tokens_per_s"])
    except Exception:  # noqa: BLE001 - being replaced, or an older layout: fall back to the status
        return None, None
    if table.num_rows == 0:
        return None, None
    steps = table.column("step").to_pylist()
    tokens = table.column("tokens").to_pylist()
    rates = [r for r in table.column("tokens_per_s").to_pylist()[-20:] if r is not None and r == r and r > 0]
    per_step = tokens[-1] / steps[-1] if steps[-1] else None
    return (sum(rates) / len(rates) if rates else None), per_step


def run_rate(view: dispatch.RunView) -> dict[str, float | None]:
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
        started = J.parse_time((view.job or {}).get("started_at")) or J.parse_time((view.job or {}).get(
            "submitted_at"))
        updated = J.parse_time(status.get("updated_at"))
        if started and updated and updated > started:
            steps_per_s = step / (updated - started)
    if tokens_per_s is None and steps_per_s and total and view.run.tokens:
        tokens_per_s = steps_per_s * view.run.tokens / total
    return {"fraction": fraction, "steps_per_s": steps_per_s, "tokens_per_s": tokens_per_s,
            "step": step, "total": total}


def summarize(plan: dispatch.SweepPlan, views: list[dispatch.RunView]) -> dict[str, Any]:
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
            "error": J.first_line(status.get("error")) or None, "eta_s": eta_run,
            "tokens_per_s": rate["tokens_per_s"],
        })
    eta = remaining_flops / flops_rate if flops_rate > 0 else (0.0 if remaining_flops == 0 else None)
    return {"sweep": plan.name, "runs": rows, "counts": dict(counts), "total": len(views),
            "eta_s": eta, "remaining_flops": remaining_flops, "checked_at": time.time()}


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    from sweeps.progress import format_duration

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
    plan = dispatch.load_plan(args.sweep, args.results)
    views = dispatch.view_runs(plan, query_slurm=not args.no_scheduler)
    summary = summarize(plan, views)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(render(summary))
    return 0
