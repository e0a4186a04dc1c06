"""``embscale decode-bench CONFIG [--draft CONFIG] [--batch-sizes 1,2,...,256] [--k 4] [--json]``: decoding speed.

Builds the model of ``CONFIG`` (a model config file, or the name of a shipped one such as ``tiny_moe``) with random
weights and measures plain decoding and speculative decoding at each batch size: tokens/s, ms per step, distinct
real experts per step per MoE layer, the N-gram share of the step and the acceptance rate
(:mod:`embscale.bench.decode` says how each is measured). Runs on the CPU for small models; ``--device cuda`` on a
GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

from embscale.base.errors import UserError
from embscale.models.config import CONFIG_DIR, ModelConfig

DTYPES = ("float32", "bfloat16", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="model config YAML, or the name of a shipped config (e.g. tiny_moe)")
    parser.add_argument("--draft", default=None,
                        help="draft model config (same vocabulary); default: the target's own trunk reading its "
                             "plain token embedding")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256", type=_batch_sizes,
                        help="comma list of batch sizes (default 1,2,4,...,256)")
    parser.add_argument("--prompt-len", type=_positive_int, default=16, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=_positive_int, default=16, help="generated tokens per sequence")
    parser.add_argument("--k", type=_non_negative_int, default=4,
                        help="draft tokens per speculative round; 0 skips speculative decoding")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(_positive_int(part.strip()) for part in text.split(",") if part.strip())
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one batch size")
    return sizes


def config_path(name: str) -> Path:
    """A config file path as given, or a shipped config by name (``tiny_moe``, ``tiny_moe.yaml``)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if path.parent == Path(".") and shipped.exists():
        return shipped
    raise UserError(f"{name}: no such config file (shipped configs: "
                    f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})")


def _build(cfg: ModelConfig, device: str, dtype: str, seed: int):
    import torch

    from embscale.models.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg, device=device).to(getattr(torch, dtype)).eval()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    import torch

    from embscale.bench.decode import run_decode_bench

    cfg = ModelConfig.from_yaml(config_path(args.config))
    draft_cfg = ModelConfig.from_yaml(config_path(args.draft)) if args.draft else None
    if draft_cfg is not None and draft_cfg.vocab_size != cfg.vocab_size:
        raise UserError(f"--draft: vocab_size {draft_cfg.vocab_size} differs from the target's {cfg.vocab_size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA device")
    model = _build(cfg, args.device, args.dtype, args.seed)
    draft = _build(draft_cfg, args.device, args.dtype, args.seed + 1) if draft_cfg is not None else None
    rows = run_decode_bench(model, batch_sizes=args.batch_sizes, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, k=args.k, draft=draft, seed=args.seed)
    cache_bytes = model.new_cache(1, 1).bytes_per_token()
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        print(json.dumps({"config": str(args.config), "draft": args.draft or "own trunk, plain embedding",
                          "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                          "k": args.k, "kv_cache_bytes_per_token": cache_bytes, "machine": machine,
                          "rows": [row.to_dict() for row in rows]}, indent=2))
        return 0
    print(f"{args.config}: {cfg.layer_type} x {cfg.n_layers}, {cfg.attention}, {cfg.n_experts} experts, "
          f"{'NE' if cfg.ngram else 'no NE'}{', ' + cfg.per_layer.kind.upper() if cfg.per_layer else ''}; "
          f"KV cache {cache_bytes} B/token; {args.dtype} on {machine['device']} ({machine['threads']} threads)")
    header = f"{'mode':<12}{'batch':>6}{'tokens/s':>11}{'ms/step':>9}{'tok/step':>9}{'experts':>9}" \
             f"{'ngram %':>9}{'accept':>8}"
    print(header)
    for row in rows:
        print(f"{row.mode:<12}{row.batch:>6}{row.tokens_per_s:>11.1f}{row.ms_per_step:>9.2f}"
              f"{row.tokens_per_step:>9}{_fmt(row.experts_per_step):>9}{_fmt(100 * row.ngram_share):>9}"
              f"{_fmt(row.acceptance_rate, 2):>8}")
    return 0
