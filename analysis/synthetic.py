"""Synthetic results drawn from a known law, for tests, the committed fixture and performance checks.

    python -m analysis.synthetic OUT_DIR [--runs N] [--evals E] [--sweep NAME] [--seed S]

writes ``OUT_DIR/<sweep>/<run_id>/{run.json,status.json,metrics.parquet}`` for every run (the layout the
trainer writes), plus ``OUT_DIR/<sweep>/collisions.parquet``. The design (:func:`design`) holds MoE runs over
the ratio, NE anchored at base ratios 4 and 12, three widths and three depths, an N-by-K ablation,
embedding-amplification variants, PLE and PLNE, and one failed, one diverged, one running and one pending
run; past its length the design repeats with new seeds.

The truth (:data:`TRUTH`): final loss of split ``s`` is

    L = E_s + A / N_act^alpha + B / N_tot^beta + scale_s * delta(run) + noise

with ``delta`` zero for MoE and, for NE anchored at a high base ratio, ``g ln(r1/r) + h ln(r/r1)^2``: NE
crosses the MoE curve at ``r1`` = 22 (log-linear fits of the slightly curved MoE loss put it near 20) and
loses again where the quadratic takes over, later for wider models; past 20 layers a constant penalty moves
the crossing up. NE anchored at a low base ratio never wins. Each run's curve follows
``L(D) = L_inf + A_D D^-alpha_D`` in tokens, reaching its final loss at the planned budget.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from embscale.base import rundir
from embscale.base.files import atomic_file

VOCAB = 32768
BASE_WIDTH = 1024
BASE_DEPTH = 10
FINGERPRINT = "synthetic-corpus-0001"


@dataclass(frozen=True)
class Truth:
    """The law the synthetic losses come from."""

    E: dict[str, float] = field(default_factory=lambda: {"train": 1.80, "val_code": 1.55, "val_prose": 1.95})
    delta_scale: dict[str, float] = field(default_factory=lambda: {"train": 1.0, "val_code": 1.2,
                                                                   "val_prose": 0.9})
    A: float = 400.0
    alpha: float = 0.34
    B: float = 150.0
    beta: float = 0.28
    crossover: float = 22.0          # r1: where NE anchored at a high base ratio crosses MoE
    ne_gain: float = 0.05            # g
    run_noise: float = 0.002         # per-run offset shared by the splits
    eval_noise: float = 0.0015       # per evaluation
    train_noise: float = 0.02        # per logged training step
    curve_alpha: float = 0.35        # alpha_D of the in-run curve
    curve_excess: float = 1.5        # loss above the final value at 1% of the budget


TRUTH = Truth()
NK_DELTA = {(2, 1): 0.030, (2, 4): 0.010, (3, 3): 0.0, (5, 3): -0.002, (7, 2): 0.004, (7, 4): 0.001}
AMPLIFICATION_DELTA = {"none": 0.0, "sqrt_d": -0.020, "layernorm": -0.018}
FAMILY_DELTA = {"ple": 0.012, "plne": -0.003}


@dataclass(frozen=True)
class Point:
    family: str
    target_ratio: float
    width: int = BASE_WIDTH
    depth: int = BASE_DEPTH
    base_ratio: float | None = None
    n: int = 3
    k: int = 3
    amplification: str = "none"
    sizing: str = "paper"
    state: str = "completed"
    seed: int = 0


def activated_params(width: int, depth: int) -> float:
    """A made-up but plausible activated count: 12 L D^2 (attention and MLPs) plus embedding-sized head."""
    return 12.0 * depth * width * width + 2.0 * VOCAB * width


def ngram_delta(point: Point, truth: Truth = TRUTH) -> float:
    """Loss difference of an embedding-family run against the MoE of the same total (split scale 1)."""
    if point.family in ("moe", "dense"):
        return 0.0
    r = point.target_ratio
    base = point.base_ratio or 12.0
    if base < 8:  # anchored too early: adding embeddings never beats adding experts
        delta = 0.015 + 0.006 * math.log(r / base)
    else:
        curvature = {1024: 0.015, 1536: 0.008, 2048: 0.003}.get(point.width, 0.008)
        u = math.log(r / truth.crossover)
        delta = -truth.ne_gain * u + curvature * u * u
        delta += 0.012 * max(0.0, math.log2(point.depth / 20.0))  # deeper than 20 layers: the advantage fades
    delta += NK_DELTA.get((point.n, point.k), 0.0)
    delta += AMPLIFICATION_DELTA.get(point.amplification, 0.0)
    delta += FAMILY_DELTA.get(point.family, 0.0)
    return delta


def true_loss(activated: np.ndarray | float, total: np.ndarray | float, split: str = "train",
              delta: np.ndarray | float = 0.0, truth: Truth = TRUTH) -> np.ndarray:
    """Noise-free final loss of a split."""
    act = np.asarray(activated, dtype=float)
    tot = np.asarray(total, dtype=float)
    return (truth.E[split] + truth.A / act ** truth.alpha + truth.B / tot ** truth.beta
            + truth.delta_scale[split] * np.asarray(delta, dtype=float))


def design() -> list[Point]:
    """The synthetic sweep, most important runs first."""
    points: list[Point] = []
    points += [Point("moe", r) for r in (4, 6, 8, 12, 16, 24, 32, 48)]
    points += [Point("ne", r, base_ratio=12) for r in (16, 20, 24, 32, 48)]
    points += [Point("ne", r, base_ratio=4) for r in (6, 8, 16, 32)]
    for width in (1536, 2048):
        points += [Point("moe", r, width=width) for r in (8, 16, 32)]
        points += [Point("ne", r, width=width, base_ratio=12) for r in (16, 24, 32)]
    for depth in (20, 40):
        points += [Point("moe", r, depth=depth) for r in (8, 16, 32)]
        points += [Point("ne", r, depth=depth, base_ratio=12) for r in (16, 24, 32)]
    points += [Point("ne", 24, base_ratio=12, n=n, k=k) for (n, k) in NK_DELTA if (n, k) != (3, 3)]
    points += [Point("ne", 24, base_ratio=12, amplification=a) for a in ("sqrt_d", "layernorm")]
    points += [Point("ple", 24, base_ratio=12), Point("plne", 24, base_ratio=12)]
    points += [Point("moe", 64, state="failed"), Point("ne", 64, base_ratio=12, state="diverged"),
               Point("ne", 48, base_ratio=4, state="running"), Point("moe", 96, state="pending")]
    return points


def run_id_of(index: int, point: Point) -> str:
    parts = [f"{index:04d}", point.family, f"r{point.target_ratio:g}"]
    if point.base_ratio is not None:
        parts.append(f"b{point.base_ratio:g}")
    parts += [f"w{point.width}", f"d{point.depth}"]
    if point.family in ("ne", "plne"):
        parts.append(f"n{point.n}k{point.k}")
    if point.amplification != "none":
        parts.append(point.amplification)
    parts.append(f"s{point.seed}")
    return "-".join(parts)


def _model_config(point: Point, n_experts: int) -> dict[str, Any]:
    ngram = None
    per_layer = None
    if point.family == "ne":
        table_ratio = _table_ratio(point)
        ngram = {"n": point.n, "k": point.k, "ratio": table_ratio, "sizing": point.sizing,
                 "amplification": point.amplification}
    elif point.family in ("ple", "plne"):
        per_layer = {"kind": point.family, "targets": "first",
                     "ngram": ({"n": point.n, "k": point.k, "ratio": _table_ratio(point), "sizing": point.sizing,
                                "amplification": "none"} if point.family == "plne" else None)}
    return {"vocab_size": VOCAB, "d_model": point.width, "n_layers": point.depth, "n_heads": point.width // 64,
            "layer_type": "shortcut", "attention": "mha", "dense_hidden": 2 * point.width,
            "n_experts": n_experts, "n_zero_experts": n_experts // 2, "expert_hidden": point.width // 2,
            "top_k": 8, "routed_scaling_factor": 6.0, "embedding_amplification": "none",
            "ngram": ngram, "per_layer": per_layer, "eos_token_id": 0, "max_seq_len": 2048}


def _table_ratio(point: Point) -> float:
    act = activated_params(point.width, point.depth)
    base = point.base_ratio or point.target_ratio
    return round((point.target_ratio - base) * act / (VOCAB * point.width), 3)


def _n_experts(point: Point) -> int:
    ratio = point.base_ratio if point.family != "moe" and point.base_ratio else point.target_ratio
    return int(round(8 * ratio))


def _norms(point: Point, progress: np.ndarray) -> dict[str, np.ndarray]:
    grow = 1.0 + 0.5 * progress
    if point.family == "moe":
        embedding = 0.10
    else:
        embedding = {"none": 0.04, "sqrt_d": 0.04 * math.sqrt(point.width), "layernorm": 1.0}[point.amplification]
    out = {"norm_embedding": embedding * (1.0 + 0.2 * progress)}
    sub = {"attn0": 0.45, "mlp0": 0.60, "moe": 0.80, "attn1": 0.50, "mlp1": 0.70}
    for layer in range(min(point.depth, 2)):
        for name, value in sub.items():
            out[f"norm_layer{layer}.{name}"] = value * (1.0 + 0.3 * layer) * grow
    return out


def _records_norms(point: Point) -> bool:
    """Norms only where Fig. 5 looks (the base size at ratio 24): it keeps the committed fixture small, and
    exercises runs without norm columns."""
    return point.width == BASE_WIDTH and point.depth == BASE_DEPTH and point.target_ratio == 24


def write_run(sweep_dir: Path, index: int, point: Point, *, evals: int, rng: np.random.Generator,
              truth: Truth = TRUTH, sweep: str = "synthetic") -> str:
    """Write one run folder; returns its run id."""
    run_id = run_id_of(index, point)
    run_dir = sweep_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    act = activated_params(point.width, point.depth)
    ratio = point.target_ratio * (1.0 + rng.uniform(-0.004, 0.004))  # integer sizes miss the target slightly
    total = ratio * act
    tokens = 20.0 * act
    flops_per_token = 6.0 * act + 12.0 * point.depth * point.width * 2048
    n_experts = _n_experts(point)
    ne_share = 0.0 if point.family == "moe" else 1.0 - (point.base_ratio or ratio) / ratio
    eval_every = 20
    log_every = 5
    total_steps = evals * eval_every
    lr = 3e-3 * (BASE_WIDTH / point.width)
    run = {
        "run_id": run_id, "sweep": sweep, "family": point.family,
        "point": {k: v for k, v in {
            "target_ratio": point.target_ratio, "base_ratio": point.base_ratio, "width": point.width,
            "depth": point.depth, "n": point.n if point.family in ("ne", "plne") else None,
            "k": point.k if point.family in ("ne", "plne") else None,
            "table_ratio": _table_ratio(point) if point.family in ("ne", "plne") else None,
            "sizing": point.sizing if point.family in ("ne", "plne") else None,
            "amplification": point.amplification if point.family != "moe" else None,
            "seed": point.seed, "lr": lr}.items() if v is not None},
        "config": {"model": _model_config(point, n_experts),
                   "training": {"lr": lr, "seed": point.seed, "batch_tokens": tokens / total_steps,
                                "steps": total_steps, "warmup_steps": total_steps // 20, "schedule": "cosine",
                                "eval_every": eval_every},
                   "data": {"corpus": "synthetic", "seq_len": 2048, "val_splits": ["code", "prose"]}},
        "accounting": {"total": total, "activated": act, "activated_min": 0.9 * act, "activated_max": 1.1 * act,
                       "ratio": ratio, "ne_share": ne_share,
                       "groups": {"attention": 4.0 * point.depth * point.width ** 2,
                                  "ngram": ne_share * total},
                       "flops_per_token": flops_per_token},
        "corpus_fingerprint": FINGERPRINT, "tokens": tokens, "flops": flops_per_token * tokens,
    }
    rundir.write_run_record(run_dir, run)

    stop = {"completed": 1.0, "failed": 0.4, "diverged": 0.6, "running": 0.5, "pending": 0.0}[point.state]
    steps_done = int(round(total_steps * stop))
    rundir.write_status(run_dir, point.state, step=steps_done, total_steps=total_steps,
                        error={"failed": "RuntimeError: NCCL watchdog timeout\n  (rank 3)",
                               "diverged": f"loss is NaN at step {steps_done}"}.get(point.state),
                        updated_at="2026-11-20T12:00:00Z", wall_time_s=3.0 * steps_done)
    if steps_done == 0:
        return run_id

    delta = ngram_delta(point, truth)
    offset = rng.normal(0.0, truth.run_noise)
    step = np.arange(log_every, steps_done + 1, log_every, dtype=np.int64)
    seen = step * (tokens / total_steps)
    is_eval = step % eval_every == 0
    progress = step / total_steps
    d_small = tokens / 100.0
    a_d = truth.curve_excess * d_small ** truth.curve_alpha
    shape = a_d * (seen ** -truth.curve_alpha - tokens ** -truth.curve_alpha)  # zero at the full budget
    columns: dict[str, Any] = {"step": step, "tokens": seen,
                               "lr": lr * 0.5 * (1 + np.cos(np.pi * progress))}
    final_train = float(true_loss(act, total, "train", delta, truth)) + offset
    train = final_train + shape + rng.normal(0.0, truth.train_noise, len(step))
    if point.state == "diverged":
        blow = progress > 0.5
        train = np.where(blow, train * np.exp(20 * (progress - 0.5)), train)
        train[-1] = np.nan
    columns["train_loss"] = train
    columns["grad_norm"] = 0.3 + 0.1 * rng.random(len(step))
    columns["tokens_per_s"] = np.full(len(step), 2.0e5 * BASE_WIDTH / point.width)
    columns["mfu"] = np.full(len(step), 0.41)
    columns["moe_imbalance"] = 1.0 + 0.05 * rng.random(len(step))
    columns["zero_expert_fraction"] = np.full(len(step), 0.3)
    for split in ("val_code", "val_prose"):
        final = float(true_loss(act, total, split, delta, truth)) + offset
        values = final + shape + rng.normal(0.0, truth.eval_noise, len(step))
        columns[f"{split}_loss"] = np.where(is_eval, values, np.nan)
    if _records_norms(point):
        for name, values in _norms(point, progress).items():
            columns[name] = np.where(is_eval, values, np.nan)
    rundir.write_metrics(run_dir, pd.DataFrame(columns))
    return run_id


def collisions_table(vocab: int = VOCAB) -> pd.DataFrame:
    """A Fig. 3-like table: 2-gram collisions spike near integer multiples of the vocabulary."""
    rows = []
    multiples = np.linspace(30.0, 33.0, 61)
    for policy in ("paper", "prime"):
        for order in (2, 3, 4):
            for m in multiples:
                near = abs(m - round(m))
                spike = math.exp(-(near / 0.02) ** 2) if order == 2 else 0.0
                hit = (0.55 + 0.004 * (m - 30.0)) if order == 2 else 0.97 + 0.01 * (order - 3) * 0.5
                rows.append({"table_size": int(m * vocab), "policy": policy, "order": order,
                             "hit_rate": hit, "collision_rate": 0.01 + (0.25 if order == 2 else 0.0) * spike
                             + 0.002 * (order - 2)})
    return pd.DataFrame(rows)


def generate(out_dir: str | Path, *, runs: int | None = None, evals: int = 20, sweep: str = "synthetic",
             seed: int = 0, collisions: bool = True, truth: Truth = TRUTH) -> Path:
    """Write a synthetic sweep under ``out_dir`` (a results folder); returns the sweep folder."""
    points = design()
    count = len(points) if runs is None else runs
    if count < 1:
        raise ValueError("runs must be at least 1")
    if evals < 4:
        raise ValueError("evals must be at least 4")
    sweep_dir = Path(out_dir) / sweep
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        point = replace(points[index % len(points)], seed=index // len(points))
        write_run(sweep_dir, index, point, evals=evals, rng=rng, truth=truth, sweep=sweep)
    if collisions:
        with atomic_file(sweep_dir / "collisions.parquet") as tmp:
            pq.write_table(pa.Table.from_pandas(collisions_table(), preserve_index=False), tmp, compression="zstd")
    return sweep_dir


# ----------------------------------------------------------------------------------------------------------
# in-memory runs tables drawn from a known law (for fitting tests)

def param_law_runs(*, noise: float = 0.002, seed: int = 0, truth: Truth = TRUTH, split: str = "train",
                   widths: tuple[int, ...] = (768, 1024, 1536, 2048, 3072),
                   ratios: tuple[float, ...] = (2, 4, 8, 16, 32, 64), seeds: int = 2) -> pd.DataFrame:
    """A runs table of MoE runs whose final loss follows the parameter law exactly, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for width in widths:
        for ratio in ratios:
            for s in range(seeds):
                act = activated_params(width, BASE_DEPTH)
                total = ratio * act
                loss = float(true_loss(act, total, split, 0.0, truth)) + rng.normal(0.0, noise)
                rows.append({"run_id": f"w{width}-r{ratio}-s{s}", "family": "moe", "fit_ok": True,
                             "width": width, "depth": BASE_DEPTH, "seed": s, "target_ratio": float(ratio),
                             "ratio": float(ratio), "activated": act, "total": total,
                             "corpus_fingerprint": FINGERPRINT, f"final_{split}_loss": loss})
    return pd.DataFrame(rows)


