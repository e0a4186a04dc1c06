"""The plan's memory estimate against the measured peak, on one GPU (issue 15: within 15% on at least four
``paper_280m`` points).

::

    python -m embscale.bench.memory_check --out DIR [--points moe:8,moe:16,moe:24,moe:30,ne:8:4,ne:16:4]
    python -m embscale.bench.memory_check --cpu-smoke --out DIR     # the control flow on a CPU, no numbers

Each point (``family:ratio`` for the MoE ladder, ``ne:ratio:base_ratio`` for NE) is the sweep's run (default
``sweeps/paper_280m.yaml``) as a short one-GPU run: ``--steps`` optimizer steps (default 3, so the optimizer state
exists during a backward: the steady state the estimate models) of one micro-batch (the sweep's micro-batch and
sequence length: 4 x 4096), no evaluation and no checkpoint, ``parallel: ddp`` (one GPU), on the built-in corpus.
Everything else is the sweep's (the table optimizer and its moments, the model). The estimate is ``embscale
plan``'s for that run on one GPU (:func:`embscale.sweeps.plan.memory_checks`; its steady-state ``peak`` and its
``first_step_peak``); the measurement is ``torch.cuda.max_memory_allocated`` of the run's process (model build,
steps, the final evaluation), written by the multi-GPU runbook's rank entry (``python -m embscale.bench.multigpu
train-rank``), one fresh process per point. A point whose estimate and the plan's headroom do not fit the GPU is
recorded as such and not run.

``--out`` holds ``memory_check.json`` (every point's estimate, measurement and ratio) and ``memory_check.md`` (the
table for BENCHMARKS.md). A call skips the points ``--out`` records as measured, so a call cut by ``--budget-s``
(no point starts with less than ``--point-s`` seconds left) continues in the next. Exit codes: 0 every point
measured (or recorded as not fitting), 1 a point failed, 2 bad input, 3 points left for another call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from embscale.base.errors import ConfigError, UserError, exit_with
from embscale.base.files import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SUMMARY, TABLE = "memory_check.json", "memory_check.md"
DEFAULT_POINTS = "moe:8,moe:16,moe:24,moe:30,ne:8:4,ne:16:4"
GOAL = 0.15  # |measured / estimate - 1| at most this
BUILTIN_DATA: dict[str, Any] = {"corpus": "builtin", "vocab_size": 32768}
SMOKE_SWEEP: dict[str, Any] = {
    "name": "memory_check",
    "model": {"vocab_size": 264, "width": 16, "depth": 1, "head_dim": 8, "dense_mult": 2.0, "expert_mult": 1.0,
              "experts": 4, "top_k": 2, "zero_expert_ratio": 0.5, "max_seq_len": 32},
    "ngram": {"n": 3, "k": 2, "sizing": "paper"},
    "training": {"steps": 3, "batch_tokens": 64, "micro_batch_size": 2, "seq_len": 16, "lr": 3.0e-3,
                 "table_optimizer": "dense"},
}


def parse_points(text: str) -> list[tuple[str, float, float | None]]:
    """``moe:8,ne:16:4`` -> ``[("moe", 8, None), ("ne", 16, 4)]`` (UserError naming ``--points``)."""
    points = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        fields = item.split(":")
        try:
            if fields[0] == "moe" and len(fields) == 2:
                points.append(("moe", float(fields[1]), None))
            elif fields[0] == "ne" and len(fields) == 3:
                points.append(("ne", float(fields[1]), float(fields[2])))
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"--points: {item!r} is not moe:RATIO or ne:RATIO:BASE_RATIO") from None
    if not points:
        raise UserError("--points: give at least one point")
    return points


def point_name(family: str, ratio: float, base: float | None) -> str:
    return f"{family}_r{ratio:g}" + (f"_b{base:g}" if base is not None else "")


def point_sweep(args: argparse.Namespace, family: str, ratio: float, base: float | None,
                data: dict[str, Any]) -> dict[str, Any]:
    """The sweep of one point: the source sweep's model, N-gram and training sections, a short one-GPU run."""
    from embscale.base.datafile import read_yaml

    if args.cpu_smoke:
        sweep = json.loads(json.dumps(SMOKE_SWEEP))
        training = dict(sweep["training"], device="cpu")
    else:
        sweep = read_yaml(args.sweep, "sweep file")
        sweep.pop("extends", None)
        training = {k: v for k, v in (sweep.get("training") or {}).items() if k != "tokens"}
        micro, seq = int(training.get("micro_batch_size", 4)), int(training.get("seq_len", 4096))
        training.update(batch_tokens=micro * seq, eval_tokens=micro * seq)
    training.pop("table_sharding", None)  # rows shard the tables over several GPUs: one GPU holds them whole
    training.update(steps=args.steps, eval_every=0, checkpoint_every=0, keep_checkpoints=0, warmup_fraction=0.0,
                    parallel="ddp", compile=False)
    training.pop("shard_degree", None)
    sweep.update(name="memory_check", training=training, data=data, executor={"type": "local"})
    sweep.pop("slurm", None)
    sweep.pop("limits", None)
    grid: dict[str, Any] = {"family": [family], "ratio": [ratio]}
    if base is not None:
        grid["base_ratio"] = [base]
    sweep["grid"] = grid
    return sweep


