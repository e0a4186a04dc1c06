"""How fast the sweep tools run on a CPU machine: ``embscale plan`` of 10,000 distinct models and ``embscale plots``
of 1,000 runs of 100 evaluations each, optionally against another checkout, timed pair by pair.

    python -m embscale.bench.sweep_tools [--dir DIR] [--repeat 5] [--baseline OTHER_PYTHON] [--jobs 1]

makes its inputs under ``--dir`` (kept between calls; made again only when missing):

- ``results/big/``: a synthetic sweep of ``--runs`` run folders (``python -m embscale.analysis.synthetic``: the
  trainer's layout, losses drawn from a known law), ``--evals`` evaluations each;
- ``plan_10k.yaml``: the shipped ``paper_280m.yaml`` crossed over 10 widths, 10 depths and 50 ratios for MoE and
  NE (base ratio 4): 10,000 points, every one a distinct model (checked);

then times each command as a whole process (start-up and imports included), ``--repeat`` times:

- ``plan``: ``embscale plan plan_10k.yaml`` (the printed table);
- ``plots, from run folders``: ``embscale plots results/big`` with the collected tables and figures removed first
  (the first ``plots`` after a sweep: collect, fit, draw);
- ``plots, collected``: the same with ``runs.parquet`` and ``curves.parquet`` already there.

With ``--baseline`` (the Python of another checkout's environment, e.g. ``/tmp/old/.venv/bin/python``) each
command runs alternately with this checkout's and the baseline's, and the ratio is taken pair by pair (the median
of the ratios is robust to the machine's speed drifting, as it does when others share it). The outputs are then
checked equal: plan's table byte for byte, plots' ``summary.csv`` byte for byte, the figures' names, every
PNG pixel for pixel and every PDF byte for byte but its creation date. Prints a Markdown table; medians, with min
and max.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

WIDTHS = [512, 640, 768, 896, 1024, 1152, 1280, 1408, 1536, 1664]
DEPTHS = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
RATIOS = [4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8] + list(range(9, 51))  # 50 ratios, all above the base ratio 4


def make_inputs(root: Path, runs: int, evals: int) -> tuple[Path, Path]:
    """The results folder of the synthetic sweep and the 10,000-model sweep file (made when missing)."""
    import embscale.sweeps

    root.mkdir(parents=True, exist_ok=True)
    sweep_dir = root / "results" / "big"
    if not sweep_dir.is_dir() or sum(1 for p in sweep_dir.iterdir() if p.is_dir()) < runs:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "embscale.analysis.synthetic", str(root / "results"), "--runs",
                        str(runs), "--evals", str(evals), "--sweep", "big"], check=True, stdout=subprocess.DEVNULL)
    sweep_file = root / "plan_10k.yaml"
    if not sweep_file.exists():
        paper = Path(embscale.sweeps.__file__).parent / "paper_280m.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "extends": str(paper), "name": "plan_10k",
            "grid": {"family": ["moe", "ne"], "width": WIDTHS, "depth": DEPTHS, "ratio": RATIOS, "base_ratio": [4]},
            "limits": {"max_ne_share": 0.95}}, sort_keys=False))
    from embscale.sweeps.plan import load_plan

    plan = load_plan(sweep_file).plan
    if len(plan.runs) < 10_000 or plan.skipped or plan.duplicates:
        raise SystemExit(f"{sweep_file}: {len(plan.runs)} runs, {len(plan.skipped)} skipped, {plan.duplicates} "
                         "duplicates: expected 10,000 distinct models")
    return sweep_dir, sweep_file


def _timed(command: list[str], before: Callable[[], None], stdout: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children) of one run of ``command``, run in the folder
    of ``stdout`` (not in a checkout, whose ``embscale/`` folder would shadow the other environment's)."""
    before()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(stdout, "wb") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=stdout.parent)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)


def _clear_collected(sweep_dir: Path) -> Callable[[], None]:
    def clear() -> None:
        for name in ("runs.parquet", "curves.parquet", "summary.csv"):
            (sweep_dir / name).unlink(missing_ok=True)
        shutil.rmtree(sweep_dir / "figures", ignore_errors=True)
    return clear


def _spread(values: list[float], unit: str = "s") -> str:
    return f"{statistics.median(values):.3g} {unit} ({min(values):.3g}-{max(values):.3g})"


def _without_creation_date(pdf: bytes) -> bytes:
    return re.sub(rb"/CreationDate \(D:\d+Z?\)", b"", pdf)


