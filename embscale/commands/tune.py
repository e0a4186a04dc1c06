"""``embscale tune SWEEP.yaml``: tune a training hyperparameter with Optuna (see :mod:`embscale.sweeps.tune`).

The search comes from the sweep file's ``tune:`` section; the flags here override its keys. Trials train through
the same executors as ``embscale submit``; the best values are written as ``results/<sweep>/tuned.yaml``.
"""

from __future__ import annotations

import argparse
import sys

from embscale.base.errors import ConfigError
from embscale.sweeps.plan import SweepPlan, load_plan
from embscale.sweeps.sections import EXECUTORS, TUNE_KEYS, TuneSpec, parse_tune
from embscale.sweeps.submit import SubmitOptions
from embscale.sweeps.tune import edge_warning, resolve_metric, tune, write_tuned


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (YAML) with a tune: section")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="where trials train (default: the sweep's executor.type, else local)")
    parser.add_argument("--results", default=None, help="results root (default: $EMBSCALE_RESULTS or ./results)")
    for key, kind in (("param", str), ("low", float), ("high", float), ("trials", int), ("per", str),
                      ("metric", str), ("direction", str), ("pruner", str), ("parallel", int), ("seed", int),
                      ("startup_trials", int)):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=f"tune_{key}", type=kind, default=None,
                            metavar=key.upper(), help=f"overrides tune.{key}")
    parser.add_argument("--log-scale", dest="tune_log", action="store_const", const=True, default=None,
                        help="overrides tune.log")
    parser.add_argument("--cpu-jobs", type=int, default=None, help="local: concurrent CPU jobs")
    parser.add_argument("--gpus-per-run", type=int, default=None, help="local: GPUs per trial")
    parser.add_argument("--poll-s", type=float, default=None, help="seconds between looks at the trials")
    parser.add_argument("--no-snapshot", action="store_true", help="trials import the working tree")


def spec_from_args(plan: SweepPlan, args: argparse.Namespace) -> TuneSpec:
    section = dict(plan.sweep.tune or {})
    for key in TUNE_KEYS:
        value = getattr(args, f"tune_{key}", None)
        if value is not None:
            section[key] = value
    axes = tuple(getattr(plan.sweep, "axes", ()))
    try:
        return parse_tune(section, axes)
    except ConfigError as exc:
        where = str(plan.sweep_path) if plan.sweep_path else "tune"
        raise ConfigError(f"{where}: {exc.field}", exc.message) from None


def run(args: argparse.Namespace) -> int:
    plan = load_plan(args.sweep, args.results)
    spec = spec_from_args(plan, args)
    executor = args.executor or plan.sweep.executor.get("type") or "local"
    options = SubmitOptions(executor=executor, cpu_jobs=args.cpu_jobs, gpus_per_run=args.gpus_per_run,
                                     poll_s=args.poll_s or (5.0 if executor == "slurm" else 0.5),
                                     snapshot=not args.no_snapshot)
    try:
        spec = resolve_metric(plan, spec)  # before anything is written or trained
    except ConfigError as exc:
        raise exc.in_file(str(plan.sweep_path)) from None
    best = tune(plan, spec, options)
    for label, entry in best.items():
        value = "-" if entry["value"] is None else f"{entry['value']:.6g}"
        metric = "-" if entry["metric"] is None else f"{entry['metric']:.4f}"
        counts = ", ".join(f"{n} {state}" for state, n in entry["trials"].items() if n)
        print(f"{label}: {spec.param}={value} {spec.metric}={metric} ({counts or 'no trials'})")
        warning = edge_warning(label, entry, spec)
        if warning:
            print(f"WARNING: {warning}", file=sys.stderr)
    untuned = [label for label, entry in best.items() if entry["value"] is None]
    if untuned:  # a tuned.yaml with null values would not be a valid sweep file
        print(f"no trial completed for {', '.join(untuned)}: no tuned sweep written; `embscale tune` again "
              "continues the studies", file=sys.stderr)
        return 1
    print(f"wrote {write_tuned(plan, spec, best)}")
    return 0
