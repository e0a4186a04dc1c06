"""``embscale bench`` / ``make bench``: measure the GPU's ceilings and each component, write BENCHMARKS.md.

Sections (all on the first CUDA device, bf16):

- ceilings: device-to-device copy bandwidth (bytes read + written) and an 8192^3 bf16 matrix product, both on
  random data; every floor below is computed from these measured numbers, not from a datasheet;
- moe: the MoE layer forward+backward at T=16384, D=1024, 64 experts, top-8, expert hidden 512, without and
  with 32 zero experts, against the per-expert Python loop; floor = expert matrix-product FLOPs at the GEMM
  rate;
- ngram: N-gram Embedding forward+backward at T=16384, D=1024, N=4, K=4, 2,000,003 rows per sub-table, against
  ``nn.Embedding`` + per-table ``nn.Linear``; floor = gathered bytes at the copy rate + projection FLOPs at the
  GEMM rate;
- fsdp: the benchmark MoE and NE models' training steps plain and FSDP2-sharded over a one-rank mesh, in
  alternation (:func:`measure_fsdp_one_rank`): the machinery's cost per GPU, communication aside;
- model: the LM head's loss (fused cross-entropy kernel against ``F.cross_entropy`` on fp32 logits), then
  whole training steps (forward, backward, fused AdamW, router-bias update) of the benchmark trio in
  ``models/configs/bench_*_100m.yaml`` at sequence length 1024: tokens/s and MFU (accounting FLOPs/token x
  tokens/s over the measured GEMM rate).

The report is rewritten whole (temporary file, then rename); ``--json`` also keeps the raw numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embscale.base.files import atomic_write_text
from embscale.models.config import CONFIG_DIR

SECTIONS = ("ceilings", "moe", "ngram", "tables", "model", "fsdp")
TRIO = ("bench_moe_100m", "bench_ne_100m", "bench_dense_100m")


def _median_ms(fn, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


# ----------------------------------------------------------------------------------------------------------
def measure_ceilings() -> dict:
    import torch

    n = 2**29  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    gemm_ms = _median_ms(lambda: a @ b)
    return {"copy_tb_s": 2 * n * 2 / copy_ms / 1e9, "gemm_tflop_s": 2 * size**3 / gemm_ms / 1e9,
            "copy_ms": copy_ms, "gemm_ms": gemm_ms}


def measure_moe(ceilings: dict, zero_experts: int, tokens: int = 16384, dim: int = 1024, experts: int = 64,
                top_k: int = 8, hidden: int = 512, naive: bool = True) -> dict:
    import torch

    from embscale.models.config import ModelConfig
    from embscale.models.moe import MoE

    cfg = ModelConfig(vocab_size=2, d_model=dim, n_layers=1, n_heads=8, n_experts=experts,
                      n_zero_experts=zero_experts, top_k=top_k, expert_hidden=hidden)
    torch.manual_seed(0)
    moe = MoE(cfg).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    params = [x, *moe.parameters()]

    def step(forward):
        def run():
            y, _ = forward(x)
            y.backward(grad_out)
        return run

    # Outputs and gradients must agree with the per-expert loop before anything is timed.
    grads = {}
    for name, forward in (("fast", moe.forward), ("naive", moe.forward_reference)):
        for p in params:
            p.grad = None
        y, _ = forward(x)
        y.backward(grad_out)
        grads[name] = [y.detach().float()] + [p.grad.float() for p in params]
    worst = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(*grads.values(), strict=True))
    for fn in (step(moe.forward),) * 3:
        fn()
    real_slots = tokens * top_k * experts / (experts + zero_experts)
    flops = 6 * 3 * real_slots * dim * hidden
    result = {"zero_experts": zero_experts, "tokens": tokens, "dim": dim, "experts": experts, "top_k": top_k,
              "hidden": hidden, "rel_error_vs_loop": worst,
              "fast_ms": _median_ms(step(moe.forward), 100, 500, params),
              "fast_forward_ms": _median_ms(lambda: moe.forward(x), 50, 200),
              "floor_ms": flops / (ceilings["gemm_tflop_s"] * 1e9)}
    result["tflop_s"] = flops / result["fast_ms"] / 1e9
    if naive:
        result["naive_ms"] = _median_ms(step(moe.forward_reference), 10, 100, params)
    return result


def measure_ngram(ceilings: dict, rows: int = 2_000_003) -> dict:
    from embscale.bench.ngram import run_benchmark

    result = run_benchmark(rows=rows)
    tokens, width, s, d = result["tokens"], result["width"], result["sub_tables"], result["sub_table_width"]
    # n-gram and token rows read forward, their row gradients written backward, bf16
    gathered = 2 * tokens * (s * d + width) * 2
    flops = 6 * tokens * s * d * width  # the concatenated projection, forward + backward
    result["floor_ms"] = gathered / (ceilings["copy_tb_s"] * 1e9) + flops / (ceilings["gemm_tflop_s"] * 1e9)
    return result


def measure_tables(ceilings: dict, rows_scale: int, table_dtype: str = "fp32", with_optimizer: bool = True,
                   with_compact: bool = False, tokens: int = 16384, width: int = 1024, n: int = 4, k: int = 4,
                   rows: int = 2_000_003, vocab: int = 131072, device: str = "cuda") -> dict:
    """The N-gram Embedding training path at one table size: the fused Triton forward + sparse backward, the
    table optimizer step and a whole NE training step (forward, backward, sparse optimizer).

    Tables in ``table_dtype``, bf16 autocast for the projection. ``with_optimizer``: the optimizer step in both
    modes with full (fp32) moments, and the training step with the sparse one. ``with_compact``: the sparse
    step with compact moments (bf16 ``exp_avg`` per element, fp32 ``exp_avg_sq`` per row) and the training
    step with it. At 8x the rows the tables hold 16.3B parameters: their fp32 moments (130 GB) fit no single
    GPU here, compact ones do (bf16 table 32.6 GB + m 32.6 GB + v 0.8 GB + row steps 1.5 GB), so that size is
    measured with compact moments only. ``device`` other than cuda (with ``TRITON_INTERPRET=1``) only checks
    the code path at tiny sizes."""
    import torch

    from embscale.kernels.table_optim import TableAdamW
    from embscale.models.config import NgramConfig
    from embscale.models.ngram import NgramEmbedding

    rows = (rows - 1) * rows_scale + 1
    spec = NgramConfig(n=n, k=k, ratio=(rows - 1) / vocab)  # paper sizing: the first sub-table has ``rows``
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[table_dtype]
    emb = NgramEmbedding(spec, vocab, width, 2, device=device, dtype=dtype, backend="triton",
                         sparse_grad=True)
    table = emb.tables.weight
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    grad_out = torch.randn(1, tokens, width, device=device, dtype=torch.bfloat16)
    dense_params = [p for p in emb.parameters() if p is not table]
    device_type = torch.device(device).type

    def forward_backward() -> None:
        table.sparse_grads.clear()
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = emb(ids)
        out.backward(grad_out)

    result: dict = {"rows_scale": rows_scale, "rows_per_table": rows, "table_rows": int(table.shape[0]),
                    "sub_table_width": int(table.shape[1]), "table_dtype": table_dtype,
                    "table_gib": table.numel() * table.element_size() / 2**30}
    result["forward_backward_ms"] = _median_ms(forward_backward, grad_to_none=dense_params)
    forward_backward()
    # The gradient is padded to one slot per lookup (embscale.kernels.ngram.SparseRowGrad): count the real rows.
    grad_rows = table.sparse_grads[0].rows
    touched = int((grad_rows < table.shape[0]).sum())
    result["touched_rows"] = touched
    result["gradient_slots"] = int(grad_rows.numel())
    gathered = 2 * tokens * spec.num_tables * table.shape[1] * table.element_size()
    flops = 6 * tokens * spec.num_tables * table.shape[1] * width
    result["forward_backward_floor_ms"] = (gathered / (ceilings["copy_tb_s"] * 1e9)
                                           + flops / (ceilings["gemm_tflop_s"] * 1e9))
    d = table.shape[1]
    dense_optimizer = torch.optim.AdamW(dense_params, lr=1e-3, fused=device_type == "cuda")

    def train_step(sparse_optimizer: TableAdamW) -> None:
        forward_backward()
        sparse_optimizer.step()
        dense_optimizer.step()
        sparse_optimizer.zero_grad()
        dense_optimizer.zero_grad(set_to_none=True)

    if with_optimizer:
        row_bytes = d * 4
        for mode in ("dense", "sparse"):
            optimizer = TableAdamW([table], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, mode=mode)
            result[f"optimizer_{mode}_ms"] = _median_ms(optimizer.step)  # the same sparse gradient every call
            moved_rows = table.shape[0] if mode == "dense" else touched
            # param, exp_avg and exp_avg_sq read and written, the row gradient read once
            floor_bytes = moved_rows * row_bytes * 6 + touched * row_bytes
            result[f"optimizer_{mode}_floor_ms"] = floor_bytes / (ceilings["copy_tb_s"] * 1e9)
            del optimizer
        sparse_optimizer = TableAdamW([table], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, mode="sparse")
        result["train_step_sparse_ms"] = _median_ms(lambda: train_step(sparse_optimizer))
        del sparse_optimizer
    if with_compact:
        forward_backward()  # a training step leaves no gradient behind
        compact = TableAdamW([table], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, mode="sparse",
                             moments="compact")
        result["optimizer_sparse_compact_ms"] = _median_ms(compact.step)
        state = compact.state[table]
        result["compact_state_gib"] = sum(state[key].numel() * state[key].element_size()
                                          for key in ("exp_avg", "exp_avg_sq", "row_step")) / 2**30
        # per touched row: param and bf16 exp_avg read and written, fp32 exp_avg_sq and int64 row step read
        # and written, the fp32 row gradient read once
        floor_bytes = touched * (2 * d * table.element_size() + 2 * d * 2 + 2 * 4 + 2 * 8 + d * 4)
        result["optimizer_sparse_compact_floor_ms"] = floor_bytes / (ceilings["copy_tb_s"] * 1e9)
        result["train_step_sparse_compact_ms"] = _median_ms(lambda: train_step(compact))
    return result


def measure_loss(ceilings: dict, rows: int = 16384, vocab: int = 32768) -> dict:
    """The LM head's loss, forward + backward, on bf16 logits: the fused kernel (what the models run on CUDA)
    against ``F.cross_entropy`` on the fp32 copy (what they ran before). Floor: the logits read twice (forward
    and backward) and their gradient written once, at the copy rate."""
    import torch
    import torch.nn.functional as F

    from embscale.kernels.cross_entropy import cross_entropy

    torch.manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, device="cuda")).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    fused_loss = cross_entropy(logits, targets)
    torch_loss = F.cross_entropy(logits.float(), targets)
    result = {"rows": rows, "vocab": vocab, "loss_difference": abs(float(fused_loss) - float(torch_loss)),
              "fused_ms": _median_ms(lambda: cross_entropy(logits, targets).backward(), grad_to_none=[logits]),
              "torch_ms": _median_ms(lambda: F.cross_entropy(logits.float(), targets).backward(),
                                     grad_to_none=[logits])}
    result["floor_ms"] = 3 * logits.numel() * logits.element_size() / (ceilings["copy_tb_s"] * 1e9)
    return result


def measure_model(name: str, ceilings: dict, micro_batch: int, accumulation: int, steps: int,
                  compile_model: bool, seq_len: int = 1024) -> dict:
    import torch

    from embscale.models.accounting import count_parameters
    from embscale.models.config import ModelConfig
    from embscale.models.model import build_model

    cfg = ModelConfig.from_yaml(CONFIG_DIR / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compile_model else model
    batches = [torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device="cuda")
               for _ in range(accumulation)]

    def train_step() -> torch.Tensor:
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = forward(batch[:, :-1], batch[:, 1:])
            loss = out.loss + out.aux_loss
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_router_biases()
        return loss

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(3):
        train_step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        loss = train_step()
    end.record()
    torch.cuda.synchronize()
    step_ms = begin.elapsed_time(end) / steps
    tokens_per_step = micro_batch * seq_len * accumulation
    acc = count_parameters(cfg)
    tokens_per_s = tokens_per_step / step_ms * 1e3
    flops_per_token = acc.flops_per_token(seq_len)
    result = {"config": name, "compiled": compile_model, "activated": acc.activated, "total": acc.total,
              "tokens_per_step": tokens_per_step, "step_ms": step_ms, "tokens_per_s": tokens_per_s,
              "flops_per_token": flops_per_token,
              "mfu": flops_per_token * tokens_per_s / (ceilings["gemm_tflop_s"] * 1e12),
              "warmup_s": warmup_s, "final_loss": float(loss),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return result


def measure_fsdp_one_rank(name: Any, ceilings: dict | None, micro_batch: int, accumulation: int, steps: int,
                          rounds: int = 3, seq_len: int = 1024, device: str = "cuda") -> dict:
    """What FSDP2's machinery costs on one GPU: the training step of model config ``name`` (bf16 autocast on CUDA,
    the trainer's optimizers and clipping) on the plain model, and on the same model (same initialisation, same
    batches) with every block and the root ``fully_shard``-ed over a one-rank mesh exactly as the trainer shards
    (:func:`embscale.training.parallelize.parallelize`: bf16 parameters, fp32 reductions), timed in alternation
    ``rounds`` times. A run with ``parallel: fsdp`` on one rank trains unsharded
    (:func:`~embscale.training.parallelize.is_sharded`), so it pays nothing; this is the cost of the machinery
    itself per GPU (parameter casts, unshard and reshard, sharded clipping and optimizer state as DTensors), the
    part of a sharded run's overhead that is not communication. ``ceilings`` adds MFU; ``device`` ``cpu`` (gloo,
    no autocast) is for the smoke test."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from embscale.models.accounting import count_parameters
    from embscale.models.config import ModelConfig
    from embscale.models.model import build_model
    from embscale.training.config import TrainingConfig
    from embscale.training.optim import build_optimizers
    from embscale.training.parallelize import clip_sharded_gradients, parallelize

    cfg = ModelConfig.from_yaml(CONFIG_DIR / f"{name}.yaml") if isinstance(name, str) else name
    label = name if isinstance(name, str) else "custom"
    created = not dist.is_initialized()
    if created:  # a one-rank group of this process: FSDP2 needs a process group and a mesh
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    try:
        mesh = init_device_mesh(device, (1,), mesh_dim_names=("dp_shard",))
        training = {"plain": TrainingConfig(steps=1, parallel="ddp"),
                    "fsdp": TrainingConfig(steps=1, parallel="fsdp")}
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=generator).to(device)
                   for _ in range(accumulation)]
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                    else torch.autocast("cpu", enabled=False))
        models, steps_of = {}, {}
        for kind, train_cfg in training.items():
            torch.manual_seed(0)
            model = build_model(cfg, device=device)
            if kind == "fsdp":
                parallelize(model, mesh, train_cfg)
            optimizers = build_optimizers(model, train_cfg, torch.device(device))[0]
            models[kind] = model

            def step(model=model, optimizers=optimizers, sharded=kind == "fsdp") -> torch.Tensor:
                total = torch.zeros((), device=device)
                for batch in batches:
                    with autocast:
                        out = model(batch[:, :-1], batch[:, 1:])
                    ((out.loss + out.aux_loss) / accumulation).backward()
                    total += out.loss.detach().float() / accumulation  # read once, after the first step
                if sharded:
                    clip_sharded_gradients(list(model.parameters()), [], 1.0)
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                model.update_router_biases()
                return total

            steps_of[kind] = step
        first = {kind: [float(step()), float(step())] for kind, step in steps_of.items()}  # also the warm-up
        times: dict[str, list[float]] = {kind: [] for kind in steps_of}
        for _ in range(rounds):
            for kind, step in steps_of.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(steps):
                    step()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[kind].append((time.perf_counter() - started) / steps)
        tokens_per_step = micro_batch * seq_len * accumulation
        acc = count_parameters(cfg)
        result: dict = {"config": label, "tokens_per_step": tokens_per_step, "rounds": rounds, "steps": steps,
                        "first_two_losses": first}
        for kind, seconds in times.items():
            best = min(seconds)
            result[kind] = {"step_ms": [1e3 * t for t in seconds], "tokens_per_s": tokens_per_step / best}
            if ceilings:
                result[kind]["mfu"] = (acc.flops_per_token(seq_len) * tokens_per_step / best
                                       / (ceilings["gemm_tflop_s"] * 1e12))
        ratios = [p / f for p, f in zip(times["plain"], times["fsdp"], strict=True)]  # tokens/s fsdp over plain
        result["fsdp_over_plain"] = {"per_round": ratios, "median": statistics.median(ratios),
                                     "goal": 0.95}
        return result
    finally:
        if created:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
