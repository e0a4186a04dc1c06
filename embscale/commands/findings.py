"""``embscale findings``: the paper's findings as the reproduction sweeps measured them, as ``REPRODUCTION.md``.

    embscale findings [--results results] [--manifest sweeps/reproduction/manifest.yaml] [--out REPRODUCTION.md]

One row per claim (:mod:`embscale.analysis.findings` says how each is measured and judged), linking the figures of
its sweep (``--plots`` draws them first), then where every number came from: each sweep's runs (completed, failed,
excluded, their seconds, the span from the first start to the last end, the device), the tuned learning rates and
the device time of the runbook's calls (``results/reproduction/progress.json``). For the rows that do not agree,
the "to settle it" column names the next-scale sweep (``next/`` beside the manifest) and its planned GPU-hours
(``embscale plan``, with the tunes of the sizes it trains). A missing manifest or results folder exits 2.
Rewriting an existing file keeps what follows its :data:`KEPT_MARKER` line (a reading written by hand).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
from typing import Any

from embscale.analysis.findings import (
    CONTROL_SWEEP,
    FIGURE_FILES,
    SWEEPS,
    Finding,
    control_contrasts,
    render_contrasts,
    render_markdown,
    repeated_runs,
    reproduction_findings,
    verdict_counts,
)
from embscale.analysis.store import load
from embscale.base.errors import UserError
from embscale.base.files import atomic_write_text
from embscale.bench.reproduce import DEFAULT_MANIFEST, load_manifest, model_size, sweep_sizes
from embscale.sweeps.sweepfile import load_sweep_mapping

#: which figure key of :data:`embscale.analysis.findings.SWEEPS` a finding key belongs to
FIGURE_OF_FINDING = {"fig2": "fig2", "fig4": "fig4", "fig5": "fig5", "fig6": "fig67", "fig7": "fig67",
                     "fig9": "fig9"}
NEXT_DIR = "next"
#: the line after which REPRODUCTION.md holds text written by hand, kept when the command rewrites the file
KEPT_MARKER = "<!-- written by hand: kept when embscale findings rewrites this file -->"


def figure_key(sweep_file: Path) -> str | None:
    """The figure key of a reproduction sweep file, from its name (``fig67_width_depth.yaml`` -> ``fig67``)."""
    key = sweep_file.stem.split("_")[0]
    return key if key in SWEEPS else None


def sweep_names(sweep_files: list[Path]) -> dict[str, str]:
    """Figure key -> the ``name:`` of the manifest's sweep for it."""
    names = {}
    for path in sweep_files:
        key = figure_key(path)
        if key is not None:
            names[key] = str(load_sweep_mapping(path)["name"])
    return names


def next_scale(manifest_dir: Path) -> dict[str, str]:
    """Finding key prefix (figure key) -> "`file`: runs, GPU-hours" of the next-scale sweep, tunes included."""
    from embscale.sweeps.plan import load_plan

    manifest_path = manifest_dir / NEXT_DIR / "manifest.yaml"
    if not manifest_path.is_file():
        return {}
    manifest = load_manifest(manifest_path)
    tunes = {}
    for path in manifest.tune:
        mapping = load_sweep_mapping(path)
        trials = int((mapping.get("tune") or {}).get("trials") or 1)
        tunes[model_size(mapping)] = (path, trials * load_plan(path).plan.gpu_hours())
    out = {}
    for path in manifest.sweeps:
        key = figure_key(path)
        if key is None:
            continue
        plan = load_plan(path).plan
        needed = [tunes[size] for size in sweep_sizes(load_sweep_mapping(path)) if size in tunes]
        tune_hours = sum(hours for _, hours in needed)
        relative = path.relative_to(manifest_dir.parent.parent) if manifest_dir.parent.parent in path.parents \
            else path
        text = f"`{relative}`: {len(plan.runs)} runs, {plan.gpu_hours():.3g} GPU-h"
        if needed:
            text += f" (+{tune_hours:.3g} GPU-h to tune {len(needed)} size(s) first)"
        out[key] = text + " at 35% MFU of an H100/H200"
    return out


