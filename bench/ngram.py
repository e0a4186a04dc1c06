"""Benchmark: N-gram Embedding forward + backward, the default (concatenated) path against the naive form.

    python -m embscale.bench.ngram                     # the default sizes below, on the first CUDA device
    python -m embscale.bench.ngram --tokens 8192 --json results/bench_ngram.json

Default sizes: T = 16384 tokens, D = 1024, N = 4, K = 4 (S = 12 sub-tables of d = 85), about 2,000,003 rows
per sub-table (``paper`` sizing with m = 2,000,002: M = m + 2 idx + 1), bf16 parameters, dense gradients.

- ``default``: :meth:`embscale.models.ngram.NgramEmbedding.forward`: one concatenated table, one gather into a
  (T, S*d) buffer, one GEMM with the concatenated projection.
- ``naive``: S separate ``nn.Embedding`` tables and S per-table ``nn.Linear(d, D)``, summed one by one.

- ``triton_sparse``: the same module with ``backend="triton", sparse_grad=True, sparse_token_grad=True``
  (:func:`embscale.kernels.ngram.ngram_embed`): one fused hash + gather kernel, the token rows and the projection
  in one ``addmm``, and sparse, deterministic gradients for the token table and the n-gram tables from one shared sort
  (appended to each weight's ``sparse_grads``; the lists are cleared before each timed call, as the table
  optimizer would). Reported as ``triton_forward_ms`` / ``triton_forward_backward_ms`` (and replayed from a
  CUDA graph), then with the token table's gradient dense (``triton_token_dense_*``: what a run whose token
  table stays in AdamW does), with the pieces from CUDA graphs: ``gather_ms``, ``sort_ms`` (all keys),
  ``ngram_reduce_ms`` and ``token_reduce_ms`` (each table's segment sum).

``default`` and ``naive`` hash the ids (the same :func:`embscale.models.ngram.ngram_hashes`) and produce dense table
gradients: the gradient of 12 x 2M x 85 rows has to be zero-filled every step whichever dense form computes it,
so the ``zero-fill`` line (writing one table-sized tensor) is the floor of a dense backward; the sparse variant
does not pay it. Times are medians of ``triton.testing.do_bench`` with every parameter's gradient reset to
None before each call (no accumulation).

``--rows-scale 8`` multiplies the rows per sub-table (8x: ~16M rows, 32 GB of bf16 tables); run it with
``--variants triton_sparse`` (the dense variants would need table-sized gradients and the naive copy).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

from embscale.base.files import atomic_write_json
from embscale.models.config import NgramConfig
from embscale.models.ngram import NgramEmbedding, ngram_hashes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = ("default", "naive", "triton_sparse")


class NaiveNgramEmbedding(nn.Module):
    """The formula written plainly: S ``nn.Embedding`` + S ``nn.Linear`` (the baseline to beat)."""

    def __init__(self, reference: NgramEmbedding):
        super().__init__()
        self.spec, self.vocab_size, self.eos = reference.spec, reference.vocab_size, reference.eos_token_id
        self.num_tables, d, width = reference.num_tables, reference.table_width, reference.width
        factory = {"device": reference.tables.weight.device, "dtype": reference.tables.weight.dtype}
        self.token = nn.Embedding(self.vocab_size, width, **factory)
        self.tables = nn.ModuleList(nn.Embedding(m, d, **factory) for m in reference.plan.moduli)
        self.projections = nn.ModuleList(nn.Linear(d, width, bias=False, **factory)
                                         for _ in reference.plan.moduli)
        with torch.no_grad():  # the same weights as the reference, so the outputs can be compared
            self.token.weight.copy_(reference.token.weight)
            for s, (offset, m) in enumerate(zip(reference.plan.offsets, reference.plan.moduli, strict=True)):
                self.tables[s].weight.copy_(reference.tables.weight[offset:offset + m])
                self.projections[s].weight.copy_(reference.projection.weight[:, s * d:(s + 1) * d])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hashes = ngram_hashes(ids, self.spec, self.vocab_size, self.eos)
        out = self.token(ids)
        for s in range(self.num_tables):
            out = out + self.projections[s](self.tables[s](hashes[..., s]))
        return out / (self.num_tables + 1)


def _median_ms(fn, params, warmup: int, rep: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=params, return_mode="median"))


def _graph_ms(fn, params, rep: int) -> float | None:
    """Median of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): the GPU's time
    without Python's launch overhead; None when ``fn`` cannot be captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=rep, grad_to_none=params, return_mode="median"))
    except Exception as exc:  # noqa: BLE001 - reported as a missing number, with the reason
        print(f"bench_ngram: CUDA graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def run_benchmark(tokens: int = 16384, width: int = 1024, n: int = 4, k: int = 4, rows: int = 2_000_003,
                  vocab: int = 131072, dtype: str = "bf16", warmup: int = 25, rep: int = 100,
                  device: str = "cuda", rows_scale: int = 1, variants: tuple[str, ...] = VARIANTS) -> dict:
    """Time the chosen forms; returns a dict of milliseconds and the sizes used. ``rows_scale`` multiplies
    the rows per sub-table."""
    from embscale.kernels.ngram import Part, ngram_gather, sort_segments, triton_segment_sum

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    rows = (rows - 1) * rows_scale + 1
    spec = NgramConfig(n=n, k=k, ratio=(rows - 1) / vocab)  # paper sizing: M_0 = m + 1 = rows
    eos = 2
    fast = NgramEmbedding(spec, vocab, width, eos, device=device, dtype=DTYPES[dtype])
    naive = NaiveNgramEmbedding(fast) if "naive" in variants else None
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    grad_out = torch.randn(1, tokens, width, device=device, dtype=DTYPES[dtype])

    def use_kernels(on: bool, token_sparse: bool = True) -> None:
        fast.backend, fast.sparse_grad = ("triton", True) if on else ("torch", False)
        fast.sparse_token_grad = on and token_sparse
        fast.tables.weight.sparse_grads = []
        fast.token.weight.sparse_grads = []

    results = {
        "tokens": tokens, "width": width, "n": n, "k": k, "sub_tables": spec.num_tables,
        "sub_table_width": fast.table_width, "rows_per_table": fast.plan.moduli[0], "rows_scale": rows_scale,
        "table_rows": fast.plan.total_rows, "dtype": dtype, "device": torch.cuda.get_device_name(device),
        "variants": list(variants),
    }
    with torch.no_grad():
        reference = fast(ids).float()
        if naive is not None:
            results["max_abs_difference"] = (reference - naive(ids).float()).abs().max().item()
        use_kernels(True)
        results["triton_max_abs_difference"] = (fast(ids).float() - reference).abs().max().item()
        use_kernels(False)
    del reference

    def forward_backward(module, clear_sparse: bool = False):
        def step():
            if clear_sparse:  # what the table optimizer does after consuming them
                module.tables.weight.sparse_grads.clear()
                module.token.weight.sparse_grads.clear()
            module(ids).backward(grad_out)
        return step

    def forward_only(module):
        def step():
            with torch.no_grad():
                module(ids)
        return step

    results["hash_ms"] = _median_ms(lambda: fast.row_ids(ids), None, warmup, rep)
    results["zero_fill_ms"] = _median_ms(lambda: torch.zeros_like(fast.tables.weight), None, warmup, rep)
    for name, module in (("default", fast), ("naive", naive)):
        if name not in variants:
            continue
        params = list(module.parameters())
        results[f"{name}_forward_ms"] = _median_ms(forward_only(module), None, warmup, rep)
        results[f"{name}_forward_backward_ms"] = _median_ms(forward_backward(module), params, warmup, rep)
        if name == "default":
            fast.zero_grad(set_to_none=True)  # free the dense table gradient before the next variant
    if "triton_sparse" in variants:
        from triton.testing import do_bench_cudagraph

        use_kernels(True)
        results["triton_forward_ms"] = _median_ms(forward_only(fast), None, warmup, rep)
        projection = [fast.projection.weight]
        results["triton_forward_backward_ms"] = _median_ms(forward_backward(fast, clear_sparse=True), projection,
                                                           warmup, rep)
        # the same call replayed from a CUDA graph (no host synchronisation anywhere in it, so it captures):
        # the kernels' time without the eager launch overhead
        results["triton_graph_forward_backward_ms"] = _graph_ms(forward_backward(fast, clear_sparse=True),
                                                                projection, rep)
        use_kernels(True, token_sparse=False)  # the token table's gradient dense (its AdamW takes .grad)
        dense_params = [fast.token.weight, fast.projection.weight]
        results["triton_token_dense_forward_backward_ms"] = _median_ms(forward_backward(fast, clear_sparse=True),
                                                                       dense_params, warmup, rep)
        results["triton_token_dense_graph_forward_backward_ms"] = _graph_ms(
            forward_backward(fast, clear_sparse=True), dense_params, rep)
        weight = fast.tables.weight.detach()
        results["gather_ms"] = _median_ms(lambda: ngram_gather(ids, weight, fast.plan, eos, pad=True,
                                                               token_keys=True), None, warmup, rep)
        gathered, keys = ngram_gather(ids, weight, fast.plan, eos, pad=True, token_keys=True)
        segments = sort_segments(keys)
        grad_gathered, grad_token = torch.randn_like(gathered), torch.randn_like(grad_out).view(tokens, width)
        s, d = fast.num_tables, fast.table_width
        ngram_part = Part(first=0, count=tokens * s, width=d, group=s + 1, col_step=d, scale=fast.scale)
        token_part = Part(first=tokens * s, count=tokens, group=s + 1, key_offset=fast.plan.total_rows,
                          scale=fast.scale)
        results["sort_ms"] = float(do_bench_cudagraph(lambda: sort_segments(keys), rep=rep, return_mode="median"))
        results["ngram_reduce_ms"] = float(do_bench_cudagraph(
            lambda: triton_segment_sum(grad_gathered, segments, part=ngram_part), rep=rep, return_mode="median"))
        results["token_reduce_ms"] = float(do_bench_cudagraph(
            lambda: triton_segment_sum(grad_token, segments, part=token_part), rep=rep, return_mode="median"))
        results["touched_rows"] = int(torch.unique(keys[:, :s]).numel())
        use_kernels(False)
    if "naive" in variants:
        use_kernels(False)
        results["naive_graph_forward_backward_ms"] = _graph_ms(forward_backward(naive), list(naive.parameters()),
                                                               rep)
    if "naive" in variants and "default" in variants:
        results["speedup"] = results["naive_forward_backward_ms"] / results["default_forward_backward_ms"]
    if "naive" in variants and "triton_sparse" in variants:
        results["triton_speedup"] = results["naive_forward_backward_ms"] / results["triton_forward_backward_ms"]
    table_bytes = fast.tables.weight.numel() * fast.tables.weight.element_size()
    results["table_gib"] = table_bytes / 2**30
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rows", type=int, default=2_000_003, help="rows of the first sub-table")
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    parser.add_argument("--rows-scale", type=int, default=1, help="multiply the rows per sub-table (e.g. 8)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ngram: needs a CUDA device", file=sys.stderr)
        return 2
    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants or set(variants) - set(VARIANTS):
        print(f"bench_ngram: --variants must be a comma list of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    r = run_benchmark(args.tokens, args.width, args.n, args.k, args.rows, args.vocab, args.dtype,
                      args.warmup, args.rep, rows_scale=args.rows_scale, variants=variants)
    print(f"N-gram Embedding on {r['device']}: T={r['tokens']}, D={r['width']}, N={r['n']}, K={r['k']} "
          f"(S={r['sub_tables']}, d={r['sub_table_width']}), {r['rows_per_table']:,} rows per sub-table "
          f"({r['table_gib']:.2f} GiB of tables), {r['dtype']}")
    if "max_abs_difference" in r:
        print(f"  outputs agree: max |default - naive| = {r['max_abs_difference']:.3g}")
    print(f"  outputs agree: max |triton - default| = {r['triton_max_abs_difference']:.3g}")
    print(f"  {'hash (row ids)':<28}{r['hash_ms']:9.3f} ms")
    print(f"  {'zero-fill one table grad':<28}{r['zero_fill_ms']:9.3f} ms  (floor of a dense backward)")
    for name in ("default", "naive", "triton"):
        if name + "_forward_ms" in r:
            print(f"  {name + ' forward':<28}{r[name + '_forward_ms']:9.3f} ms")
            print(f"  {name + ' forward+backward':<28}{r[name + '_forward_backward_ms']:9.3f} ms")
    if "gather_ms" in r:
        print(f"  {'fused hash+gather kernel':<28}{r['gather_ms']:9.3f} ms")
        print(f"  {'backward sort (all keys)':<28}{r['sort_ms']:9.3f} ms")
        print(f"  {'n-gram segment sum':<28}{r['ngram_reduce_ms']:9.3f} ms  ({r['touched_rows']:,} touched rows)")
        print(f"  {'token segment sum':<28}{r['token_reduce_ms']:9.3f} ms")
    if "speedup" in r:
        print(f"  default is {r['speedup']:.2f}x the naive form (forward+backward)")
    if "triton_speedup" in r:
        print(f"  triton_sparse is {r['triton_speedup']:.2f}x the naive form (forward+backward)")
    if args.json is not None:
        atomic_write_json(args.json, r)
    timed = [r[key] for key in r if key.endswith("_forward_backward_ms")]
    return 0 if all(math.isfinite(t) for t in timed) else 1


if __name__ == "__main__":
    sys.exit(main())