def planned(sweep: dict[str, Any], folder: Path, results: Path
            ) -> tuple[dict[str, Any], dict[str, Any], int, str]:
    """(run config, the plan's memory estimate at one GPU, total parameters, run id) of the sweep's one run."""
    from embscale.sweeps.plan import load_plan, memory_checks, memory_limits, run_config_dict

    folder.mkdir(parents=True, exist_ok=True)
    sweep_file = folder / "sweep.yaml"
    atomic_write_text(sweep_file, yaml.safe_dump(sweep, sort_keys=False))
    loaded = load_plan(sweep_file, results)
    if len(loaded.plan.runs) != 1:
        reasons = "; ".join(s.reason for s in loaded.plan.skipped) or "no run"
        raise UserError(f"{sweep_file}: the point plans {len(loaded.plan.runs)} runs ({reasons})")
    limits = memory_limits(loaded.sweep, gpu_memory="1024TiB", gpus_per_node=1)  # estimate only: refuse nothing
    (run,) = loaded.plan.runs
    check = memory_checks(loaded.plan, limits)[str(run.run_id)]
    return run_config_dict(run, loaded), check.estimate.to_dict(), run.total, str(run.run_id)


def measure_point(name: str, run_cfg: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    """Train ``run_cfg`` in a fresh process (the multi-GPU runbook's rank entry) and read its peak. The run starts
    from nothing: an earlier call's run folder of the same id would be found finished (or resumed) instead."""
    folder = work / name
    run_file, peaks, log_path = folder / "run.yaml", folder / "peak", folder / "log"
    for stale in (folder / "results", peaks):  # results: the run config's output root (planned())
        shutil.rmtree(stale, ignore_errors=True)
    atomic_write_text(run_file, yaml.safe_dump(run_cfg, sort_keys=False))
    env = {**os.environ, "EMBSCALE_PROGRESS": "plain", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "embscale.bench.multigpu", "train-rank", str(run_file), "--results",
               str(folder / "results"), "--peak-dir", str(peaks)]
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        try:
            code = subprocess.run(command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, timeout_s), check=False).returncode
        except subprocess.TimeoutExpired:
            return {"state": "left", "error": "stopped at the end of the budget"}
    record: dict[str, Any] = {"exit_code": code, "wall_s": round(time.monotonic() - started, 1)}
    rank = peaks / "rank0.json"
    if code != 0 or not rank.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        return {**record, "state": "failed", "error": f"exit code {code}", "log_tail": tail}
    peak = json.loads(rank.read_text())
    record.update(state="done", device=peak.get("device"), max_allocated=peak.get("max_allocated"),
                  max_reserved=peak.get("max_reserved"))
    return record