def _control_section(results: Path, names: dict[str, str]) -> list[str]:
    """The control of NE's advantage for the louder embedding (not a claim of the paper), or what would run it."""
    lines = ["## A control: NE against an MoE whose token embedding is amplified too", "",
             "Not a claim of the paper. NE's output is multiplied by sqrt(D) (`ngram.amplification: sqrt_d`, as in "
             "the paper); the MoE's token embedding is not. The control trains Fig. 2's MoE ladder with its token "
             "embedding multiplied by sqrt(D) (`model.embedding_amplification: sqrt_d`; no parameters, so the "
             "totals are unchanged) and compares, seed by seed, each NE arm of Fig. 2 with it, and it with the "
             "plain MoE. Differences are reported, not judged.", ""]
    contrasts = control_contrasts(results, names.get("fig2", "repro_fig2_ladder"), CONTROL_SWEEP)
    if contrasts:
        lines.append(render_contrasts(contrasts).rstrip("\n"))
    else:
        lines.append(f"Not run yet: `sweeps/reproduction/control_moe_sqrt_d.yaml` ({CONTROL_SWEEP}, 10 runs, the "
                     "runbook's last sweep).")
    return lines + [""]


def _repeats_section(results: Path, names: dict[str, str]) -> list[str]:
    """The runs trained more than once, by sweeps that ran side by side: the run-to-run noise, measured."""
    repeats = repeated_runs(results, [*names.values(), CONTROL_SWEEP])
    if repeats.empty:
        return []
    listed = "; ".join(f"`{row.run_id}` {', '.join(f'{v:.3f}' for v in row.losses)}" for row in repeats.itertuples())
    return ["", f"Runs trained more than once (the same run id in several sweeps, trained again rather than copied "
                f"because its twin was still running): {len(repeats)}, {int(repeats['trainings'].sum())} trainings; "
                f"final training losses: {listed}. Their spread, {repeats['spread'].min():.3f} to "
                f"{repeats['spread'].max():.3f}, is run-to-run noise that no seed interval above contains."]