def ratio_lines_runs(*, moe: tuple[float, float] = (3.0, -0.10), ne_slope: float = -0.16,
                     crossover: float = 21.0, noise: float = 0.002, seed: int = 0,
                     ratios: tuple[float, ...] = (12, 14, 16, 20, 24, 28, 32, 40, 48),
                     seeds: int = 3) -> pd.DataFrame:
    """MoE and NE runs on two log-linear lines that cross at ``crossover``, plus Gaussian noise."""
    a_m, b_m = moe
    u_star = math.log(crossover)
    a_n = a_m + (b_m - ne_slope) * u_star
    rng = np.random.default_rng(seed)
    rows = []
    for family, a, b, base in (("moe", a_m, b_m, None), ("ne", a_n, ne_slope, 12.0)):
        for ratio in ratios:
            if family == "ne" and ratio <= 12:
                continue
            for s in range(seeds):
                loss = a + b * math.log(ratio) + rng.normal(0.0, noise)
                rows.append({"run_id": f"{family}-r{ratio}-s{s}", "family": family, "fit_ok": True,
                             "base_ratio": base, "width": BASE_WIDTH, "depth": BASE_DEPTH, "seed": s,
                             "target_ratio": float(ratio), "ratio": float(ratio), "activated": 2e8,
                             "total": 2e8 * ratio, "corpus_fingerprint": FINGERPRINT,
                             "final_train_loss": loss})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="results folder to write the sweep into")
    parser.add_argument("--runs", type=int, default=None, help=f"number of runs (default: the design, {len(design())})")
    parser.add_argument("--evals", type=int, default=20, help="evaluations per completed run (default 20)")
    parser.add_argument("--sweep", default="synthetic", help="sweep name (default synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-collisions", action="store_true", help="do not write collisions.parquet")
    args = parser.parse_args(argv)
    sweep_dir = generate(args.out_dir, runs=args.runs, evals=args.evals, sweep=args.sweep, seed=args.seed,
                         collisions=not args.no_collisions)
    count = args.runs if args.runs is not None else len(design())
    print(f"wrote {count} synthetic runs to {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
