"""``embscale bench`` / ``make bench``: the GPU's ceilings and each component against its floor, into BENCHMARKS.md.

See :mod:`embscale.bench.suite` for what each section measures. It needs a CUDA device; on a machine without one
it exits 2 saying so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embscale.base.errors import UserError
from embscale.bench.suite import SECTIONS, render, run_suite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="BENCHMARKS.md", help="report to write (default BENCHMARKS.md)")
    parser.add_argument("--json", default=None, help="also write the raw numbers to this JSON file")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch (model section)")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per model")
    parser.add_argument("--compile", choices=("on", "off", "both"), default="both",
                        help="torch.compile the model in the model section")


def run(args: argparse.Namespace) -> int:
    import torch

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise UserError(f"--sections: unknown section {unknown[0]!r}; expected {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        raise UserError("embscale bench measures a GPU and this machine has no CUDA device; run it where one is")
    report = run_suite(Path(args.out), sections, json_path=Path(args.json) if args.json else None,
                       compile_modes=args.compile, micro_batch=args.micro_batch, accumulation=args.accumulation,
                       steps=args.steps)
    print(render(report))
    return 0
