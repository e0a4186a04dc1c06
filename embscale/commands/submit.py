"""``embscale submit SWEEP.yaml --executor {local,slurm,debug}``: train a sweep's runs through submitit.

Completed runs are skipped (their status file is the truth), failed and diverged runs are rerun only with
``--retry-failed``, and runs whose job still runs are left to it. ``local`` queues the runs on this machine (one
per free GPU, ``--runs-per-gpu`` K to pack K small runs on each, or ``--cpu-jobs`` at a time without GPU) and
blocks until they are done; killing it is safe, and submitting again picks up where it stopped. ``slurm`` submits
job arrays and returns (``--wait`` to block). ``debug`` trains the runs one after the other in this process.
"""

from __future__ import annotations

import argparse
import sys

from embscale.base.errors import UserError
from embscale.sweeps.plan import SweepPlan, load_plan
from embscale.sweeps.sections import EXECUTORS, slurm_parameters
from embscale.sweeps.submit import SubmitOptions, submit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (YAML)")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="where runs train (default: the sweep's executor.type, else local)")
    parser.add_argument("--results", default=None, help="results root (default: $EMBSCALE_RESULTS or ./results)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun failed and diverged runs too")
    parser.add_argument("--dry-run", action="store_true", help="show what would be submitted, submit nothing")
    parser.add_argument("--no-reuse", action="store_true",
                        help="train runs that another sweep of the results root has completed (same run id) "
                             "instead of copying its results")
    local = parser.add_argument_group("local executor")
    local.add_argument("--cpu-jobs", type=int, default=None,
                       help="concurrent CPU jobs without GPU (default: executor.cpu_jobs, else nproc/2)")
    local.add_argument("--gpus-per-run", type=int, default=None,
                       help="GPUs per run (default: executor.gpus_per_run, else 1 with GPUs, 0 without)")
    local.add_argument("--processes", type=int, default=None,
                       help="processes (gloo ranks) per run without GPU (default: executor.processes, else 1); "
                            "runs on GPUs have one process per GPU")
    local.add_argument("--runs-per-gpu", type=int, default=None,
                       help="one-GPU runs sharing each GPU at once (default: executor.runs_per_gpu, else 1)")
    local.add_argument("--warm-workers", action=argparse.BooleanOptionalAction, default=None,
                       help="one process per slot (GPU slot or CPU job) trains its one-process runs one after "
                            "another: imports, CUDA context and kernel builds once per slot, not once per run "
                            "(default: executor.warm_workers, else off)")
    local.add_argument("--timeout-min", type=float, default=None, help="time limit of one local job (minutes)")
    slurm = parser.add_argument_group("slurm executor (override the sweep's slurm: section)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--time", help="time limit per job: minutes, HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--tasks-per-node", type=int, help="tasks (DDP ranks) per node; default gpus-per-node")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem-gb", type=float)
    slurm.add_argument("--constraint")
    slurm.add_argument("--array-parallelism", type=int, help="most array tasks running at once")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, e.g. --sbatch mail-type=END (repeatable)")
    slurm.add_argument("--wait", action="store_true", help="block until the submitted runs are done")
    parser.add_argument("--poll-s", type=float, default=None, help="seconds between looks at the jobs")
    parser.add_argument("--log-interval-s", type=float, default=None, help="seconds between progress lines")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="let jobs import the working tree instead of a snapshot of the code")


def slurm_overrides(args: argparse.Namespace) -> dict:
    overrides = {
        "partition": args.partition, "account": args.account, "qos": args.qos, "time": args.time,
        "nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "tasks_per_node": args.tasks_per_node,
        "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb, "constraint": args.constraint,
        "array_parallelism": args.array_parallelism,
    }
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--sbatch {item!r}: expected KEY=VALUE, e.g. --sbatch mail-type=END")
        extra[key.strip().lstrip("-")] = value
    if extra:
        overrides["sbatch"] = extra
    if args.time is not None:
        overrides["time"] = int(args.time) if args.time.isdigit() else args.time
    return {k: v for k, v in overrides.items() if v is not None}


def options_from_args(args: argparse.Namespace, plan: SweepPlan) -> SubmitOptions:
    section = plan.sweep.executor
    executor = args.executor or section.get("type") or "local"
    for name in ("cpu_jobs", "gpus_per_run", "runs_per_gpu", "processes"):
        value = getattr(args, name, None)
        least = 0 if name == "gpus_per_run" else 1
        if value is not None and value < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}")
    return SubmitOptions(
        executor=executor,
        retry_failed=args.retry_failed,
        cpu_jobs=args.cpu_jobs,
        gpus_per_run=args.gpus_per_run,
        processes=args.processes,
        runs_per_gpu=args.runs_per_gpu,
        warm_workers=args.warm_workers,
        timeout_min=args.timeout_min,
        slurm=slurm_overrides(args),
        wait=executor != "slurm" or args.wait,
        poll_s=args.poll_s or section.get("poll_s") or (5.0 if executor == "slurm" else 0.5),
        log_interval_s=args.log_interval_s or section.get("log_interval_s") or 30.0,
        snapshot=not args.no_snapshot,
        dry_run=args.dry_run,
        reuse_completed=not args.no_reuse,
    )


def run(args: argparse.Namespace) -> int:
    plan = load_plan(args.sweep, args.results)
    options = options_from_args(args, plan)
    if options.executor == "slurm":
        # The command-line overrides, checked like the sweep's slurm: section before anything is written.
        slurm_parameters(plan.sweep.slurm, options.slurm)
    report = submit(plan, options)
    if options.dry_run:
        for run_id in report.submitted:
            print(run_id)
        return 0
    if report.interrupted:
        return 130
    failed = sorted(k for k, v in report.final.items() if v != "completed")
    if options.wait and failed:
        print(f"{len(failed)} runs did not complete: {', '.join(failed)} (see `embscale status {args.sweep}`)",
              file=sys.stderr)
        return 1
    return 0
