"""The paper's figure types, drawn from a sweep's fits (:class:`embscale.analysis.fits.Analysis`).

Each ``fig_*`` function writes PNG and PDF into a folder and returns their paths; a figure without data is
skipped, saying why through ``log``:

- ``fig2_loss_vs_ratio_<size>``: loss against ``ratio = total / activated`` for MoE and each NE anchor, per
  split, linear and log x, with the fitted ratio laws (bootstrap band) and the crossover ratios marked
  (those inside the ratios both series cover; the others are in the summary);
- ``fig3_collisions``: hit and collision rates against the table size, from ``<sweep>/collisions.parquet``;
- ``fig4_ngram_nk``: final loss per (N, K);
- ``fig5_norms``: sub-layer output norms against the embedding's at the last evaluation, per amplification,
  and the loss change each amplification brings;
- ``fig6_width_loss_reduction`` / ``fig7_depth_loss_reduction``: matched NE-minus-MoE loss across ratios per
  width / per depth;
- ``fig9_per_layer``: NE against PLE and PLNE at matched size;
- ``pareto_<split>``: loss against total and activated parameters, training FLOPs and ratio, with frontiers;
- ``param_law``: observed against predicted final loss of the parameter-law fits;
- ``loss_curves``: the curves of a readable subset of runs (at most 8 per series), with a ``L(D)`` fit and its
  extrapolation to 4x the budget for one run per series.

Figures use fixed margins rather than a layout engine, so that a 1,000-run sweep plots in seconds (a layout engine
doubles the drawing time).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from embscale.analysis import frontier, laws  # noqa: E402
from embscale.analysis.curves import fit_loss_curve  # noqa: E402
from embscale.analysis.fits import Analysis  # noqa: E402
from embscale.analysis.store import loss_column, usable  # noqa: E402
from embscale.analysis.style import (  # noqa: E402
    FAMILY_COLORS,
    FAMILY_NAMES,
    Log,
    count_axis,
    human,
    is_nan,
    legend,
    ratio_axis,
    save_figure,
    series_color,
    series_label,
    set_title,
    size_label,
    slug,
    split_title,
    subplots,
)

logger = logging.getLogger(__name__)

MAX_CURVES_PER_SERIES = 8
SUBLAYER_ORDER = ("attn0", "attn", "mlp0", "moe", "attn1", "mlp1", "mlp")


def _mean_std(frame: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    return (frame.groupby(by, dropna=False)[column].agg(["mean", "std", "size"]).reset_index()
            .assign(std=lambda d: d["std"].fillna(0.0)))


def _members(runs: pd.DataFrame, keys: list[str], key: tuple) -> pd.DataFrame:
    """Rows of ``runs`` whose ``keys`` equal ``key`` (NaN matching NaN)."""
    mask = np.ones(len(runs), dtype=bool)
    for name, value in zip(keys, key, strict=True):
        column = runs[name]
        mask &= column.isna().to_numpy() if is_nan(value) else (column == value).to_numpy()
    return runs[mask]


# ----------------------------------------------------------------------------------------------------------
# figure 2: loss against ratio

def _series_runs(result: Analysis) -> dict[tuple, pd.DataFrame]:
    """Usable runs grouped into ratio-law series (the same keys and key tuples as the ratio-law fits)."""
    keys = result.ratio_laws.keys
    runs = usable(result.runs)
    if runs.empty or not keys:
        return {}
    out = {}
    for key, group in runs.groupby(keys, dropna=False, sort=True):
        out[_plain_key(key if isinstance(key, tuple) else (key,))] = group
    return out


def _plain_key(key: tuple) -> tuple:
    """A series key with NaN replaced by None: NaN != NaN, so keys from two groupbys would never match."""
    return tuple(None if is_nan(v) else v for v in key)


def _size_of(key: tuple, keys: list[str], size_keys: list[str]) -> tuple:
    return tuple(None if is_nan(key[keys.index(k)]) else key[keys.index(k)] for k in size_keys)


def _size_groups(result: Analysis) -> list[tuple]:
    """Backbone sizes (fingerprint, width, depth) with a MoE ratio law and runs of an embedding family (fitted
    when they span enough ratios, drawn as points otherwise)."""
    keys = result.ratio_laws.keys
    size_keys = [k for k in ("corpus_fingerprint", "width", "depth") if k in keys]
    fam_i = keys.index("family")
    with_moe_law = {_size_of(key, keys, size_keys) for key, _split in result.ratio_laws.fits
                    if key[fam_i] == "moe"}
    with_embedding = {_size_of(key, keys, size_keys) for key in _series_runs(result)
                      if key[fam_i] in frontier.EMBEDDING_FAMILIES}
    return sorted(with_moe_law & with_embedding, key=str)


def loss_vs_ratio_sizes(result: Analysis) -> list[tuple]:
    """The backbone sizes that get a ``fig2_loss_vs_ratio`` figure, in drawing order (``sizes`` of
    :func:`fig_loss_vs_ratio`)."""
    return _size_groups(result) if "family" in result.ratio_laws.keys else []


def fig_loss_vs_ratio(result: Analysis, out_dir: Path, log: Log, sizes: Sequence[tuple] | None = None) -> list[Path]:
    """One figure per backbone size (:func:`loss_vs_ratio_sizes`), or for ``sizes`` of them only."""
    keys = result.ratio_laws.keys
    all_sizes = loss_vs_ratio_sizes(result)
    if not all_sizes:
        log("fig2 skipped: no backbone size has both a MoE ratio law (>= 3 ratios) and embedding-family runs")
        return []
    sizes = all_sizes if sizes is None else [size for size in all_sizes if size in sizes]
    size_keys = [k for k in ("corpus_fingerprint", "width", "depth") if k in keys]
    fam_i = keys.index("family")
    base_i = keys.index("base_ratio") if "base_ratio" in keys else None
    runs = usable(result.runs)
    multi_print = "corpus_fingerprint" in runs and runs["corpus_fingerprint"].nunique() > 1
    grouped = _series_runs(result)
    paths = []
    for size in sizes:
        size_of = dict(zip(size_keys, size, strict=True))
        # every series of this size, with its fits by split where the series spans enough ratios to fit one
        series: dict[tuple, dict[str, laws.LogLinearFit | None]] = {
            key: {} for key in grouped if _size_of(key, keys, size_keys) == size}
        for (key, split), fit in result.ratio_laws.fits.items():
            if _plain_key(key) in series:
                series[_plain_key(key)][split] = fit
        order = sorted(series, key=lambda k: (k[fam_i] != "moe", k[fam_i],
                                              -1 if base_i is None or k[base_i] is None else k[base_i]))
        anchors = sorted({float(k[base_i]) for k in series if base_i is not None and k[base_i] is not None
                          and k[fam_i] == "ne"})
        members = {key: grouped[key] for key in order}
        activated = float(pd.concat(members.values())["activated"].median())
        ratio_lo = min(float(m["ratio"].min()) for m in members.values())
        ratio_hi = max(float(m["ratio"].max()) for m in members.values())
        split_names = [s for s in result.split_names
                       if any(loss_column(s) in m.columns and m[loss_column(s)].notna().any()
                              for m in members.values())]
        fig, axes = subplots(2, len(split_names), (3.3, 2.45), hgap=0.8)
        for col, split in enumerate(split_names):
            crossings = _crossings_for(result, size_of, split)
            drawn = {}
            for key in order:
                group = members[key]
                if loss_column(split) not in group.columns or group[loss_column(split)].isna().all():
                    continue
                by = "target_ratio" if "target_ratio" in group.columns and group["target_ratio"].notna().all() \
                    else "ratio"
                stats = _mean_std(group, [by], loss_column(split))
                x = group.groupby(by)["ratio"].mean().reindex(stats[by]).to_numpy()
                fit = series[key].get(split)
                if fit is None:  # too few ratios for a law: the points, joined
                    drawn[key] = (x, stats, None)
                    continue
                grid = np.geomspace(fit.ratio_min, fit.ratio_max, 40)
                drawn[key] = (x, stats, (grid, fit.predict(grid), *fit.predict_band(grid)))
            for row, log_x in enumerate((False, True)):
                ax = axes[row, col]
                for key, (x, stats, fitted) in drawn.items():
                    base = key[base_i] if base_i is not None else None
                    color = series_color(key[fam_i], base, anchors)
                    label = series_label(key[fam_i], base, None if fitted is not None else "no fit: < 3 ratios")
                    ax.errorbar(x, stats["mean"], yerr=stats["std"], fmt="o", color=color, ms=3.5, capsize=1.5,
                                label=label, zorder=3)
                    if fitted is None:
                        ax.plot(x, stats["mean"], color=color, lw=0.9, ls=":")
                        continue
                    grid, line, band_lo, band_hi = fitted
                    ax.plot(grid, line, color=color, lw=1.2)
                    ax.fill_between(grid, band_lo, band_hi, color=color, alpha=0.13, lw=0)
                for _, cross in crossings.iterrows():
                    if not cross["in_range"]:
                        continue
                    r_star = cross["crossover"]
                    color = series_color(cross.get("family", "ne"), cross.get("base_ratio"), anchors)
                    ax.axvline(r_star, color=color, ls="--", lw=0.9)
                    if row == 0:
                        ci = (f"\n[{cross['ci_lo']:.3g}, {cross['ci_hi']:.3g}]"
                              if np.isfinite(cross["ci_lo"]) and np.isfinite(cross["ci_hi"]) else "")
                        ax.annotate(f"r* = {r_star:.3g}{ci}", xy=(r_star, 0.03), xycoords=("data", "axes fraction"),
                                    xytext=(3, 0), textcoords="offset points", ha="left", va="bottom",
                                    fontsize=6.5, color=color)
                ratio_axis(ax, ratio_lo, ratio_hi, log_x)
                ax.set_xlabel("ratio = total / activated" + (" (log scale)" if log_x else ""))
                if col == 0:
                    ax.set_ylabel("final loss")
                if row == 0:
                    ax.set_title(split_title(split))
        legend(axes[0, 0], loc="best")  # where it covers the fewest points, bars and bands of the panel
        width, depth = size_of.get("width"), size_of.get("depth")
        title = f"Loss against sparsity ratio ({size_label(width, depth, activated)})"
        name = f"fig2_loss_vs_ratio_{slug(width, depth)}"
        if multi_print:
            title += f", corpus {str(size_of.get('corpus_fingerprint'))[:8]}"
            name += f"_{str(size_of.get('corpus_fingerprint'))[:8]}"
        # the title names the dashed lines only when one is drawn (a crossover inside the ratios run)
        crossed = any(bool(_crossings_for(result, size_of, split).get("in_range", pd.Series(dtype=bool)).any())
                      for split in split_names)
        set_title(fig, title + ("; dashed: crossover r* with 95% CI" if crossed else ""))
        paths += save_figure(fig, out_dir, name)
    return paths


def _crossings_for(result: Analysis, size_of: dict, split: str) -> pd.DataFrame:
    cross = result.crossovers
    if cross.empty:
        return cross
    mask = cross["split"] == split
    for name, value in size_of.items():
        mask &= cross[name].isna() if value is None else cross[name] == value
    return cross[mask]


# ----------------------------------------------------------------------------------------------------------
# figure 3: collisions

def fig_collisions(sweep_dir: Path | None, runs: pd.DataFrame, out_dir: Path, log: Log) -> list[Path]:
    path = sweep_dir / "collisions.parquet" if sweep_dir is not None else None
    if path is None or not path.exists():
        log("fig3 skipped: no collisions.parquet in the sweep folder (`embscale collisions` writes it)")
        return []
    table = pd.read_parquet(path)
    needed = {"table_size", "hit_rate", "collision_rate"}
    if not needed <= set(table.columns):
        log(f"fig3 skipped: {path} lacks columns {sorted(needed - set(table.columns))}")
        return []
    for name, default in (("policy", "default"), ("order", 2)):
        if name not in table.columns:
            table[name] = default
    vocab = float(table["vocab_size"].iloc[0]) if "vocab_size" in table.columns else None
    if vocab is None and "vocab_size" in runs.columns and runs["vocab_size"].notna().any():
        vocab = float(runs["vocab_size"].mode().iloc[0])
    table = table.assign(x=table["table_size"] / vocab if vocab else table["table_size"])
    fig, axes = subplots(1, 2, (3.8, 2.6), right=1.3)
    orders = sorted(table["order"].unique())
    cmap = plt.get_cmap("viridis")
    styles = ["-", "--", ":", "-."]
    for p_i, policy in enumerate(sorted(table["policy"].astype(str).unique())):
        for o_i, order in enumerate(orders):
            sub = table[(table["policy"].astype(str) == policy) & (table["order"] == order)].sort_values("x")
            color = cmap(o_i / max(1, len(orders) - 1) * 0.85)
            label = f"{order}-gram, {policy}"
            axes[0, 0].plot(sub["x"], sub["hit_rate"], ls=styles[p_i % 4], color=color, label=label, lw=1.1)
            axes[0, 1].plot(sub["x"], sub["collision_rate"], ls=styles[p_i % 4], color=color, label=label, lw=1.1)
    if vocab:
        lo, hi = table["x"].min(), table["x"].max()
        for m in range(int(math.ceil(lo)), int(math.floor(hi)) + 1):
            axes[0, 1].axvline(m, color="#888888", lw=0.7, ls=":")
    for ax in axes[0]:
        ax.set_xlabel("table size / base vocabulary V0" if vocab else "table size (rows)")
    axes[0, 0].set_ylabel("hit rate")
    axes[0, 1].set_ylabel("collision rate")
    axes[0, 0].set_title("n-gram hit rate")
    axes[0, 1].set_title("collision rate (dotted: integer multiples of V0)" if vocab else "collision rate")
    legend(axes[0, 1], loc="upper left", bbox_to_anchor=(1.02, 1.0))
    set_title(fig, "N-gram embedding table size")
    return save_figure(fig, out_dir, "fig3_collisions")


# ----------------------------------------------------------------------------------------------------------
# figure 4: N by K

def fig_ngram_nk(result: Analysis, out_dir: Path, log: Log) -> list[Path]:
    runs = usable(result.runs)
    if not {"ngram_n", "ngram_k", "target_ratio"} <= set(runs.columns):
        log("fig4 skipped: no n-gram order/count columns")
        return []
    ne = runs[(runs["family"] == "ne") & runs["ngram_n"].notna() & runs["ngram_k"].notna()]
    keys = [k for k in ("corpus_fingerprint", "width", "depth", "target_ratio", "base_ratio", "amplification",
                        "sizing") if k in ne.columns]
    best, best_count = None, 1
    for key, group in ne.groupby(keys, dropna=False):
        count = len(group[["ngram_n", "ngram_k"]].drop_duplicates())
        if count > best_count:
            best, best_count = (key, group), count
    if best is None:
        log("fig4 skipped: no NE configuration was run with more than one (N, K)")
        return []
    key, group = best
    fixed = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
    split_names = [s for s in result.split_names if loss_column(s) in group.columns]
    fig, axes = subplots(1, len(split_names), (2.9, 2.4), bottom=0.75)
    for ax, split in zip(axes[0], split_names, strict=True):
        stats = _mean_std(group, ["ngram_n", "ngram_k"], loss_column(split)).sort_values(["ngram_n", "ngram_k"])
        labels = [f"N{int(n)}-K{int(k)}" for n, k in zip(stats["ngram_n"], stats["ngram_k"], strict=True)]
        xs = np.arange(len(stats))
        means = stats["mean"].to_numpy()
        floor = float(means.min())
        span = max(float(means.max() - floor), 1e-3)
        colors = [FAMILY_COLORS["ne"] if i != int(np.argmin(means)) else "#67001f" for i in range(len(stats))]
        ax.bar(xs, means - (floor - 0.3 * span), bottom=floor - 0.3 * span, color=colors, alpha=0.85,
               yerr=stats["std"], capsize=2, width=0.65)
        ax.set_ylim(floor - 0.3 * span, float((means + stats["std"].to_numpy()).max()) + 0.15 * span)
        ax.set_xticks(xs, labels, rotation=35, ha="right")
        ax.set_title(split_title(split))
        ax.grid(axis="x", visible=False)
    axes[0, 0].set_ylabel("final loss (mean over seeds)")
    activated = float(group["activated"].median()) if "activated" in group else None
    set_title(fig, f"N-gram order N and sub-tables per order K, NE at ratio {float(fixed['target_ratio']):g} "
                f"({size_label(fixed.get('width'), fixed.get('depth'), activated)}); dark: best")
    return save_figure(fig, out_dir, "fig4_ngram_nk")


# ----------------------------------------------------------------------------------------------------------
# figure 5: output norms

def norm_components(columns: Sequence[str], limit: int = 12) -> list[str]:
    """``norm_embedding`` first, then sub-layer norms in layer and execution order, at most ``limit``."""
    # the recorded output norms (LanguageModel.output_norms: norm_layer{i}.{sub-layer}), not the model config's
    # fields that share the prefix (norm_eps)
    norms = [c for c in columns if c.startswith("norm_layer") and "." in c]

    def order(name: str) -> tuple:
        body = name[len("norm_"):]
        layer, _, sub = body.partition(".")
        digits = "".join(ch for ch in layer if ch.isdigit())
        rank = SUBLAYER_ORDER.index(sub) if sub in SUBLAYER_ORDER else len(SUBLAYER_ORDER)
        return (int(digits) if digits else 10**6, rank, body)

    first = ["norm_embedding"] if "norm_embedding" in columns else []
    return first + sorted(norms, key=order)[:limit - len(first)]


def fig_norms(result: Analysis, out_dir: Path, log: Log) -> list[Path]:
    runs = usable(result.runs)
    components = norm_components(list(runs.columns))
    if "norm_embedding" not in components or len(components) < 2:
        log("fig5 skipped: no norm_embedding and sub-layer norm_* columns in the metrics")
        return []
    with_norms = runs[runs["norm_embedding"].notna()]
    if with_norms.empty:
        log("fig5 skipped: no usable run recorded norms")
        return []
    amp = "amplification" if "amplification" in with_norms.columns else None
    variant = with_norms[amp].fillna("none").astype(str) if amp else pd.Series("-", index=with_norms.index)
    with_norms = with_norms.assign(_variant=variant)
    keys = [k for k in ("corpus_fingerprint", "family", "width", "depth", "target_ratio", "base_ratio", "ngram_n",
                        "ngram_k") if k in with_norms.columns]
    # the configuration run with the most amplification variants (then the most runs)
    best, best_rank = None, (-1, -1)
    for key, group in with_norms.groupby(keys, dropna=False):
        rank = (group["_variant"].nunique(), len(group))
        if rank > best_rank:
            best, best_rank = (key, group), rank
    key, group = best
    fixed = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
    variants = sorted(group["_variant"].unique(), key=lambda v: (v != "none", v))
    fig, axes = subplots(1, 2, (5.4, 2.6), bottom=0.95, wgap=0.9, width_ratios=[2.2, 1])
    ax = axes[0, 0]
    width = 0.8 / len(variants)
    xs = np.arange(len(components))
    cmap = plt.get_cmap("tab10")
    for v_i, name in enumerate(variants):
        values = group.loc[group["_variant"] == name, components].mean().to_numpy()
        ax.bar(xs + (v_i - (len(variants) - 1) / 2) * width, values, width, label=f"amplification: {name}",
               color=cmap(v_i))
    ax.set_yscale("log")
    ax.set_xticks(xs, [c[len("norm_"):] for c in components], rotation=40, ha="right")
    ax.set_ylabel("RMS norm of output, last evaluation")
    ax.set_title("embedding output against sub-layer outputs")
    ax.grid(axis="x", visible=False)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 3)  # headroom on the log axis: the legend sits above the bars, not on them
    legend(ax, loc="upper left", ncol=len(variants))
    ax = axes[0, 1]
    split_names = [s for s in result.split_names if loss_column(s) in group.columns]
    if len(variants) > 1:
        reference = "none" if "none" in variants else variants[0]
        others = [v for v in variants if v != reference]
        # one group of bars per loss, one bar per amplification in the left panel's colour for it
        step = 0.8 / max(1, len(others))
        means = group.groupby("_variant")[[loss_column(split) for split in split_names]].mean()
        for o_i, variant in enumerate(others):
            deltas = [means.at[variant, loss_column(split)] - means.at[reference, loss_column(split)]
                      for split in split_names]
            ax.bar(np.arange(len(split_names)) + (o_i - (len(others) - 1) / 2) * step, deltas, step,
                   color=cmap(variants.index(variant)), label=variant)
        ax.axhline(0, color="#444444", lw=0.8)
        ax.set_xticks(np.arange(len(split_names)), [split_title(split) for split in split_names])
        ax.tick_params(axis="x", rotation=20)
        ax.set_ylabel(f"final loss minus loss with '{reference}'")
        ax.set_title("loss change from amplification")
        ax.grid(axis="x", visible=False)
    else:
        for split in split_names:
            ax.bar([split_title(split)], [group[loss_column(split)].mean()])
        ax.set_title(f"final loss ({variants[0]})")
        ax.tick_params(axis="x", rotation=30)
    set_title(fig, f"Output norms: {series_label(fixed.get('family', ''), fixed.get('base_ratio'))} at ratio "
                f"{float(fixed.get('target_ratio', math.nan)):g}, {size_label(fixed.get('width'), fixed.get('depth'))}")
    return save_figure(fig, out_dir, "fig5_norms")


# ----------------------------------------------------------------------------------------------------------
# figures 6 and 7: NE minus matched MoE across width and depth

def fig_reduction(result: Analysis, out_dir: Path, log: Log, by: str) -> list[Path]:
    other = "depth" if by == "width" else "width"
    number = "fig6" if by == "width" else "fig7"
    runs = usable(result.runs)
    if by not in runs.columns or other not in runs.columns:
        log(f"{number} skipped: no {by} column")
        return []
    pairs = frontier.matched_pairs(runs, "train", families=("ne",))
    if pairs.empty:
        log(f"{number} skipped: no NE run has a matched MoE run (same target ratio, width, depth, seed)")
        return []
    counts = pairs.groupby(other, dropna=False)[by].nunique()
    if counts.max() < 2:
        log(f"{number} skipped: the matched NE/MoE pairs cover a single {by} at every {other}")
        return []
    fixed_other = counts.idxmax()
    subset = runs[runs[other] == fixed_other] if not is_nan(fixed_other) else runs[runs[other].isna()]
    split_names = result.split_names
    fig, axes = subplots(1, len(split_names), (3.1, 2.5), sharey=True, wgap=0.35)
    cmap = plt.get_cmap("viridis")
    styles = ["-", "--", ":", "-."]
    lo, hi = math.inf, 0.0
    for ax, split in zip(axes[0], split_names, strict=True):
        table = frontier.loss_reduction(subset, split, by=by)
        if table.empty:
            continue
        values = sorted(table[by].dropna().unique())
        bases = sorted(table["base_ratio"].dropna().unique()) if "base_ratio" in table else []
        for v_i, value in enumerate(values):
            for b_i, base in enumerate(bases or [None]):
                sub = table[table[by] == value]
                if base is not None:
                    sub = sub[sub["base_ratio"] == base]
                if sub.empty:
                    continue
                sub = sub.sort_values("ratio")
                lo, hi = min(lo, float(sub["ratio"].min())), max(hi, float(sub["ratio"].max()))
                color = cmap(v_i / max(1, len(values) - 1) * 0.85)
                act = subset.loc[subset[by] == value, "activated"].median()
                label = f"{by} {value:g} ({human(act)} act.)" + (f", base {base:g}" if len(bases) > 1 else "")
                ax.errorbar(sub["ratio"], sub["delta"], yerr=sub["delta_std"], color=color, ls=styles[b_i % 4],
                            marker="o", ms=3, capsize=1.5, label=label)
        ax.axhline(0.0, color="#444444", lw=0.8)
        ax.set_xlabel("ratio = total / activated")
        ax.set_title(split_title(split))
    for ax in axes[0]:
        ratio_axis(ax, lo, hi, True)
    axes[0, 0].set_ylabel("loss(NE) - loss(matched MoE)")
    legend(axes[0, 0], loc="best")
    set_title(fig, f"NE against parameter-matched MoE across {by} ({other} {float(fixed_other):g}); "
                "below zero: NE better")
    return save_figure(fig, out_dir, f"{number}_{by}_loss_reduction")


# ----------------------------------------------------------------------------------------------------------
# figure 9: NE, PLE, PLNE

def _ratio_for_grouping(candidates: pd.DataFrame, ne: pd.DataFrame, tolerance: float = 0.02) -> pd.Series:
    """Each run's target ratio; a run planned without one (PLE: its size is fixed by the model) takes the target
    ratio of the NE run of the same backbone whose total is nearest, within ``tolerance``, so that it is drawn
    beside the NE it was sized against (else its own ratio)."""
    ratios = candidates["target_ratio"].astype(float) if "target_ratio" in candidates else \
        pd.Series(math.nan, index=candidates.index)
    backbone = [k for k in ("corpus_fingerprint", "width", "depth") if k in candidates.columns]
    out = ratios.copy()
    for index, row in candidates[ratios.isna()].iterrows():
        twins = ne
        for name in backbone:
            twins = twins[twins[name] == row[name]]
        twins = twins[twins["target_ratio"].notna()]
        if len(twins):
            error = (twins["total"].astype(float) / float(row["total"]) - 1).abs()
            if float(error.min()) <= tolerance:
                out[index] = float(twins.loc[error.idxmin(), "target_ratio"])
                continue
        out[index] = round(float(row["ratio"]), 2)
    return out


def fig_per_layer(result: Analysis, out_dir: Path, log: Log) -> list[Path]:
    runs = usable(result.runs)
    emb = runs[runs["family"].isin(["ne", "ple", "plne"])]
    if not ({"ple", "plne"} & set(emb["family"])) or emb["family"].nunique() < 2:
        log("fig9 skipped: the sweep does not hold NE together with PLE or PLNE runs")
        return []
    ne = frontier.dominant_variant(emb[emb["family"] == "ne"])
    candidates = pd.concat([ne, emb[emb["family"] != "ne"], runs[runs["family"] == "moe"]])
    candidates = candidates.assign(target_ratio=_ratio_for_grouping(candidates, ne))
    keys = [k for k in ("corpus_fingerprint", "width", "depth", "target_ratio") if k in candidates.columns]
    configs = []
    for key, group in candidates.groupby(keys, dropna=False):
        if len(set(group["family"]) & {"ne", "ple", "plne"}) >= 2:
            configs.append((dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True)), group))
    if not configs:
        log("fig9 skipped: no configuration (width, depth, ratio) holds two of NE, PLE, PLNE")
        return []
    configs = configs[:6]
    split_names = result.split_names
    families = [f for f in ("moe", "ne", "ple", "plne") if any(f in set(g["family"]) for _, g in configs)]
    fig, axes = subplots(1, len(split_names), (max(2.4, 1.0 + 0.9 * len(configs)), 2.5), bottom=0.7)
    step = 0.8 / len(families)
    for ax, split in zip(axes[0], split_names, strict=True):
        ymin, ymax = math.inf, -math.inf
        labelled: set[str] = set()
        for c_i, (_fixed, group) in enumerate(configs):
            for f_i, family in enumerate(families):
                sub = group[group["family"] == family]
                if sub.empty:
                    continue
                mean, std = sub[loss_column(split)].mean(), sub[loss_column(split)].std()
                x = c_i + (f_i - (len(families) - 1) / 2) * step
                ax.errorbar([x], [mean], yerr=[0.0 if is_nan(std) else std], fmt="s", ms=5, capsize=2,
                            color=FAMILY_COLORS[family], label=None if family in labelled else FAMILY_NAMES[family])
                labelled.add(family)
                spread = 0.0 if is_nan(std) else std
                # above the error bar's cap, so that the label does not sit on the bar
                ax.annotate(human(float(sub["total"].median())), (x, mean + spread), textcoords="offset points",
                            xytext=(0, 4), ha="center", va="bottom", fontsize=6)
                ymin, ymax = min(ymin, mean - spread), max(ymax, mean + spread)
        ax.set_xticks(range(len(configs)), [
            f"w{float(f.get('width', math.nan)):g} d{float(f.get('depth', math.nan)):g}\n"
            f"ratio {float(f['target_ratio']):g}" for f, _ in configs])
        pad = max(ymax - ymin, 1e-3) * 0.15
        ax.set_ylim(ymin - pad, ymax + 2 * pad)
        ax.set_xlim(-0.6, len(configs) - 0.4)
        ax.set_title(split_title(split))
        ax.grid(axis="x", visible=False)
    axes[0, 0].set_ylabel("final loss")
    legend(axes[0, 0], loc="best")
    set_title(fig, "NE against Per-Layer Embedding (PLE) and Per-Layer NE (PLNE); labels: total parameters")
    return save_figure(fig, out_dir, "fig9_per_layer")


# ----------------------------------------------------------------------------------------------------------
# Pareto frontiers

AXIS_LABELS = {"total": "total parameters", "activated": "activated parameters",
               "flops": "training FLOPs", "ratio": "ratio = total / activated"}


def fig_pareto(result: Analysis, out_dir: Path, log: Log) -> list[Path]:
    runs = usable(result.runs)
    axes_present = [a for a in frontier.COST_AXES if a in runs.columns and runs[a].notna().any()]
    if runs.empty or not axes_present:
        log("pareto skipped: no usable runs with costs")
        return []
    families = [f for f in FAMILY_COLORS if f in set(runs["family"])] + sorted(
        set(runs["family"].dropna()) - set(FAMILY_COLORS))
    paths = []
    for split in result.split_names:
        column = loss_column(split)
        fig, axes = subplots(1, len(axes_present), (2.7, 2.4), sharey=True, wgap=0.3)
        table = frontier.frontiers(runs, split, axes_present, by="family")
        for ax, axis in zip(axes[0], axes_present, strict=True):
            for family in families:
                color = FAMILY_COLORS.get(family, "#333333")
                sub = runs[runs["family"] == family]
                ax.scatter(sub[axis], sub[column], s=6, color=color, alpha=0.3, lw=0, rasterized=True)
                front = table[(table["axis"] == axis) & (table["group"] == family)]
                if len(front):
                    ax.step(front["cost"], front["loss"], where="post", color=color, lw=1.3,
                            label=FAMILY_NAMES.get(family, family))
                    ax.plot(front["cost"], front["loss"], "o", color=color, ms=3)
            if axis == "ratio":
                ratio_axis(ax, float(runs["ratio"].min()), float(runs["ratio"].max()), True)
            else:
                count_axis(ax, "x", "flops" if axis == "flops" else "params")
            ax.set_xlabel(AXIS_LABELS[axis])
        axes[0, 0].set_ylabel(f"final {split_title(split)}")
        legend(axes[0, -1], loc="upper right")
        set_title(fig, f"Pareto frontiers of the {split_title(split)}: points are runs, lines the frontier per family")
        paths += save_figure(fig, out_dir, f"pareto_{split}")
    return paths


# ----------------------------------------------------------------------------------------------------------
# parameter-law parity

def fig_param_law(result: Analysis, out_dir: Path, log: Log) -> list[Path]:
    fits = result.param_laws.fits
    if not fits:
        log("param_law skipped: no group has enough activated and total sizes for the parameter law")
        return []
    keys = result.param_laws.keys
    runs = usable(result.runs)
    split_names = [s for s in result.split_names if any(split == s for _, split in fits)]
    fig, axes = subplots(1, len(split_names), (2.9, 2.9), wgap=0.8)
    fam_i = keys.index("family")
    base_i = keys.index("base_ratio") if "base_ratio" in keys else None
    anchors = sorted({float(k[base_i]) for k, _ in fits if base_i is not None and not is_nan(k[base_i])})
    bounded = False
    for ax, split in zip(axes[0], split_names, strict=True):
        lo, hi = math.inf, -math.inf
        for (key, s), fit in fits.items():
            if s != split:
                continue
            members = _members(runs, keys, key)
            members = members[np.isfinite(members[loss_column(split)])]
            pred = fit.predict(members["activated"].to_numpy(), members["total"].to_numpy())
            obs = members[loss_column(split)].to_numpy()
            base = key[base_i] if base_i is not None else None
            marks = ["*" if fit.exponent_at_bound(i) else "" for i in range(2)]
            bounded = bounded or any(marks)
            label = (f"{series_label(key[fam_i], base)}: a_act {fit.alpha[0]:.2f}{marks[0]}, "
                     f"a_tot {fit.alpha[1]:.2f}{marks[1]}")
            ax.scatter(pred, obs, s=7, color=series_color(key[fam_i], base, anchors), label=label, alpha=0.6,
                       lw=0, rasterized=True)
            lo, hi = min(lo, pred.min(), obs.min()), max(hi, pred.max(), obs.max())
        ax.plot([lo, hi], [lo, hi], color="#444444", lw=0.8)
        ax.set_xlabel("predicted final loss")
        ax.set_title(split_title(split))
        legend(ax, loc="best")
    axes[0, 0].set_ylabel("observed final loss")
    set_title(fig, "Parameter law L = E + A/N_act^a_act + B/N_tot^a_tot (Huber in log space, L-BFGS-B)"
              + (f"; *: exponent on its bound (0 or {laws.MAX_EXPONENT:g}), not determined by these runs"
                 if bounded else ""))
    return save_figure(fig, out_dir, "param_law")


# ----------------------------------------------------------------------------------------------------------
# loss curves of a readable subset of runs

def pick_curve_runs(runs: pd.DataFrame, per_series: int = MAX_CURVES_PER_SERIES) -> dict[str, list[str]]:
    """Up to ``per_series`` usable runs per series (family and NE anchor), spanning its ratios, from its most
    common width, depth, seed and n-gram variant. Keys are series labels; runs are in ratio order."""
    data = usable(runs)
    out: dict[str, list[str]] = {}
    keys = [k for k in ("family", "base_ratio") if k in data.columns]
    for key, group in data.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        family = str(key[0])
        for name in ("width", "depth", "seed"):
            if name in group.columns and group[name].notna().any():
                group = group[group[name] == group[name].mode().iloc[0]]
        if family != "moe":
            group = frontier.dominant_variant(group)
        group = group.sort_values(["ratio", "run_id"]).drop_duplicates("target_ratio")
        if len(group) > per_series:
            take = np.unique(np.linspace(0, len(group) - 1, per_series).round().astype(int))
            group = group.iloc[take]
        out[series_label(family, key[1] if len(key) > 1 else None)] = group["run_id"].tolist()
    order = {name: i for i, name in enumerate(FAMILY_NAMES.values())}
    return dict(sorted(out.items(), key=lambda item: (order.get(item[0].split(" ")[0], 99), item[0])))


def fig_loss_curves(result: Analysis, curves: pd.DataFrame, out_dir: Path, log: Log) -> list[Path]:
    if curves is None or curves.empty:
        log("loss_curves skipped: no curves (no run has metrics)")
        return []
    runs = usable(result.runs)
    chosen = pick_curve_runs(runs)
    if not chosen:
        log("loss_curves skipped: no usable runs")
        return []
    val = [s for s in result.split_names if s != "train"]
    split = val[0] if val else "train"
    column = f"{split}_loss" if split != "train" else "train_loss"
    if column not in curves.columns:
        column, split = "train_loss", "train"
    wanted = {r for ids in chosen.values() for r in ids}
    sub = curves[curves["run_id"].isin(wanted)]
    if "sweep" in curves.columns and "sweep" in runs.columns:
        sweep_of = runs.drop_duplicates("run_id").set_index("run_id")["sweep"]
        sub = sub[sub["sweep"].to_numpy() == sub["run_id"].map(sweep_of).to_numpy()]
    by_run = {rid: g for rid, g in sub.groupby("run_id", sort=False)}
    ratio_of = runs.drop_duplicates("run_id").set_index("run_id")["ratio"]
    target_of = (runs.drop_duplicates("run_id").set_index("run_id")["target_ratio"]
                 if "target_ratio" in runs.columns else ratio_of)
    series = list(chosen)
    ncols = min(len(series), 5)
    nrows = int(math.ceil(len(series) / ncols))
    fig, axes = subplots(nrows, ncols, (2.8, 2.4), sharey=True, wgap=0.3, hgap=0.8)
    cmap = plt.get_cmap("viridis")
    ratios = [r for ids in chosen.values() for r in ratio_of.reindex(ids).to_numpy() if r > 0]
    r_lo, r_hi = (math.log(min(ratios)), math.log(max(ratios))) if ratios else (0.0, 1.0)
    r_hi = max(r_hi, r_lo + 1e-9)
    for index, label in enumerate(series):
        ax = axes[index // ncols, index % ncols]
        ids = chosen[label]
        for run_id in ids:
            group = by_run.get(run_id)
            if group is None:
                continue
            ratio = float(ratio_of.get(run_id, math.nan))
            color = cmap((math.log(ratio) - r_lo) / (r_hi - r_lo) * 0.9) if ratio > 0 else "#333333"
            target = float(target_of.get(run_id, math.nan))
            ax.plot(group["tokens"], group[column], color=color, lw=1.0,
                    label=f"ratio {target if np.isfinite(target) else ratio:.3g}")
        if ids and ids[-1] in by_run:  # the data law and its extrapolation, for the largest-ratio run
            group = by_run[ids[-1]]
            try:
                fit = fit_loss_curve(group["tokens"].to_numpy(), group[column].to_numpy())
            except ValueError as exc:
                log(f"loss_curves: no L(D) fit for {ids[-1]}: {exc}")
            else:
                grid = np.geomspace(fit.tokens_min, 4 * fit.tokens_max, 50)
                mean, lo, hi = fit.extrapolate(grid)
                ax.plot(grid, mean, color="black", ls="--", lw=0.9,
                        label=f"fit {fit.E:.3g} + A D^-{fit.alpha:.2f}")
                ax.fill_between(grid, lo, hi, color="black", alpha=0.12, lw=0)
                ax.annotate(f"4x tokens: {mean[-1]:.3f}\n[{lo[-1]:.3f}, {hi[-1]:.3f}]", xy=(0.97, 0.97),
                            xycoords="axes fraction", ha="right", va="top", fontsize=6.5)
        count_axis(ax, "x", "params")
        ax.set_xlabel("training tokens")
        ax.set_title(f"{label} ({len(ids)} run{'' if len(ids) == 1 else 's'})")
        legend(ax, loc="lower left", fontsize=6)
    for index in range(len(series), nrows * ncols):
        axes[index // ncols, index % ncols].set_visible(False)
    for row in range(nrows):
        axes[row, 0].set_ylabel(split_title(split))
    finite = sub[column][np.isfinite(sub[column])] if column in sub else pd.Series(dtype=float)
    if len(finite):
        low, high = np.nanpercentile(finite, [0.5, 95])
        axes[0, 0].set_ylim(low - 0.05 * (high - low), high)
    set_title(fig, f"Loss curves, one size and seed per series: {split_title(split)}; dashed: L(D) fit, 95% band")
    return save_figure(fig, out_dir, "loss_curves")
