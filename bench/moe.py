"""Function-level benchmark of the MoE layer (``embscale.models.moe.MoE``): forward + backward on CUDA.

    python -m embscale.bench.moe                     # T=16384, D=1024, 64 experts, top-8, hidden 512, bf16
    python -m embscale.bench.moe --zero-experts 32   # with zero-computation experts

Times the dispatched layer (sort + fused gate/up ``grouped_mm`` + SwiGLU + down ``grouped_mm`` + combine) and
the naive per-expert Python loop (``MoE.forward_reference``) with ``triton.testing.do_bench`` (median, ms),
and prints TFLOP/s counted on the expert matrix products alone (``6 * 3 * T*k_real * D * H``: 3 products,
forward + backward), whose time at the device's matrix rate is the floor. It first checks that the two
agree (outputs and gradients, bf16 tolerance).
"""

from __future__ import annotations

import argparse
import sys

import torch


def build(args: argparse.Namespace):
    from embscale.models.config import ModelConfig
    from embscale.models.moe import MoE

    cfg = ModelConfig(vocab_size=2, d_model=args.dim, n_layers=1, n_heads=8, n_experts=args.experts,
                      n_zero_experts=args.zero_experts, top_k=args.top_k, expert_hidden=args.hidden,
                      n_shared_experts=0)
    torch.manual_seed(0)
    return MoE(cfg).to(device="cuda", dtype=torch.bfloat16)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--zero-experts", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--skip-naive", action="store_true", help="time the dispatched layer only")
    parser.add_argument("--profile", action="store_true", help="print the dispatched layer's kernel table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe: needs a CUDA device", file=sys.stderr)
        return 2
    import triton.testing

    moe = build(args)
    x = torch.randn(args.tokens, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(args.tokens, args.dim, device="cuda", dtype=torch.bfloat16)
    params = [p for p in moe.parameters()]

    def step(forward):
        def run():
            y, _ = forward(x)
            y.backward(grad_out)
        return run

    # Correctness at the benchmark shape: outputs and gradients against the per-expert loop.
    results = {}
    for name, forward in (("dispatch", moe.forward), ("naive", moe.forward_reference)):
        x.grad = None
        for p in params:
            p.grad = None
        y, _ = forward(x)
        y.backward(grad_out)
        results[name] = [y.detach()] + [t.grad.detach().clone() for t in [x] + params]
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in moe.named_parameters()]
    worst = 0.0
    for label, a, b in zip(names, results["dispatch"], results["naive"], strict=True):
        err = relative_error(a, b)
        worst = max(worst, err)
        print(f"check {label:<20} rel. error {err:.2e}")
    if worst > 2e-2:
        print(f"bench_moe: dispatch disagrees with the reference (worst rel. error {worst:.2e})",
              file=sys.stderr)
        return 1

    real_fraction = args.experts / (args.experts + args.zero_experts)
    slots = args.tokens * args.top_k * real_fraction
    flops = 6 * 3 * slots * args.dim * args.hidden
    rows = []
    variants = [("dispatch (grouped_mm)", moe.forward)]
    if not args.skip_naive:
        variants.append(("naive per-expert loop", moe.forward_reference))
    for name, forward in variants:
        fn = step(forward)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=100, rep=500, grad_to_none=[x] + params, return_mode="median")
        fwd_ms = triton.testing.do_bench(lambda f=forward: f(x), warmup=50, rep=200, return_mode="median")
        rows.append((name, ms, fwd_ms, flops / ms / 1e9))

    if args.profile:
        fn = step(moe.forward)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))

    print(f"\nMoE forward+backward: T={args.tokens} D={args.dim} experts={args.experts}+{args.zero_experts} "
          f"zero top-{args.top_k} hidden={args.hidden} bf16, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print(f"{'variant':<24} {'fwd+bwd ms':>10} {'fwd ms':>8} {'TFLOP/s':>8}")
    for name, ms, fwd_ms, tflops in rows:
        print(f"{name:<24} {ms:>10.3f} {fwd_ms:>8.3f} {tflops:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
