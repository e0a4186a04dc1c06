"""``embscale params CONFIG.yaml [--json] [--seq-len 4096]``: exact parameter and FLOP accounting.

Analytic (``models.accounting``): nothing is allocated and torch is not imported, so it answers at once even
for a 68B configuration.
"""

from __future__ import annotations

import argparse
import json

from embscale.models.accounting import GROUPS, count_parameters
from embscale.models.config import ModelConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="model config YAML (a top-level 'model:' section is accepted too)")
    parser.add_argument("--json", action="store_true", help="print exact integers as JSON")
    parser.add_argument("--seq-len", type=_positive_int, default=None,
                        help="sequence length for the attention FLOPs (default: the config's max_seq_len)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def human(n: float) -> str:
    """68.52B, 1.30B, 532.48M, 12.29K, 512."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _exact(n: float) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.1f}"


def run(args: argparse.Namespace) -> int:
    cfg = ModelConfig.from_yaml(args.config)
    seq_len = args.seq_len if args.seq_len is not None else cfg.max_seq_len
    acc = count_parameters(cfg)
    if args.json:
        print(json.dumps({"config": str(args.config), **acc.to_dict(seq_len)}, indent=2))
        return 0

    rows = [(name, acc.groups[name]) for name in GROUPS]
    rows += [("total", acc.total), ("activated min", acc.activated_min),
             ("activated expected", acc.activated), ("activated max", acc.activated_max)]
    width = max(len(name) for name, _ in rows)
    print(f"{args.config}: {cfg.layer_type} layers x {cfg.n_layers}, d_model {cfg.d_model}, {cfg.attention} "
          f"attention, {cfg.n_experts} experts + {cfg.n_zero_experts} zero, top-{cfg.top_k}")
    print(f"{'group':<{width}}  {'params':>9}  {'exact':>20}")
    for i, (name, n) in enumerate(rows):
        if i == len(GROUPS):
            print("-" * (width + 33))
        print(f"{name:<{width}}  {human(n):>9}  {_exact(n):>20}")
    flops = acc.flops_per_token(seq_len)
    print(f"{'ratio total/activated':<{width}}  {acc.ratio:>9.2f}")
    print(f"{'NE share of total':<{width}}  {100 * acc.ne_share:>8.1f}%")
    print(f"FLOPs/token (train, seq {seq_len}): {human(flops)} ({_exact(flops)})")
    return 0