def markdown(state: dict[str, Any]) -> str:
    gib = 2 ** 30
    lines = [f"### The plan's memory estimate against the measured peak ({state.get('device', '?')}, "
             f"`python -m embscale.bench.memory_check`)", "",
             "| point | total parameters | estimate: steady peak (first step) | measured peak allocated "
             "| measured / estimate | within 15% |", "| --- | --- | --- | --- | --- | --- |"]
    for name, point in state.get("points", {}).items():
        estimate = point.get("estimate") or {}
        measured = point.get("max_allocated")
        ratio = measured / estimate["peak"] if measured and estimate.get("peak") else None
        cells = [name, f"{point['total'] / 1e9:.2f}B" if point.get("total") else "-",
                 f"{estimate['peak'] / gib:.1f} GiB ({estimate['first_step_peak'] / gib:.1f})" if estimate else "-",
                 f"{measured / gib:.1f} GiB" if measured else point.get("state", "-"),
                 f"{ratio:.3f}" if ratio else "-",
                 ("yes" if abs(ratio - 1) <= GOAL else "**no**") if ratio else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save(out: Path, state: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SUMMARY, state)
    atomic_write_text(out / TABLE, markdown(state))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embscale.bench.memory_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help=f"folder for {SUMMARY} and {TABLE} (the state)")
    parser.add_argument("--work", default="/tmp/embscale-memory-check", help="run folders and logs")
    parser.add_argument("--points", default=DEFAULT_POINTS, help=f"default {DEFAULT_POINTS}")
    parser.add_argument("--sweep", default=str(ROOT / "sweeps" / "paper_280m.yaml"), help="default paper_280m")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per point (default 3)")
    parser.add_argument("--budget-s", type=float, default=500.0, help="seconds this call may take")
    parser.add_argument("--point-s", type=float, default=90.0, help="seconds a point is expected to take")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny sweep on the CPU: the control flow only")
    args = parser.parse_args(argv)
    started = time.monotonic()
    points = parse_points(args.points)
    if args.steps < 2:
        raise UserError(f"--steps must be at least 2 (the optimizer state exists from the second), got {args.steps}")
    if not args.budget_s > 0:
        raise UserError(f"--budget-s must be positive, got {args.budget_s}")
    if not args.cpu_smoke and not Path(args.sweep).is_file():
        raise UserError(f"--sweep: {args.sweep} is not a file")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise UserError("no CUDA device: the measurement needs one GPU (--cpu-smoke runs the control flow)")
    out, work = Path(args.out), Path(args.work)
    state: dict[str, Any] = {"points": {}}
    if (out / SUMMARY).is_file():
        try:
            state = json.loads((out / SUMMARY).read_text())
        except ValueError as exc:
            raise UserError(f"{out / SUMMARY}: not a readable {SUMMARY} ({exc}); give another --out") from None
    state["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    capacity = torch.cuda.get_device_properties(0).total_memory if state["device"] != "cpu" else None
    data = BUILTIN_DATA
    if args.cpu_smoke:
        from embscale.bench.packed import write_tiny_corpus

        data = write_tiny_corpus(work / "corpus")
    from embscale.sweeps.memory import HEADROOM

    code = 0
    for family, ratio, base in points:
        name = point_name(family, ratio, base)
        known = state["points"].get(name, {})
        if known.get("state") in ("done", "does not fit"):
            print(f"{name}: {known['state']} in an earlier call", flush=True)
            continue
        left = args.budget_s - (time.monotonic() - started)
        if left < args.point_s:
            print(f"{name}: not started, {left:.0f}s of the budget left", flush=True)
            code = max(code, 3)
            continue
        try:
            run_cfg, estimate, total, run_id = planned(point_sweep(args, family, ratio, base, data), work / name,
                                               work / name / "results")
        except (ConfigError, UserError) as exc:
            state["points"][name] = {"state": "failed", "error": str(exc)}
            code = 1
            save(out, state)
            continue
        record: dict[str, Any] = {"total": total, "estimate": estimate, "run_id": run_id}
        if capacity is not None and estimate["peak"] + HEADROOM > capacity:
            record["state"] = "does not fit"
            record["why"] = (f"estimate {estimate['peak'] / 2**30:.1f} GiB + {HEADROOM / 2**30:.0f} GiB headroom > "
                             f"{capacity / 2**30:.1f} GiB")
        else:
            print(f"{name}: {total / 1e9:.2f}B parameters, estimate {estimate['peak'] / 2**30:.1f} GiB; training "
                  f"{args.steps} steps", flush=True)
            record.update(measure_point(name, run_cfg, work, left))
            if record["state"] == "failed":
                code = 1
            elif record["state"] == "left":
                code = max(code, 3)
        state["points"][name] = record
        save(out, state)
        print(f"{name}: {record['state']}" + (f", measured {record['max_allocated'] / 2**30:.1f} GiB"
                                             if record.get("max_allocated") else ""), flush=True)
    save(out, state)
    print(markdown(state), flush=True)
    return code


if __name__ == "__main__":
    exit_with(main, "embscale.bench.memory_check")
