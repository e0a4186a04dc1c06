"""What is fitted for a sweep: the ratio laws and parameter laws of every usable run, the crossovers of NE with
MoE, and the summary table of every fitted quantity with its interval and held-out error.

``<sweep>/summary.csv`` (written by :mod:`embscale.analysis.report`) is :func:`summary_table`: one row per fitted
quantity (ratio-law slopes and intercepts, parameter-law constants and exponents, crossovers) with its 95%
bootstrap interval and held-out error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from embscale.analysis import frontier, laws
from embscale.analysis.store import splits


@dataclass
class Analysis:
    """A runs table and everything fitted from it (figures and the summary read this)."""

    runs: pd.DataFrame
    split_names: list[str]
    ratio_laws: laws.RatioLaws
    param_laws: laws.ParamLaws
    crossovers: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def analyse(runs: pd.DataFrame, *, n_boot: int = 400, n_boot_param: int = 100, seed: int = 0,
            mapper: laws.Mapper | None = None) -> Analysis:
    """Fit every ratio law and parameter law of a runs table and find the crossovers (``mapper``: how the
    parameter laws' bootstrap replicates are computed, :func:`embscale.analysis.laws.fit_power_sum`)."""
    split_names = splits(runs)
    ratio_laws = laws.fit_ratio_laws(runs, split_names=split_names, n_boot=n_boot, seed=seed)
    param_laws = laws.fit_param_laws(runs, split_names=split_names, n_boot=n_boot_param, seed=seed, mapper=mapper)
    crossings = frontier.crossovers(ratio_laws)
    notes = []
    if param_laws.skipped:
        notes.append(f"parameter law skipped for {len(param_laws.skipped)} group(s) whose sizes do not vary "
                     f"enough, e.g. {param_laws.skipped[0]}")
    excluded = int((~runs["fit_ok"]).sum()) if len(runs) else 0
    if excluded:
        notes.append(f"{excluded} run(s) excluded from fits (failed, diverged, running, ...): see "
                     "excluded_reason in runs.parquet")
    return Analysis(runs, split_names, ratio_laws, param_laws, crossings, notes)


SUMMARY_COLUMNS = ["law", "group", "split", "parameter", "estimate", "ci_lo", "ci_hi", "n_runs", "heldout_mae",
                   "heldout_mre", "note"]


def summary_table(result: Analysis) -> pd.DataFrame:
    """One row per fitted quantity, columns :data:`SUMMARY_COLUMNS` (intervals: 95% bootstrap)."""
    rows = []
    for _, row in result.ratio_laws.table.iterrows():
        for name in ("b", "a"):
            rows.append({"law": "ratio: L = a + b ln(ratio)", "group": row["label"], "split": row["split"],
                         "parameter": name, "estimate": row[name], "ci_lo": row[f"{name}_lo"],
                         "ci_hi": row[f"{name}_hi"], "n_runs": row["n_runs"], "heldout_mae": row["heldout_mae"],
                         "heldout_mre": row["heldout_mre"], "note": row["heldout_note"]})
    for _, row in result.param_laws.table.iterrows():
        for name in ("alpha_act", "alpha_tot", "E", "A_act", "A_tot"):
            rows.append({"law": "param: L = E + A_act/N_act^alpha_act + A_tot/N_tot^alpha_tot",
                         "group": row["label"], "split": row["split"], "parameter": name,
                         "estimate": row[name], "ci_lo": row[f"{name}_lo"], "ci_hi": row[f"{name}_hi"],
                         "n_runs": row["n_runs"], "heldout_mae": row["heldout_mae"],
                         "heldout_mre": row["heldout_mre"], "note": row["heldout_note"]})
    keys = result.ratio_laws.keys
    for _, row in result.crossovers.iterrows():
        label = laws.group_label({k: row[k] for k in keys if k in row.index})
        side = "NE lower above r*" if row["ne_wins_above"] else "NE lower below r*"
        rows.append({"law": "crossover with MoE", "group": label, "split": row["split"], "parameter": "r*",
                     "estimate": row["crossover"], "ci_lo": row["ci_lo"], "ci_hi": row["ci_hi"],
                     "n_runs": math.nan, "heldout_mae": math.nan, "heldout_mre": math.nan,
                     "note": "; ".join(p for p in (side, row["note"]) if p)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def format_summary(summary: pd.DataFrame, max_rows: int = 40) -> str:
    """A compact printed form of the summary: slopes, exponents and crossovers."""
    if summary.empty:
        return "no fits (too few usable runs along any axis)"
    keep = summary[summary["parameter"].isin(["b", "alpha_act", "alpha_tot", "r*"])]
    # words every group shares (one corpus, amplification=none, ...) are printed once, not on every line
    words = [set(str(g).split()) for g in keep["group"]]
    common = set.intersection(*words) if words else set()
    lines = [f"all groups: {' '.join(sorted(common))}"] if common else []
    for law, group in keep.groupby("law", sort=False):
        lines.append(law)
        for _, row in group.head(max_rows).iterrows():
            label = " ".join(w for w in str(row["group"]).split() if w not in common)
            held = f"  held-out MAE {row['heldout_mae']:.4f}" if np.isfinite(row["heldout_mae"]) else ""
            note = f"  ({row['note']})" if row["parameter"] == "r*" and row["note"] else ""
            lines.append(f"  {row['split']:<10} {label[:60]:<60} {row['parameter']:>9} = "
                         f"{row['estimate']:9.4g} [{row['ci_lo']:.4g}, {row['ci_hi']:.4g}]{held}{note}")
        if len(group) > max_rows:
            lines.append(f"  ... {len(group) - max_rows} more in summary.csv")
    return "\n".join(lines)


__all__ = ["Analysis", "SUMMARY_COLUMNS", "analyse", "format_summary", "summary_table"]
