"""What is fitted for a sweep: the ratio laws and parameter laws of every usable run, the crossovers of NE with
MoE, and the summary table of every fitted quantity with its interval and held-out error.

``<sweep>/summary.csv`` (written by :mod:`embscale.analysis.report`) is :func:`summary_table`: one row per fitted
quantity (ratio-law slopes and intercepts, parameter-law constants and exponents, crossovers) with its 95%
bootstrap interval and held-out error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

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
    caveats: list[Caveat] = field(default_factory=list)  # about the runs' data; every figure carries them


REPEATED_DATA = ("exclude", "include")


def _epochs(runs: pd.DataFrame) -> pd.Series:
    """Each run's epochs: reached (``epochs_seen``), else planned (``epochs``)."""
    def column(name: str) -> pd.Series:
        if name not in runs.columns:
            return pd.Series(float("nan"), index=runs.index)
        return pd.to_numeric(runs[name], errors="coerce")

    return column("epochs_seen").fillna(column("epochs"))


class Caveat(NamedTuple):
    """What a reader must know about the runs' data: ``text`` (a figure's footnote) and the ``runs`` it concerns."""

    text: str
    runs: int


def data_caveats(runs: pd.DataFrame, repeated_data: str = "exclude") -> list[Caveat]:
    """What every figure of the sweep says about the runs' data: runs that repeated their training data (and what
    the fits did with them) and validation splits smaller than the runs' ``eval_tokens``."""
    lines = []
    if "repeated_data" in runs.columns:
        repeated = runs[runs["repeated_data"].fillna(False).astype(bool)]
        if len(repeated):
            epochs = _epochs(repeated)
            what = "excluded from fits and figures" if repeated_data == "exclude" else "included in fits"
            lines.append(Caveat(f"{len(repeated)} of {len(runs)} runs repeated their training data (up to "
                                f"{epochs.max():.2f} epochs): {what}", len(repeated)))
    if "small_val_splits" in runs.columns:
        small = runs["small_val_splits"].fillna("").astype(str)
        names = sorted({name for value in small for name in value.split(",") if name})
        if names:
            lines.append(Caveat(f"validation split(s) {', '.join(names)} smaller than eval_tokens: losses on the "
                                "whole split", int((small != "").sum())))
    return lines


def apply_data_policy(runs: pd.DataFrame, repeated_data: str = "exclude") -> pd.DataFrame:
    """``runs`` with the runs that repeated their training data taken out of fits (``fit_ok`` False and an
    ``excluded_reason``) when ``repeated_data`` is ``exclude``: a loss on repeated text measures how much the
    model memorised, which grows with its parameters (most of all an N-gram table's), not how it scales on
    new data, and a law fitted through such runs reports crossovers that are artefacts of the corpus's size."""
    if repeated_data not in REPEATED_DATA:
        raise ValueError(f"repeated_data must be one of {', '.join(REPEATED_DATA)}, got {repeated_data!r}")
    if repeated_data == "include" or runs.empty or "repeated_data" not in runs.columns:
        return runs
    hit = runs["repeated_data"].fillna(False).astype(bool) & runs["fit_ok"].astype(bool)
    if not hit.any():
        return runs
    runs = runs.copy()
    epochs = _epochs(runs)
    runs.loc[hit, "fit_ok"] = False
    runs.loc[hit, "excluded_reason"] = [f"repeated its training data ({e:.2f} epochs; embscale plots "
                                        "--repeated-data include keeps it)" for e in epochs[hit]]
    return runs


def analyse(runs: pd.DataFrame, *, n_boot: int = 400, n_boot_param: int = 100, seed: int = 0,
            repeated_data: str = "exclude", mapper: laws.Mapper | None = None) -> Analysis:
    """Fit every ratio law and parameter law of a runs table and find the crossovers. Runs that repeated their
    training data are left out unless ``repeated_data`` is ``include`` (:func:`apply_data_policy`); ``mapper``:
    how the parameter laws' bootstrap replicates are computed (:func:`embscale.analysis.laws.fit_power_sum`)."""
    caveats = data_caveats(runs, repeated_data)
    runs = apply_data_policy(runs, repeated_data)
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
        notes.append(f"{excluded} run(s) excluded from fits (failed, diverged, running, repeated data, ...): see "
                     "excluded_reason in runs.parquet")
    notes += [caveat.text for caveat in caveats]
    return Analysis(runs, split_names, ratio_laws, param_laws, crossings, notes, caveats)


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
            bound = name.startswith("alpha") and laws.exponent_at_bound(float(row[name]))
            note = (f"at the fit's bound [0, {laws.MAX_EXPONENT:g}]: not determined by these runs; " if bound
                    else "") + row["heldout_note"]
            rows.append({"law": "param: L = E + A_act/N_act^alpha_act + A_tot/N_tot^alpha_tot",
                         "group": row["label"], "split": row["split"], "parameter": name,
                         "estimate": row[name], "ci_lo": row[f"{name}_lo"], "ci_hi": row[f"{name}_hi"],
                         "n_runs": row["n_runs"], "heldout_mae": row["heldout_mae"],
                         "heldout_mre": row["heldout_mre"], "note": note})
    keys = result.ratio_laws.keys
    for _, row in result.crossovers.iterrows():
        label = laws.group_label({k: row[k] for k in keys if k in row.index})
        side = "NE lower above r*" if row["ne_wins_above"] else "NE lower below r*"
        rows.append({"law": "crossover with MoE", "group": label, "split": row["split"], "parameter": "r*",
                     "estimate": row["crossover"], "ci_lo": row["ci_lo"], "ci_hi": row["ci_hi"],
                     "n_runs": math.nan, "heldout_mae": math.nan, "heldout_mre": math.nan,
                     "note": "; ".join(p for p in (side, row["note"]) if p)})
    for caveat in result.caveats:
        rows.append({"law": "data", "group": "", "split": "", "parameter": "runs", "estimate": float(caveat.runs),
                     "ci_lo": math.nan, "ci_hi": math.nan, "n_runs": float(caveat.runs), "heldout_mae": math.nan,
                     "heldout_mre": math.nan, "note": caveat.text})
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
            note = f"  ({row['note']})" if row["parameter"] == "r*" and row["note"] else \
                "  (at its bound: not determined)" if str(row["note"]).startswith("at the fit's bound") else ""
            lines.append(f"  {row['split']:<10} {label[:60]:<60} {row['parameter']:>9} = "
                         f"{row['estimate']:9.4g} [{row['ci_lo']:.4g}, {row['ci_hi']:.4g}]{held}{note}")
        if len(group) > max_rows:
            lines.append(f"  ... {len(group) - max_rows} more in summary.csv")
    return "\n".join(lines)


__all__ = ["Analysis", "Caveat", "REPEATED_DATA", "SUMMARY_COLUMNS", "analyse", "apply_data_policy", "data_caveats",
           "format_summary", "summary_table"]
