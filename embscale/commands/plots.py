"""``embscale plots [SWEEP ...]``: fit the laws and regenerate the figures of one or more sweeps.

With no sweep named, every sweep under ``--results`` is plotted. Each sweep gets ``<sweep>/figures/*.png``
and ``*.pdf`` and ``<sweep>/summary.csv``; a short table of the fits is printed.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings

from embscale.analysis.store import discover_sweeps, resolve_sweep_dir
from embscale.base.errors import ResultsError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweeps", nargs="*", metavar="SWEEP",
                        help="sweep folders or names under --results (default: every sweep there)")
    parser.add_argument("--results", default="results", help="results folder holding the sweeps (default results)")
    parser.add_argument("--bootstrap", type=int, default=400,
                        help="bootstrap replicates of the ratio laws and crossovers (default 400)")
    parser.add_argument("--bootstrap-param", type=int, default=100,
                        help="bootstrap replicates of the parameter laws, each an L-BFGS-B fit (default 100)")
    parser.add_argument("--repeated-data", choices=("exclude", "include"), default="exclude",
                        help="runs that repeated their training data (more than one epoch): left out of fits "
                             "and figures (default; their losses measure memorisation) or included; every "
                             "figure and summary.csv say how many there were")
    parser.add_argument("--quiet", action="store_true", help="print only the figure count and the fits table")
    parser.add_argument("--jobs", type=int, default=None, choices=(1, 2),
                        help="processes fitting and drawing (default: 2 for a sweep of 200 runs or more when other "
                             "programs leave one and a half CPUs idle or more, else 1)")


def run(args: argparse.Namespace) -> int:
    from embscale.analysis.fits import format_summary
    from embscale.analysis.report import plot_sweep  # matplotlib only when plotting

    # The half-million objects of the imports (pandas, scipy, matplotlib) live until the command exits: kept out
    # of the cyclic collector's full passes, which walked them all again several times a sweep.
    gc.freeze()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"  {message}", flush=True)

    try:
        if args.bootstrap < 0 or args.bootstrap_param < 0:
            raise ResultsError("--bootstrap and --bootstrap-param must not be negative")
        sweep_dirs = ([resolve_sweep_dir(s, args.results) for s in args.sweeps] if args.sweeps
                      else discover_sweeps(args.results))
        all_paths = []
        for sweep_dir in sweep_dirs:
            start = time.perf_counter()
            print(f"{sweep_dir}:", flush=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = plot_sweep(sweep_dir, results=args.results, n_boot=args.bootstrap,
                                    n_boot_param=args.bootstrap_param, repeated_data=args.repeated_data,
                                    log=log, jobs=args.jobs)
            for warning in caught:
                print(f"  warning: {warning.message}", file=sys.stderr)
            all_paths += result.figures
            print(f"  {len(result.figures)} figure files in {sweep_dir / 'figures'}, fits in {result.summary_path} "
                  f"({time.perf_counter() - start:.1f} s)")
            print(format_summary(result.summary))
    except ResultsError as exc:
        print(f"embscale plots: error: {exc}", file=sys.stderr)
        return 2
    return 0