def _same_figures(a: Path, b: Path) -> str:
    """'' when the two figure folders hold the same files, every PNG has the same pixels and every PDF the same
    bytes but its creation date, else why not."""
    import numpy as np
    from PIL import Image

    names_a, names_b = sorted(p.name for p in a.iterdir()), sorted(p.name for p in b.iterdir())
    if names_a != names_b:
        return f"different figure files: {sorted(set(names_a) ^ set(names_b))}"
    for name in names_a:
        if name.endswith(".pdf"):
            if _without_creation_date((a / name).read_bytes()) != _without_creation_date((b / name).read_bytes()):
                return f"{name}: PDF differs"
        elif name.endswith(".png"):
            pixels_a = np.asarray(Image.open(a / name).convert("RGBA"))
            pixels_b = np.asarray(Image.open(b / name).convert("RGBA"))
            if pixels_a.shape != pixels_b.shape or not np.array_equal(pixels_a, pixels_b):
                return f"{name}: pixels differ"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embscale.bench.sweep_tools",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/embscale-sweep-bench", help="where the inputs and outputs go")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--evals", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each command (default 5)")
    parser.add_argument("--baseline", default=None, help="the Python of another checkout, timed in turn with this one")
    parser.add_argument("--only", choices=("plan", "plots"), default=None, help="time one command only")
    parser.add_argument("--jobs", choices=("1", "2"), default=None,
                        help="plots' --jobs (default: its own choice, which depends on the CPUs others leave idle "
                             "at each run, so that a pair may compare one process with two)")
    args = parser.parse_args(argv)

    root = Path(args.dir).resolve()
    sweep_dir, sweep_file = make_inputs(root, args.runs, args.evals)
    pythons = {"this": sys.executable} | ({"baseline": args.baseline} if args.baseline else {})
    cases = []
    if args.only in (None, "plan"):
        cases.append(("plan: 10,000 distinct models", ["plan", str(sweep_file)], lambda: None))
    jobs = ["--jobs", args.jobs] if args.jobs else []
    if args.only in (None, "plots"):
        cases.append((f"plots: {args.runs} runs x {args.evals} evaluations, from run folders",
                      ["plots", str(sweep_dir), "--quiet", *jobs], _clear_collected(sweep_dir)))
        cases.append((f"plots: {args.runs} runs x {args.evals} evaluations, collected",
                      ["plots", str(sweep_dir), "--quiet", *jobs], lambda: None))
    load = os.getloadavg()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}; load average {load[0]:.2f} at the start", file=sys.stderr)
    rows = []
    for title, command, before in cases:
        walls: dict[str, list[float]] = {name: [] for name in pythons}
        cpus: dict[str, list[float]] = {name: [] for name in pythons}
        kept: dict[str, Path] = {}
        for repeat in range(args.repeat + 1):  # the first pair warms the file cache and is not counted
            for name, python in pythons.items():
                out = root / f"stdout-{name}.txt"
                wall, cpu = _timed([python, "-m", "embscale.cli", *command], before, out)
                if repeat:
                    walls[name].append(wall)
                    cpus[name].append(cpu)
                if command[0] == "plan":
                    kept[name] = out
                elif repeat == args.repeat:  # keep the last outputs to compare
                    target = root / f"outputs-{name}"
                    shutil.rmtree(target, ignore_errors=True)
                    shutil.copytree(sweep_dir / "figures", target / "figures")
                    shutil.copy(sweep_dir / "summary.csv", target / "summary.csv")
                    kept[name] = target
                print(f"  {title}: {name} {wall:.2f} s", file=sys.stderr)
        row = [title, _spread(walls["this"]), _spread(cpus["this"])]
        if args.baseline:
            ratios = [a / b for a, b in zip(walls["this"], walls["baseline"], strict=True)]
            cpu_ratios = [a / b for a, b in zip(cpus["this"], cpus["baseline"], strict=True)]
            row += [_spread(walls["baseline"]), _spread(cpus["baseline"]),
                    f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                    f"{statistics.median(cpu_ratios):.2f} ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})"]
            if command[0] == "plan":
                same = kept["this"].read_bytes() == kept["baseline"].read_bytes()
                row.append("table identical" if same else "TABLE DIFFERS")
            else:
                why = _same_figures(kept["this"] / "figures", kept["baseline"] / "figures")
                same = (kept["this"] / "summary.csv").read_bytes() == (kept["baseline"] / "summary.csv").read_bytes()
                row.append(("summary.csv identical" if same else "SUMMARY DIFFERS") + "; "
                           + ("figures identical" if not why else why.upper()))
        rows.append(row)
    header = ["command", "this checkout: wall", "CPU"]
    if args.baseline:
        header += ["baseline: wall", "CPU", "this / baseline (paired wall)", "(paired CPU)", "outputs"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} at the end", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
