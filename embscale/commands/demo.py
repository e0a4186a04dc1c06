"""``embscale demo`` / ``make demo``: the main job, end to end, on the built-in corpus.

1. prepare the data: the built-in corpus (the Python standard library as code, its documentation as prose),
   a BPE tokenizer and token shards (cached; a second demo reuses them);
2. plan ``sweeps/demo.yaml``: an MoE ladder at three ratios and N-gram Embedding matched at two;
3. train every run through the local executor (one job per GPU, or ``--cpu-jobs`` on a CPU machine); runs that
   completed before are skipped, so a second demo reuses everything;
4. collect the results, fit the loss-vs-ratio laws, draw the figures;
5. print a summary table and the figures' paths.
"""

from __future__ import annotations

import argparse
import math
import time

from embscale.sweeps.sweepfile import SWEEP_DIR

DEMO_SWEEP = SWEEP_DIR / "demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", default=str(DEMO_SWEEP), help="sweep file (default: sweeps/demo.yaml)")
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    parser.add_argument("--cpu-jobs", type=int, default=None,
                        help="concurrent runs on a machine without GPU (default: the executor's choice)")


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _fmt_loss(value: object) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    from embscale.analysis.report import plot_sweep
    from embscale.analysis.store import collect
    from embscale.commands.plan import format_plan
    from embscale.sweeps.plan import load_plan
    from embscale.sweeps.submit import SubmitOptions, submit
    from embscale.training.config import DataConfig
    from embscale.training.data.shards import prepare_data

    started = time.perf_counter()
    plan = load_plan(args.sweep, args.results)
    _say(f"sweep {plan.name}: {len(plan.runs)} runs planned, {len(plan.plan.skipped)} points skipped")
    print(format_plan(plan.plan, 0.35, 989e12), flush=True)

    _say("step 1/4: data (built-in corpus, tokenizer, shards; cached after the first time)")
    data_section = plan.runs[0].config["data"]
    prepare_data(DataConfig(**data_section), report=_say)

    _say("step 2/4: training through the local executor (completed runs are skipped)")
    options = SubmitOptions(executor="local", cpu_jobs=args.cpu_jobs, wait=True, log_interval_s=15.0)
    report = submit(plan, options, log=lambda line: print(line, flush=True))  # its lines name the sweep
    failed = {run_id: state for run_id, state in report.final.items() if state != "completed"}
    if failed:
        _say(f"{len(failed)} runs did not complete: " + ", ".join(f"{k} ({v})" for k, v in failed.items()))

    _say("step 3/4: collecting results")
    runs, _ = collect(plan.sweep_dir)

    _say("step 4/4: fits and figures")
    result = plot_sweep(plan.sweep_dir, results=args.results, n_boot=200, n_boot_param=50, log=_say)

    print()
    print(f"Runs of sweep '{plan.name}' (results in {plan.sweep_dir}):")
    header = f"{'run':<14}{'family':<8}{'ratio':>7}{'total':>10}{'activated':>11}{'state':>11}"
    loss_columns = [c for c in runs.columns if c.startswith("final_") and c.endswith("_loss")]
    header += "".join(f"{c[len('final_'):-len('_loss')]:>12}" for c in loss_columns)
    print(header)
    for row in runs.sort_values(["family", "ratio"]).itertuples(index=False):
        record = row._asdict()
        line = (f"{record['run_id']:<14}{record['family']:<8}{record['ratio']:>7.2f}"
                f"{record['total'] / 1e6:>9.2f}M{record['activated'] / 1e6:>10.2f}M{record['state']:>11}")
        line += "".join(f"{_fmt_loss(record[c]):>12}" for c in loss_columns)
        print(line)
    if not result.summary.empty:
        print("\nFits (summary.csv):")
        print(result.summary.to_string(index=False, max_colwidth=48))
    print("\nFigures:")
    for path in result.figures:
        print(f"  {path}")
    _say(f"done in {time.perf_counter() - started:.0f}s")
    return 0 if not failed else 1
