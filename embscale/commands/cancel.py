"""``embscale cancel SWEEP.yaml``: stop a sweep's driver and every queued or running job; mark them cancelled.

Local jobs get SIGTERM on their process group (the trainer checkpoints and exits), then SIGKILL; Slurm jobs
are ``scancel``-ed. A cancelled run resumes from its last checkpoint when the sweep is submitted again.
"""

from __future__ import annotations

import argparse

from embscale.sweeps.cancel import cancel
from embscale.sweeps.plan import load_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (YAML)")
    parser.add_argument("--results", default=None, help="results root (default: $EMBSCALE_RESULTS or ./results)")
    parser.add_argument("--wait-s", type=float, default=60.0,
                        help="how long to wait for jobs to stop before marking them cancelled anyway")


def run(args: argparse.Namespace) -> int:
    plan = load_plan(args.sweep, args.results)
    report = cancel(plan, wait_s=args.wait_s)
    for run_id in report.cancelled:
        print(run_id)
    if report.still_running:
        print(f"still stopping after {args.wait_s:.0f}s: {', '.join(report.still_running)}")
    return 0
