"""``embscale collect SWEEP``: gather a sweep's run folders into ``runs.parquet`` and ``curves.parquet``."""

from __future__ import annotations

import argparse
import sys
import warnings

from embscale.analysis.store import DEFAULT_LAST_K, collect, describe, resolve_sweep_dir
from embscale.base.errors import ResultsError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep folder, or a sweep name under --results")
    parser.add_argument("--results", default="results", help="results folder holding the sweeps (default results)")
    parser.add_argument("--last-k", type=int, default=DEFAULT_LAST_K,
                        help=f"evaluations averaged into a run's final loss (default {DEFAULT_LAST_K})")


def run(args: argparse.Namespace) -> int:
    try:
        if args.last_k < 1:
            raise ResultsError(f"--last-k must be at least 1, got {args.last_k}")
        sweep_dir = resolve_sweep_dir(args.sweep, args.results)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs, curves = collect(sweep_dir, last_k=args.last_k,
                                   progress=lambda done, total: print(f"  {done}/{total} runs read", flush=True))
    except ResultsError as exc:
        print(f"embscale collect: error: {exc}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(f"{sweep_dir}: wrote runs.parquet ({len(runs)} runs) and curves.parquet ({len(curves)} evaluations)")
    print(describe(runs))
    return 0