def render(report: dict) -> str:
    c = report.get("ceilings")
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (`embscale bench`) on {report['date']}: {report['device']}, "
             f"torch {report['torch']}, triton {report['triton']}, Python {report['python']}.", ""]
    if c:
        lines += ["## Measured ceilings", "", "| ceiling | measured |", "| --- | --- |",
                  f"| device-to-device copy (read + write) | {c['copy_tb_s']:.2f} TB/s |",
                  f"| bf16 GEMM 8192^3, random data | {c['gemm_tflop_s']:.0f} TFLOP/s |", ""]
    if report.get("moe"):
        lines += ["## MoE layer, forward + backward (T=16384, D=1024, 64 experts, top-8, hidden 512, bf16)", "",
                  "| variant | time | expert FLOP rate | floor | time / floor | per-expert loop | speed-up |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["moe"]:
            naive = r.get("naive_ms")
            lines.append(f"| {r['zero_experts']} zero experts | {r['fast_ms']:.2f} ms | {r['tflop_s']:.0f} TFLOP/s "
                         f"({r['tflop_s'] / c['gemm_tflop_s']:.0%} of GEMM peak) | {r['floor_ms']:.2f} ms | "
                         f"{r['fast_ms'] / r['floor_ms']:.2f}x | "
                         + (f"{naive:.1f} ms | {naive / r['fast_ms']:.1f}x |" if naive else "- | - |"))
        lines += ["", "Floor: 3 expert matrix products (gate+up fused, down), forward and backward, at the measured "
                  "GEMM rate; zero-expert slots cost no matrix work. Outputs and gradients checked against the "
                  "per-expert loop before timing (worst relative error "
                  f"{max(r['rel_error_vs_loop'] for r in report['moe']):.1e}).", ""]
    if report.get("ngram"):
        r = report["ngram"]
        lines += [f"## N-gram Embedding, forward + backward (T={r['tokens']}, D={r['width']}, N={r['n']}, "
                  f"K={r['k']}, {r['rows_per_table']:,} rows per sub-table, {r['table_gib']:.1f} GiB of tables, "
                  "bf16)", "",
                  "| variant | forward | forward + backward | floor | time / floor |",
                  "| --- | --- | --- | --- | --- |",
                  f"| default (concatenated table, one gather, one GEMM) | {r['default_forward_ms']:.2f} ms | "
                  f"{r['default_forward_backward_ms']:.2f} ms | {r['floor_ms']:.3f} ms | "
                  f"{r['default_forward_backward_ms'] / r['floor_ms']:.1f}x |",
                  f"| naive (`nn.Embedding` + per-table `nn.Linear`) | {r['naive_forward_ms']:.2f} ms | "
                  f"{r['naive_forward_backward_ms']:.2f} ms | | "
                  f"{r['naive_forward_backward_ms'] / r['floor_ms']:.1f}x |"]
        if "triton_forward_backward_ms" in r:
            floor = r["floor_ms"]
            naive_graph = r.get("naive_graph_forward_backward_ms")
            rows = [("fused Triton, sparse gradients (n-gram and token tables)", r["triton_forward_ms"],
                     r["triton_forward_backward_ms"]),
                    ("the same, replayed from a CUDA graph", None, r.get("triton_graph_forward_backward_ms")),
                    ("fused Triton, sparse n-gram gradients, dense token-table gradient", None,
                     r.get("triton_token_dense_forward_backward_ms")),
                    ("the same, replayed from a CUDA graph", None,
                     r.get("triton_token_dense_graph_forward_backward_ms")),
                    ("naive, replayed from a CUDA graph", None, naive_graph)]
            for label, forward_ms, total in rows:
                if total:
                    lines.append(f"| {label} | {f'{forward_ms:.2f} ms' if forward_ms else ''} | {total:.3f} ms | "
                                 f"{floor:.3f} ms | {total / floor:.1f}x |")
            graph = r.get("triton_graph_forward_backward_ms")
            lines.append("")
            lines.append(f"Fused Triton path: {r['naive_forward_backward_ms'] / r['triton_forward_backward_ms']:.1f}x "
                         "faster than the naive form eagerly"
                         + (f", {naive_graph / graph:.1f}x both replayed from CUDA graphs (GPU time without Python's "
                            "launch overhead, `triton.testing.do_bench_cudagraph`)" if graph and naive_graph else "")
                         + ". Eagerly the fused call is bound by the host (about 16 launches from Python); inside a "
                         "model step the GPU's queue hides that.")
        pieces = ""
        if "gather_ms" in r:
            pieces = (f" Pieces of the fused path: hash + gather kernel {r['gather_ms'] * 1e3:.0f} us; the backward's "
                      f"one sort of the {r['tokens'] * (r['sub_tables'] + 1):,} n-gram and token keys "
                      f"{r['sort_ms'] * 1e3:.0f} us; the n-gram tables' segment sum "
                      f"{r['ngram_reduce_ms'] * 1e3:.0f} us "
                      f"({r['touched_rows']:,} distinct rows of {r['tokens'] * r['sub_tables']:,} lookups), the token "
                      f"table's {r['token_reduce_ms'] * 1e3:.0f} us (these three from CUDA graphs).")
        lines += ["",
                  f"Hash alone (PyTorch form) {r['hash_ms']:.2f} ms; zero-filling one table-sized gradient "
                  f"{r['zero_fill_ms']:.2f} ms (the default and naive forms produce dense table gradients; the fused "
                  "path never does)." + pieces + " Floor: the gathered n-gram and token rows read forward and their "
                  "row gradients written backward at the copy rate, plus the projection's FLOPs at the GEMM rate.", ""]
    if report.get("tables"):
        lines += ["## N-gram Embedding training path: fused Triton kernels, sparse gradients, table optimizer "
                  "(T=16384, D=1024, N=4, K=4, bf16 projection)", "",
                  "| rows per sub-table | table | fwd+bwd | its floor | optimizer dense | its floor | optimizer sparse "
                  "| its floor | NE training step (sparse) | optimizer sparse, compact moments | its floor "
                  "| NE training step (sparse, compact) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["tables"]:
            def cell(key: str, fmt: str = ".3f", r: dict = r) -> str:
                return f"{r[key]:{fmt}} ms" if key in r else "-"
            lines.append(f"| {r['rows_per_table']:,} ({r['rows_scale']}x) | {r['table_gib']:.1f} GiB "
                         f"{r['table_dtype']} | {cell('forward_backward_ms')} | {cell('forward_backward_floor_ms')} | "
                         f"{cell('optimizer_dense_ms', '.2f')} | {cell('optimizer_dense_floor_ms', '.2f')} | "
                         f"{cell('optimizer_sparse_ms')} | {cell('optimizer_sparse_floor_ms')} | "
                         f"{cell('train_step_sparse_ms')} | {cell('optimizer_sparse_compact_ms')} | "
                         f"{cell('optimizer_sparse_compact_floor_ms')} | {cell('train_step_sparse_compact_ms')} |")
        for key, what in (("train_step_sparse_ms", "NE training step"),
                          ("train_step_sparse_compact_ms", "NE training step with compact moments")):
            with_steps = [r for r in report["tables"] if key in r]
            large = with_steps[-1] if with_steps else None
            small = next((r for r in with_steps if large and r["table_dtype"] == large["table_dtype"]), None)
            if small is not None and small is not large:  # the same table dtype, the smallest and largest size
                lines.append("")
                lines.append(f"{what} with {large['rows_scale']}x the rows: "
                             f"{large[key] / small[key]:.2f}x the time of the "
                             f"original size ({small['touched_rows']:,} rows touched per step).")
        lines += ["", "fwd+bwd: `NgramEmbedding(backend='triton', sparse_grad=True)`: hash, look-back and gather in "
                  "one kernel, the projection as one GEMM, row gradients reduced in a fixed order into fp32 "
                  "(no table-sized gradient). At 8x the rows (16.3B table parameters) AdamW's fp32 moments would take "
                  "130 GB, more than one GPU here holds, so that size is measured with compact moments only "
                  "(`TableAdamW(moments='compact')`: bf16 first moment per element, fp32 second moment per row, "
                  "FBGEMM's partial row-wise Adam: a different optimizer from AdamW; bf16 table 32.6 GB + 32.6 GB "
                  "+ 0.8 GB + 1.5 GB of row steps). "
                  "Optimizer floors: parameter and both moments read and written "
                  "(dense: every row; sparse: touched rows; compact: bf16 first moment, one fp32 second moment "
                  "and one row step per row) plus the row gradients, at the copy rate. The "
                  "training step adds fused AdamW on the token table and projection.", ""]
    if report.get("loss"):
        r = report["loss"]
        lines += [f"## LM-head loss, forward + backward ({r['rows']:,} tokens, {r['vocab']:,} vocabulary, bf16 logits)",
                  "", "| variant | time | floor | time / floor |", "| --- | --- | --- | --- |",
                  f"| fused cross-entropy kernel (`kernels/cross_entropy.py`) | {r['fused_ms']:.3f} ms | "
                  f"{r['floor_ms']:.3f} ms | {r['fused_ms'] / r['floor_ms']:.2f}x |",
                  f"| `F.cross_entropy` on the fp32 copy | {r['torch_ms']:.3f} ms | {r['floor_ms']:.3f} ms | "
                  f"{r['torch_ms'] / r['floor_ms']:.2f}x |", "",
                  "Floor: the logits read twice and their gradient written once, at the copy rate. The losses agree "
                  f"to {r['loss_difference']:.1e}. Every model's step below runs the fused kernel.", ""]
    if report.get("model"):
        lines += ["## Whole-model training steps (sequence 1024, bf16 autocast, fused AdamW)", "",
                  "| config | activated | total | compiled | tokens/step | step | tokens/s | MFU | memory |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["model"]:
            lines.append(f"| {r['config']} | {r['activated'] / 1e6:.1f}M | {r['total'] / 1e6:.1f}M | "
                         f"{'yes' if r['compiled'] else 'no'} | {r['tokens_per_step']:,} | {r['step_ms']:.1f} ms | "
                         f"{r['tokens_per_s'] / 1e3:,.0f}k | {r['mfu']:.1%} | {r['peak_memory_gib']:.1f} GiB |")
        lines += ["", "MFU = accounting FLOPs/token (6 x activated matrix parameters + attention) x tokens/s over the "
                  "measured GEMM rate. A step: forward and backward of every micro-batch, gradient clipping, AdamW, "
                  "router-bias update.", ""]
    if report.get("fsdp"):
        lines += ["## FSDP2 on one GPU: its machinery's cost (sequence 1024, bf16 autocast, the trainer's optimizers)",
                  "",
                  "| config | tokens/step | plain tokens/s | FSDP (one-rank mesh) tokens/s | FSDP / plain, per round "
                  "| median | first two losses, plain / FSDP |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["fsdp"]:
            ratio = r["fsdp_over_plain"]
            losses = r["first_two_losses"]
            lines.append(f"| {r['config']} | {r['tokens_per_step']:,} | {r['plain']['tokens_per_s'] / 1e3:,.0f}k | "
                         f"{r['fsdp']['tokens_per_s'] / 1e3:,.0f}k | "
                         + ", ".join(f"{x:.3f}" for x in ratio["per_round"]) + f" | {ratio['median']:.3f} | "
                         + " / ".join(", ".join(f"{v:.4f}" for v in losses[k]) for k in ("plain", "fsdp")) + " |")
        lines += ["", "Each round times the plain model's steps, then the sharded one's (the same initialisation and "
                  "batches); tokens/s from each model's best round, the ratio per round. A run with `parallel: fsdp` "
                  "on one rank trains unsharded and pays none of this; the ratio is the per-GPU cost of FSDP's "
                  "parameter casts, unshard / reshard and DTensor optimizer state in a sharded run, communication "
                  "aside (goal of issue 15: at least 0.95).", ""]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


KEPT_MARKER = "<!-- measured outside make bench: kept when make bench rewrites this file -->"


def _keep_recorded(path: Path, text: str) -> str:
    """Carry over the part of an existing report below :data:`KEPT_MARKER` (measurements of whole training runs
    through ``embscale train``, which ``make bench`` does not repeat)."""
    if path.exists():
        old = path.read_text()
        if KEPT_MARKER in old:
            return text.rstrip() + "\n\n" + old[old.index(KEPT_MARKER):]
    return text


def run_suite(out: Path, sections: list[str], *, json_path: Path | None = None, compile_modes: str = "both",
              micro_batch: int = 16, accumulation: int = 4, steps: int = 8) -> dict:
    """Measure ``sections`` on the first CUDA device and write the report to ``out`` after every measurement (so a
    run cut short keeps what it measured); returns the raw numbers. ``compile_modes``: on, off or both."""
    import torch
    import triton

    report: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": triton.__version__, "python": platform.python_version(), "notes": []}
    def log(message: str) -> None:
        print(f"[bench] {message}", flush=True)

    def save() -> None:  # after every measurement, so a run cut short keeps what it measured
        atomic_write_text(out, _keep_recorded(out, render(report)))
        if json_path:
            atomic_write_text(json_path, json.dumps(report, indent=2))

    def attempt(what: str, measure: Callable[..., dict], *args: Any) -> dict | None:
        """``measure(*args)``, or None with a note when it raises: one failure (an out-of-memory, a compile error)
        must not lose the other measurements."""
        try:
            return measure(*args)
        except Exception as exc:  # noqa: BLE001
            report["notes"].append(f"{what} failed: {type(exc).__name__}: {str(exc)[:300]}")
            log(report["notes"][-1])
            return None

    report["ceilings"] = measure_ceilings()
    save()
    log(f"ceilings: copy {report['ceilings']['copy_tb_s']:.2f} TB/s, "
        f"GEMM {report['ceilings']['gemm_tflop_s']:.0f} TFLOP/s")
    if "moe" in sections:
        report["moe"] = []
        for zero in (0, 32):
            report["moe"].append(measure_moe(report["ceilings"], zero))
            r = report["moe"][-1]
            save()
            log(f"moe zero={zero}: {r['fast_ms']:.2f} ms (floor {r['floor_ms']:.2f}), "
                f"loop {r.get('naive_ms', 0):.1f} ms")
    if "ngram" in sections:
        report["ngram"] = measure_ngram(report["ceilings"])
        save()
        r = report["ngram"]
        log(f"ngram: default {r['default_forward_backward_ms']:.2f} ms, naive {r['naive_forward_backward_ms']:.2f} ms")
    if "tables" in sections:
        report["tables"] = []
        for scale, table_dtype, with_optimizer, with_compact in ((1, "fp32", True, True), (1, "bf16", False, True),
                                                                 (8, "bf16", False, True)):
            r = attempt(f"tables at {scale}x rows ({table_dtype})",  # 8x may run out of memory
                        measure_tables, report["ceilings"], scale, table_dtype, with_optimizer, with_compact)
            if r is None:
                continue
            report["tables"].append(r)
            save()
            nan = float("nan")
            log(f"tables {scale}x {table_dtype}: fwd+bwd {r['forward_backward_ms']:.3f} ms, optimizer dense "
                f"{r.get('optimizer_dense_ms', nan):.2f} / sparse {r.get('optimizer_sparse_ms', nan):.3f} / "
                f"sparse compact {r.get('optimizer_sparse_compact_ms', nan):.3f} ms, step "
                f"{r.get('train_step_sparse_ms', nan):.3f} / compact "
                f"{r.get('train_step_sparse_compact_ms', nan):.3f} ms")
    if "model" in sections:
        report["loss"] = measure_loss(report["ceilings"])
        save()
        log(f"loss: fused {report['loss']['fused_ms']:.3f} ms, F.cross_entropy {report['loss']['torch_ms']:.3f} ms")
        report["model"] = []
        modes = {"on": [True], "off": [False], "both": [False, True]}[compile_modes]
        for name in TRIO:
            for compiled in modes:
                r = attempt(f"{name} (compiled={compiled})", measure_model, name, report["ceilings"], micro_batch,
                            accumulation, steps, compiled)
                if r is None:
                    continue
                report["model"].append(r)
                save()
                log(f"model {name} compiled={compiled}: {r['step_ms']:.1f} ms/step, "
                    f"{r['tokens_per_s'] / 1e3:.0f}k tokens/s, MFU {r['mfu']:.1%}")
    if "fsdp" in sections:
        report["fsdp"] = []
        for name in TRIO[:2]:
            r = attempt(f"fsdp on one rank, {name}", measure_fsdp_one_rank, name, report["ceilings"], micro_batch,
                        accumulation, steps)
            if r is None:
                continue
            report["fsdp"].append(r)
            save()
            log(f"fsdp {name}: plain {r['plain']['tokens_per_s'] / 1e3:.0f}k, one-rank FSDP "
                f"{r['fsdp']['tokens_per_s'] / 1e3:.0f}k tokens/s ({r['fsdp_over_plain']['median']:.3f})")
    save()
    return report