def _progress(results: Path) -> dict[str, Any]:
    path = results / "reproduction" / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _runs_section(results: Path, names: dict[str, str]) -> list[str]:
    lines = ["| sweep | runs completed | failed or diverged | excluded from fits | seconds of its runs (wall) "
             "| first start to last end | device |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in names.values():
        sweep_dir = results / name
        if not sweep_dir.is_dir():
            lines.append(f"| `{name}` | - | - | - | - | - | - |")
            continue
        runs, _ = load(sweep_dir, curves=False)
        done = int((runs["state"] == "completed").sum())
        failed = int(runs["state"].isin(["failed", "diverged"]).sum())
        excluded = int((~runs["fit_ok"].astype(bool)).sum())
        seconds = float(runs["wall_time_s"].fillna(0).sum()) if "wall_time_s" in runs else float("nan")
        devices = ", ".join(sorted({str(d) for d in runs.get("device", []) if isinstance(d, str)})) or "-"
        lines.append(f"| `{name}` | {done} | {failed} | {excluded} | {seconds:,.0f} | {_span(runs)} | {devices} |")
    return lines


def figure_links(findings: list[Finding], results: Path, out_dir: Path) -> dict[str, list[str]]:
    """Per finding, its sweep's PNG figures that show it (drawn by ``embscale plots``), relative to ``out_dir``."""
    links = {}
    for finding in findings:
        prefix = FIGURE_FILES.get(finding.key.split("_")[0])
        folder = results / finding.sweep / "figures"
        if prefix and folder.is_dir():
            links[finding.key] = [os.path.relpath(path, out_dir) for path in sorted(folder.glob(f"{prefix}*.png"))]
    return links


def _span(runs: Any) -> str:
    """From the first run's start (its last update less its wall time) to the last run's end: how long the sweep
    took, its runs packed or not (sweeps the runbook ran side by side overlap)."""
    import pandas as pd

    if "updated_at" not in runs or "wall_time_s" not in runs:
        return "-"
    ended = pd.to_datetime(runs["updated_at"], utc=True, errors="coerce")
    started = ended - pd.to_timedelta(runs["wall_time_s"].astype(float), unit="s")
    if ended.isna().all():
        return "-"
    return f"{(ended.max() - started.min()).total_seconds():,.0f} s"


def _shown(path: Path, out_dir: Path) -> str:
    """``path`` relative to ``out_dir`` when it lies below it (a repository's own manifest), else folder/name."""
    relative = os.path.relpath(path.resolve(), out_dir.resolve())
    return relative if not relative.startswith("..") else f"{path.parent.name}/{path.name}"


def report(results: Path, manifest_path: Path, out_dir: Path = Path(".")) -> str:
    """The text of ``REPRODUCTION.md`` for the results under ``results``, its figure links relative to
    ``out_dir`` (where the file goes)."""
    manifest = load_manifest(manifest_path)
    names = sweep_names(list(manifest.sweeps))
    findings = reproduction_findings(results, names)
    settle_by_figure = next_scale(manifest_path.parent)
    settle = {f.key: settle_by_figure.get(FIGURE_OF_FINDING.get(f.key.split("_")[0], ""), "") for f in findings}
    counts = verdict_counts(findings)
    progress = _progress(results)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    lines = [
        "# The paper's findings, as the harness measured them",
        "",
        f"Written by `embscale findings` on {today} from the collected results of the "
        f"reproduction sweeps (`{_shown(manifest_path, out_dir)}`: why these sizes, tokens and learning rates is in "
        "the README beside it). Regenerate each sweep's figures with `embscale plots results/<sweep>`, and this "
        "file with `embscale findings --plots`.",
        "",
        f"**{counts['agree']} agree, {counts['disagree']} disagree, {counts['inconclusive']} inconclusive, "
        f"{counts['not measured']} not measured.**",
        "",
        "How a row is judged (fixed before the results): each claim is one or more loss differences between arms "
        "that differ only in what the claim is about, taken seed by seed; the interval is the range over the seeds "
        "(two seeds) or the 95% t-interval of the mean (three or more); one seed settles nothing. A row agrees when "
        "every difference lies "
        "entirely on the side the paper reports, for the training loss and every validation split; disagrees when "
        "every one lies entirely on the other side; otherwise it is inconclusive. Magnitudes are reported, not "
        "judged. Losses are the mean of each run's last evaluations (`final_<split>_loss`).",
        "",
        render_markdown(findings, settle, figure_links(findings, results, out_dir)).rstrip("\n"),
        "",
        *_control_section(results, names),
        "## Where the numbers come from",
        "",
        *_runs_section(results, {**names, "control": CONTROL_SWEEP}),
        *_repeats_section(results, names),
    ]
    if progress:
        rates = ", ".join(f"{size}: {rate:.3g}" if isinstance(rate, (int, float)) else f"{size}: -"
                          for size, rate in progress.get("learning_rates", {}).items())
        calls = progress.get("calls", [])
        lines += ["", f"Tuned learning rates (width x depth): {rates or '-'}.", "",
                  f"The runbook's calls: {len(calls)}, {sum(c.get('wall_s', 0) for c in calls):,.0f} s in all "
                  f"({', '.join(format(c.get('wall_s', 0), ',.0f') + ' s' for c in calls)}); corpus: "
                  + "; ".join(f"{c.get('corpus')} ({c.get('train_tokens', 0):,} training tokens)"
                              for c in progress.get("corpora", []))]
    return "\n".join(lines) + "\n"


def kept_reading(out: Path) -> str:
    """What follows :data:`KEPT_MARKER` in the file being rewritten (a reader's account of the results, written
    by hand), marker included, so that regenerating the table keeps it; empty when there is none."""
    if not out.is_file():
        return ""
    text = out.read_text()
    at = text.find(KEPT_MARKER)
    return "\n" + text[at:] if at >= 0 else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="results", help="results folder holding the sweeps (default results)")
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST),
                        help="the reproduction manifest whose sweeps are read (default the shipped one)")
    parser.add_argument("--out", default="REPRODUCTION.md", help="file written (default REPRODUCTION.md)")
    parser.add_argument("--plots", action="store_true",
                        help="first draw each reproduction sweep's figures (embscale plots), which the table links")


def run(args: argparse.Namespace) -> int:
    load_manifest(Path(args.manifest))  # a bad manifest is named before anything else
    results = Path(args.results)
    if not results.is_dir():
        raise UserError(f"--results {results}: no such folder (the results root holding the reproduction sweeps)")
    if args.plots:
        from embscale.analysis.report import plot_sweep

        for name in sweep_names(list(load_manifest(Path(args.manifest)).sweeps)).values():
            if (results / name).is_dir():
                drawn = plot_sweep(name, results=results, jobs=None)
                print(f"{name}: {len(drawn.figures)} figure files")
    out = Path(args.out)
    text = report(results, Path(args.manifest), out.resolve().parent) + kept_reading(out)
    atomic_write_text(out, text)
    print(next(line for line in text.splitlines() if line.startswith("**")))
    print(f"wrote {args.out}")
    return 0
