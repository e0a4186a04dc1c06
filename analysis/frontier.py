"""Pareto frontiers, the NE-MoE crossover ratio, and matched NE-vs-MoE loss reductions.

- :func:`pareto_mask` marks the runs no other run beats on both a cost (total or activated parameters,
  training FLOPs, ratio) and the loss; :func:`frontiers` lists them per family.
- :func:`crossovers` intersects each NE (and PLE/PLNE) ratio law with the MoE ratio law of the same backbone
  size and split: ``a_ne + b_ne u = a_moe + b_moe u`` at ``u* = ln r*``, with a bootstrap interval from the
  two fits' replicates (independent resamples of the two sets of runs). ``ne_wins_above`` says on which side
  the embedding curve is lower.
- :func:`matched_pairs` pairs every NE-like run with the MoE run of the same target ratio, width, depth, seed
  and corpus (the paper's parameter-equivalent MoE) and gives ``delta = L_ne - L_moe`` (negative: NE wins);
  :func:`loss_reduction` averages it per width or depth and ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from embscale.analysis.laws import CI_LEVEL, RatioLaws, percentile_ci
from embscale.analysis.store import loss_column, splits, usable

COST_AXES = ("total", "activated", "flops", "ratio")
EMBEDDING_FAMILIES = ("ne", "ple", "plne")
MATCH_KEYS = ("corpus_fingerprint", "target_ratio", "width", "depth", "seed")


def pareto_mask(cost: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """Boolean mask of the points on the lower-left Pareto frontier of (cost, loss), both minimised.

    A point is on the frontier when no other point has cost <= and loss <= with one of them strictly
    smaller. Duplicated points are all kept. Non-finite points are never on it.
    """
    x = np.asarray(cost, dtype=float)
    y = np.asarray(loss, dtype=float)
    mask = np.zeros(len(x), dtype=bool)
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if len(finite) == 0:
        return mask
    order = finite[np.lexsort((y[finite], x[finite]))]  # by cost, then loss
    best = math.inf
    i = 0
    while i < len(order):
        # all points sharing this cost: only the lowest loss among them can be on the frontier
        j = i
        while j < len(order) and x[order[j]] == x[order[i]]:
            j += 1
        group = order[i:j]
        lowest = y[group[0]]
        if lowest < best:
            mask[group[y[group] == lowest]] = True
            best = lowest
        i = j
    return mask


def frontiers(runs: pd.DataFrame, split: str = "train", axes: Sequence[str] = COST_AXES,
              by: str | None = "family") -> pd.DataFrame:
    """Frontier runs for each cost axis (and each value of ``by``; ``by=None`` for one overall frontier).

    Columns: ``axis``, ``group``, ``run_id``, ``cost``, ``loss``, sorted by cost within each frontier.
    """
    data = usable(runs)
    column = loss_column(split)
    rows = []
    if column not in data.columns:
        return pd.DataFrame(columns=["axis", "group", "run_id", "cost", "loss"])
    groups = data.groupby(by, dropna=False) if by else [("all", data)]
    for name, group in groups:
        for axis in axes:
            if axis not in group.columns:
                continue
            mask = pareto_mask(group[axis].to_numpy(float), group[column].to_numpy(float))
            on = group[mask].sort_values(axis)
            for _, row in on.iterrows():
                rows.append({"axis": axis, "group": name if not isinstance(name, tuple) else name[0],
                             "run_id": row["run_id"], "cost": float(row[axis]), "loss": float(row[column])})
    return pd.DataFrame(rows, columns=["axis", "group", "run_id", "cost", "loss"])


# ----------------------------------------------------------------------------------------------------------
# crossover

def crossover_ratio(a1: float, b1: float, a2: float, b2: float) -> float:
    """Ratio at which ``a1 + b1 ln r`` meets ``a2 + b2 ln r`` (NaN for parallel lines)."""
    if b1 == b2:
        return math.nan
    u = (a2 - a1) / (b1 - b2)
    return math.exp(u) if u < 700 else math.inf


def _crossover_draws(boot1: np.ndarray, boot2: np.ndarray) -> np.ndarray:
    n = min(len(boot1), len(boot2))
    if n == 0:
        return np.zeros(0)
    a1, b1 = boot1[:n, 0], boot1[:n, 1]
    a2, b2 = boot2[:n, 0], boot2[:n, 1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        u = (a2 - a1) / (b1 - b2)
        return np.exp(np.clip(u, -700, 700))


def crossovers(laws: RatioLaws, *, reference_family: str = "moe",
               families: Sequence[str] = EMBEDDING_FAMILIES, level: float = CI_LEVEL) -> pd.DataFrame:
    """Crossover ratio of every embedding-family ratio law with the MoE law of the same backbone and split.

    Columns: the series keys, ``split``, ``crossover`` (``r*``), ``ci_lo``, ``ci_hi``, ``ne_wins_above``
    (True: the embedding curve is lower for ratios above ``r*``), ``in_range`` (``r*`` inside the ratios both
    fits saw), ``b_ne``, ``b_moe``, ``note``.
    """
    keys = laws.keys
    if "family" not in keys:
        return pd.DataFrame()
    fam_i = keys.index("family")
    # the MoE law is matched on the backbone (fingerprint, width, depth); its n-gram columns are empty
    shared = [k for k in ("corpus_fingerprint", "width", "depth") if k in keys]
    moe: dict[tuple, list[tuple[tuple, str]]] = {}
    for key, split in laws.fits:
        if key[fam_i] == reference_family:
            moe.setdefault((_norm_key(key, keys, shared), split), []).append((key, split))
    rows = []
    for (key, split), fit in laws.fits.items():
        if key[fam_i] not in families:
            continue
        matches = moe.get((_norm_key(key, keys, shared), split), [])
        if not matches:
            continue
        ref = laws.fits[matches[0]]
        r_star = crossover_ratio(fit.a, fit.b, ref.a, ref.b)
        draws = _crossover_draws(fit.boot, ref.boot)
        if len(draws):
            lo, hi = percentile_ci(draws[:, None], level)
            lo, hi = float(lo[0]), float(hi[0])
        else:
            lo = hi = math.nan
        low = max(fit.ratio_min, ref.ratio_min)
        high = min(fit.ratio_max, ref.ratio_max)
        in_range = bool(np.isfinite(r_star) and low <= r_star <= high)
        note = ""
        if not np.isfinite(r_star):
            note = "parallel fits"
        elif not in_range:
            note = f"outside the ratios both series cover ({low:.3g}-{high:.3g}): extrapolated"
        if len(draws) and np.mean(np.sign(fit.boot[:len(draws), 1] - ref.boot[:len(draws), 1])
                                  != np.sign(fit.b - ref.b)) > 0.05:
            note = (note + "; " if note else "") + "slope difference not significant (>5% of replicates flip)"
        rows.append({**dict(zip(keys, key, strict=True)), "split": split, "crossover": r_star,
                     "ci_lo": lo, "ci_hi": hi, "ne_wins_above": bool(fit.b < ref.b), "in_range": in_range,
                     "b_ne": fit.b, "b_moe": ref.b, "note": note})
    return pd.DataFrame(rows)


def _norm_key(key: tuple, keys: list[str], shared: list[str]) -> tuple:
    out = []
    for name in shared:
        value = key[keys.index(name)]
        out.append(None if value is None or (isinstance(value, float) and math.isnan(value)) else value)
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# matched pairs and loss reductions

def matched_pairs(runs: pd.DataFrame, split: str = "train", *, families: Sequence[str] = EMBEDDING_FAMILIES,
                  reference_family: str = "moe") -> pd.DataFrame:
    """Each usable embedding-family run with its matched MoE run (same :data:`MATCH_KEYS`).

    Columns: the match keys, ``family``, ``base_ratio``, ``ngram_n``, ``ngram_k``, ``amplification``,
    ``run_id``, ``moe_run_id``, ``loss``, ``moe_loss``, ``delta`` (``loss - moe_loss``) and
    ``relative`` (``delta / moe_loss``). Several MoE runs under one key are averaged.
    """
    data = usable(runs)
    column = loss_column(split)
    keys = [k for k in MATCH_KEYS if k in data.columns]
    if column not in data.columns or "target_ratio" not in keys:
        return pd.DataFrame()
    ref = data[data["family"] == reference_family]
    ref = ref[np.isfinite(ref[column])]
    ref = (ref.groupby(keys, dropna=False)
           .agg(moe_loss=(column, "mean"), moe_run_id=("run_id", "first")).reset_index())
    extra = [c for c in ("family", "base_ratio", "ngram_n", "ngram_k", "amplification", "sizing",
                         "per_layer_kind", "ratio", "total", "activated") if c in data.columns]
    emb = data[data["family"].isin(families)]
    emb = emb[np.isfinite(emb[column])][keys + extra + ["run_id", column]].rename(columns={column: "loss"})
    pairs = emb.merge(ref, on=keys, how="inner")
    pairs["delta"] = pairs["loss"] - pairs["moe_loss"]
    pairs["relative"] = pairs["delta"] / pairs["moe_loss"]
    pairs["split"] = split
    return pairs


def loss_reduction(runs: pd.DataFrame, split: str = "train", by: str = "width", *,
                   families: Sequence[str] = ("ne",)) -> pd.DataFrame:
    """Mean matched ``delta`` (NE minus MoE) per ``by`` value, NE anchor and target ratio, with its spread.

    Only the dominant n-gram variant (the most common N, K, amplification, sizing) is used, so that N-by-K
    or amplification ablations do not mix into the width or depth comparison.
    """
    pairs = matched_pairs(runs, split, families=families)
    if pairs.empty:
        return pairs
    pairs = dominant_variant(pairs)
    group = [c for c in (by, "base_ratio", "target_ratio") if c in pairs.columns]
    out = (pairs.groupby(group, dropna=False)
           .agg(delta=("delta", "mean"), delta_std=("delta", "std"), n_pairs=("delta", "size"),
                ratio=("ratio", "mean") if "ratio" in pairs.columns else ("target_ratio", "mean"))
           .reset_index())
    out["delta_std"] = out["delta_std"].fillna(0.0)
    out["split"] = split
    return out


VARIANT_KEYS = ("ngram_n", "ngram_k", "amplification", "sizing")


def dominant_variant(frame: pd.DataFrame, keys: Sequence[str] = VARIANT_KEYS) -> pd.DataFrame:
    """Rows of the most common combination of the n-gram variant columns present (NaN counts as a value)."""
    present = [k for k in keys if k in frame.columns]
    if not present or frame.empty:
        return frame
    combos = frame[present].astype(object).where(frame[present].notna(), "<na>").astype(str).agg("|".join, axis=1)
    return frame[combos == combos.value_counts().index[0]]


def all_loss_reductions(runs: pd.DataFrame, by: str) -> pd.DataFrame:
    """:func:`loss_reduction` for every split, stacked."""
    parts = [loss_reduction(runs, s, by) for s in splits(runs)]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
