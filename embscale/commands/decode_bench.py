"""``embscale decode-bench MODEL [MODEL] | --sweep FILE [--pair SELECTOR]``: decoding speed of one model or of a pair.

A MODEL is a model config (a file, or a shipped config's name such as ``bench_ne_100m``: random weights) or a run
folder (its run.json's model and the weights of its newest intact checkpoint); ``--sweep FILE --pair SELECTOR``
takes a sweep's matched NE/MoE pair (:mod:`embscale.bench.decode_models`). Each model is measured with plain and
speculative decoding at each batch size: tokens/s, ms per step, distinct real experts per step per MoE layer, the
N-gram share of the step, the acceptance rate, and the decode step against its memory floor (weight, table-row and
KV bytes read over the measured copy bandwidth; :mod:`embscale.bench.decode` says how each is counted).
``--out DIR`` writes ``decode_bench.json`` and the figures (``decode_experts``, ``decode_throughput``; PNG and
PDF); ``--json`` prints the report. On CUDA the decode step is replayed from a CUDA graph (``--no-cuda-graph``:
eager).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

from embscale.base.errors import UserError

DTYPES = ("float32", "bfloat16", "float64")
REPORT_FILE = "decode_bench.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="one or two model configs (YAML file or shipped name, e.g. bench_ne_100m) or run "
                             "folders (trained weights from the newest intact checkpoint)")
    parser.add_argument("--sweep", default=None, help="a sweep file: benchmark one of its matched NE/MoE pairs")
    parser.add_argument("--pair", default=None,
                        help="with --sweep: which pair, by a run id (or unique prefix) of either member, or "
                             "key=value terms on the embedding run's point (ratio=8 or ratio=8,seed=0)")
    parser.add_argument("--results", default=None,
                        help="with --sweep: the results folder holding its runs (default $EMBSCALE_RESULTS or "
                             "./results); members with a checkpoint there load it")
    parser.add_argument("--draft", default=None,
                        help="draft model config (same vocabulary); default: each target's own trunk reading "
                             "its plain token embedding")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256", type=_batch_sizes,
                        help="comma list of batch sizes (default 1,2,4,...,256)")
    parser.add_argument("--prompt-len", type=_positive_int, default=16, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=_positive_int, default=16, help="generated tokens per sequence")
    parser.add_argument("--k", type=_non_negative_int, default=4,
                        help="draft tokens per speculative round; 0 skips speculative decoding")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay the decode step from a CUDA graph (default: on with a CUDA device)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="compile the decode step with torch.compile (before its CUDA graph capture when "
                             "graphed; compiled in the untimed warm-up of each batch size; default off)")
    parser.add_argument("--profile-batch", type=_positive_int, default=None, metavar="B",
                        help="also profile 20 decode steps at batch B (torch.profiler: each kernel's device time "
                             "per step on CUDA, each operation's CPU time elsewhere) into the report")
    parser.add_argument("--copy-mib", type=_positive_int, default=None,
                        help="size of the timed copy that measures the bandwidth (default 1024 on CUDA, 256 "
                             "elsewhere)")
    parser.add_argument("--out", default=None, help="folder for decode_bench.json and the figures (PNG, PDF)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _models(args: argparse.Namespace) -> list:
    """The models asked for (checked: readable, loadable, one vocabulary), before anything runs."""
    from embscale.bench.decode_models import check_same_vocabulary, from_config, resolve, sweep_pair

    if args.sweep is not None:
        if args.models:
            raise UserError("give either MODEL arguments or --sweep, not both")
        models = list(sweep_pair(args.sweep, args.pair, args.results))
    else:
        if args.pair is not None or args.results is not None:
            raise UserError("--pair and --results go with --sweep")
        if not 1 <= len(args.models) <= 2:
            raise UserError(f"give one or two models (or --sweep FILE), got {len(args.models)}")
        models = [resolve(spec) for spec in args.models]
        if len(models) == 2 and models[0].label == models[1].label:
            models[1].label += " (2)"
    draft = from_config(args.draft) if args.draft else None
    check_same_vocabulary(models + ([draft] if draft is not None else []))
    return models + [draft]


def run(args: argparse.Namespace) -> int:
    *models, draft_source = _models(args)
    import torch

    from embscale.bench.decode import copy_bandwidth, profile_decode, run_decode_bench
    from embscale.bench.decode_models import build

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA device")
    cuda_graph = device.type == "cuda" if args.cuda_graph is None else args.cuda_graph
    if cuda_graph and device.type != "cuda":
        raise UserError(f"--cuda-graph: needs a CUDA device, not {device}")
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")

    bandwidth = copy_bandwidth(device, None if args.copy_mib is None else args.copy_mib << 20)
    draft = build(draft_source, args.device, args.dtype, args.seed + 1) if draft_source is not None else None
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    report = {"dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "k": args.k,
              "draft": args.draft or "each target's own trunk, plain embedding", "cuda_graph": cuda_graph,
              "compile": args.compile, "copy_bandwidth_gb_s": bandwidth / 1e9, "machine": machine, "models": []}
    for index, source in enumerate(models):
        module = build(source, args.device, args.dtype, args.seed + 10 * index)
        rows = run_decode_bench(module, batch_sizes=args.batch_sizes, prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens, k=args.k, draft=draft, seed=args.seed,
                                cuda_graph=cuda_graph, bandwidth=bandwidth, label=source.label,
                                compile=args.compile)
        cfg = source.cfg
        report["models"].append({
            "label": source.label, "family": source.family, "source": source.source, "weights": source.weights,
            "n_experts": cfg.n_experts if cfg.top_k > 0 else 0, "n_zero_experts": cfg.n_zero_experts,
            "top_k": cfg.top_k, "parameters": sum(p.numel() for p in module.parameters()),
            "kv_cache_bytes_per_token": module.new_cache(1, 1).bytes_per_token(),
            "rows": [row.to_dict() for row in rows]})
        if args.profile_batch:
            report["models"][-1]["profile"] = profile_decode(
                module, args.profile_batch, args.prompt_len, torch.Generator().manual_seed(args.seed),
                cuda_graph=cuda_graph, compile=args.compile)
        del module
    report = _json_ready(report)
    if out_dir is not None:
        from embscale.analysis.decode_figures import decode_figures
        from embscale.base.files import atomic_write_json

        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / REPORT_FILE, report)
        report["files"] = [str(out_dir / REPORT_FILE)] + [str(p) for p in decode_figures(report, out_dir)]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_table(report)
    return 0


def _json_ready(value):
    """The report with NaN as None (null): strict JSON for scripts."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _print_table(report: dict) -> None:
    machine = report["machine"]
    print(f"{report['dtype']} on {machine['device']} ({machine['threads']} threads); copy bandwidth "
          f"{report['copy_bandwidth_gb_s']:.1f} GB/s; CUDA graph {'on' if report['cuda_graph'] else 'off'}; "
          f"compiled {'yes' if report['compile'] else 'no'}")
    for model in report["models"]:
        print(f"\n{model['label']} ({model['family']}, {model['parameters']:,} parameters, {model['weights']} "
              f"weights; KV cache {model['kv_cache_bytes_per_token']} B/token)")
        print(f"{'mode':<12}{'batch':>6}{'tokens/s':>11}{'ms/step':>9}{'floor ms':>10}{'x floor':>8}"
              f"{'tok/step':>9}{'experts':>9}{'ngram %':>9}{'accept':>8}")
        for row in model["rows"]:
            print(f"{row['mode']:<12}{row['batch']:>6}{row['tokens_per_s']:>11.1f}{row['ms_per_step']:>9.2f}"
                  f"{_fmt(row['floor_ms'], 3):>10}{_fmt(row['floor_ratio']):>8}{row['tokens_per_step']:>9}"
                  f"{_fmt(row['experts_per_step']):>9}{_fmt(100 * row['ngram_share']):>9}"
                  f"{_fmt(row['acceptance_rate'], 2):>8}")
        profile = model.get("profile")
        if profile:
            print(f"profile at batch {profile['batch']} ({profile['steps']} steps, {profile['time']} time): "
                  f"{profile['us_per_step']:.0f} us and {profile['launches_per_step']:.0f} "
                  f"{'kernels and copies' if profile['time'] == 'device' else 'operations'} a step; the largest:")
            for entry in profile["top"][:12]:
                print(f"  {entry['us_per_step']:9.1f} us {100 * entry['share']:5.1f}% {entry['per_step']:6.1f}x  "
                      f"{entry['name'][:90]}")
    for path in report.get("files", []):
        print(f"wrote {path}")
