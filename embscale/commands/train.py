"""``embscale train RUN.yaml``: train one run, or resume it from its newest intact checkpoint.

Exit codes: 0 completed, 1 failed, 2 bad input, 3 diverged, 75 interrupted (a signal; run the same command again
to resume). Under ``torchrun`` every rank runs this command; rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import os

from embscale.training.config import RunConfig
from embscale.training.trainer import EXIT_CODES, process_started_at, train_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_file", help="run file (YAML: model, training, data, output)")
    parser.add_argument("--results", metavar="DIR", help="results root (overrides output.root)")
    parser.add_argument("--sweep", metavar="NAME", help="sweep folder name (overrides output.sweep)")
    parser.add_argument("--no-resume", action="store_true",
                        help="refuse to continue a run that already has checkpoints (default: resume it)")
    parser.epilog = ("exit codes: 0 completed, 1 failed, 2 bad input, 3 diverged, 75 interrupted (signal; "
                     "run the same command again to resume)")


def run(args: argparse.Namespace) -> int:
    run_cfg = RunConfig.from_yaml(args.run_file)
    output = {}
    if args.results:
        output["root"] = args.results
    if args.sweep:
        output["sweep"] = args.sweep
    if output:
        run_cfg = run_cfg.replace(output=output)
    summary = train_run(run_cfg, resume=not args.no_resume, started_at=process_started_at())
    if int(os.environ.get("RANK", "0")) == 0:
        values = " ".join(f"{k}={v:.4f}" for k, v in summary.items() if k.endswith("_loss") and v is not None)
        print(f"{summary['state']}: run {summary['run_id']} step {summary['step']}/{summary['total_steps']} "
              f"{values} -> {summary['run_dir']}")
    return EXIT_CODES.get(summary["state"], 1)
