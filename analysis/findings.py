"""The paper's findings, checked against the reproduction sweeps' results: one row per claim, with seed intervals.

Each finding of ``../shared/paper/BRIEF.md`` section 2 is measured as one or more **contrasts**: a loss difference
between two arms that differ only in what the claim is about (NE against the MoE of the same total, one N/K
against another, one amplification against none), taken seed by seed, since both arms of a seed share its
initialisation stream and data order. Where a claim is about how such a difference changes (with width, depth,
or the base ratio), the contrast is the difference of two differences, again seed by seed.

**Intervals.** With two seeds a contrast's interval is the range of its per-seed differences; with three or more
it is the 95% Student-t interval of their mean. A contrast is *resolved* when its interval excludes zero, and then
has a sign; a contrast with one seed left (the other's run failed) has no interval and is never resolved.

**Verdicts** (fixed before any result was seen, and the same for every finding): a finding *agrees* on a metric
when each of its contrasts is resolved in the direction the paper reports, *disagrees* when each is resolved the
other way, and is *inconclusive* otherwise (within seed noise, or its contrasts disagree with each other). The
metrics are the training loss and every validation split; the row's verdict is the one every metric gives, else
``inconclusive`` (the per-metric verdicts are listed). Magnitudes (the paper's "about -0.02") are reported, not
judged: they depend on the scale. A finding whose runs are missing is ``not measured``.

:func:`reproduction_findings` reads the sweeps (``results/<sweep>``, named as in
``sweeps/reproduction/*.yaml``) and returns the findings; :func:`render_markdown` writes them as the table of
``REPRODUCTION.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from embscale.analysis.store import load, loss_column, splits, usable
from embscale.analysis.style import human

AGREE, DISAGREE, INCONCLUSIVE, NOT_MEASURED = "agree", "disagree", "inconclusive", "not measured"

#: the sweep each finding reads (``name:`` of its file in ``sweeps/reproduction/``)
SWEEPS = {
    "fig2": "repro_fig2_ladder",
    "fig4": "repro_fig4_nk",
    "fig5": "repro_fig5_amplification",
    "fig67": "repro_fig67_width_depth",
    "fig9": "repro_fig9_per_layer",
}

#: the paper's scale for each figure (BRIEF section 2): activated parameters, tokens per run
PAPER_SCALE = {
    "fig2": ("280M", "300B"),
    "fig4": ("790M", "300B"),
    "fig5": ("280M-1.3B", "300B"),
    "fig67": ("280M and 1.3B", "300B"),
    "fig9": ("790M", "300B"),
}


# ----------------------------------------------------------------------------------------------------------
# intervals and contrasts

@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its interval: the range for two seeds, the 95% t-interval for more."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def bounds(self) -> tuple[float, float]:
        if self.n == 0:
            return math.nan, math.nan
        if self.n <= 2:
            return float(min(self.values)), float(max(self.values))
        half = stats.t.ppf(0.975, self.n - 1) * float(np.std(self.values, ddof=1)) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def kind(self) -> str:
        return "one seed" if self.n == 1 else "range" if self.n == 2 else "95% t"

    @property
    def sign(self) -> int:
        """+1 or -1 when the interval excludes zero, else 0 (always 0 for fewer than two seeds: one seed has no
        interval, so it can never settle a claim)."""
        low, high = self.bounds
        if self.n < 2 or not (math.isfinite(low) and math.isfinite(high)):
            return 0
        return 1 if low > 0 else -1 if high < 0 else 0

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:+.{digits}f} (one seed)"
        low, high = self.bounds
        return f"{self.mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


@dataclass(frozen=True)
class Contrast:
    """One difference of the claim, per metric: ``label`` says what minus what; ``expected`` the sign the paper
    reports (+1: the first arm's loss is higher, -1: lower)."""

    label: str
    expected: int
    by_metric: dict[str, Interval]


@dataclass(frozen=True)
class Finding:
    key: str
    figure: str
    claim: str
    sweep: str
    contrasts: tuple[Contrast, ...] = ()
    scale: str = ""
    paper_scale: str = ""
    notes: tuple[str, ...] = ()
    verdict_override: str | None = None  # findings judged on something other than loss contrasts
    measured_override: str | None = None
    metric_verdicts: dict[str, str] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.verdict_override is not None:
            return self.verdict_override
        return combined(self.per_metric()) if self.contrasts else NOT_MEASURED

    def per_metric(self) -> dict[str, str]:
        if self.metric_verdicts:
            return dict(self.metric_verdicts)
        metrics = [m for m in self.contrasts[0].by_metric] if self.contrasts else []
        out = {}
        for metric in metrics:
            signs = [c.by_metric[metric].sign * c.expected for c in self.contrasts]
            out[metric] = AGREE if all(s == 1 for s in signs) else DISAGREE if all(s == -1 for s in signs) \
                else INCONCLUSIVE
        return out

    def measured(self) -> str:
        if self.measured_override is not None:
            return self.measured_override
        lines = []
        for contrast in self.contrasts:
            parts = [f"{_metric_name(m)} {iv.text()}" for m, iv in contrast.by_metric.items()]
            lines.append(f"{contrast.label}: " + "; ".join(parts))
        return "<br>".join(lines) if lines else "-"


def combined(per_metric: dict[str, str]) -> str:
    """The row's verdict from its per-metric ones: the one they all give, else inconclusive (none: not measured)."""
    verdicts = set(per_metric.values())
    if not verdicts:
        return NOT_MEASURED
    return verdicts.pop() if len(verdicts) == 1 else INCONCLUSIVE


def _metric_name(split: str) -> str:
    return split if split == "train" else split.removeprefix("val_")


def seed_differences(first: pd.DataFrame, second: pd.DataFrame, metric: str) -> tuple[float, ...]:
    """``first - second`` of ``metric`` (a split), seed by seed over the seeds both hold (one run per seed each;
    a seed with several runs in an arm is averaged)."""
    column = loss_column(metric)
    if column not in first.columns or column not in second.columns:
        return ()
    a = first.groupby("seed")[column].mean()
    b = second.groupby("seed")[column].mean()
    common = sorted(set(a.dropna().index) & set(b.dropna().index))
    return tuple(float(a[s] - b[s]) for s in common)


def contrast(label: str, expected: int, metrics: Sequence[str],
             difference: Callable[[str], tuple[float, ...]]) -> Contrast:
    return Contrast(label, expected, {m: Interval(difference(m)) for m in metrics})


def _combine(first: tuple[float, ...], second: tuple[float, ...]) -> tuple[float, ...]:
    """Two per-seed difference tuples of the same seeds, subtracted (a difference in differences)."""
    return tuple(a - b for a, b in zip(first, second, strict=False)) if len(first) == len(second) else ()


# ----------------------------------------------------------------------------------------------------------
# selecting arms

def _close(values: pd.Series, target: float, tolerance: float = 0.05) -> pd.Series:
    return (values.astype(float) / target - 1).abs() <= tolerance


def _moe_at(runs: pd.DataFrame, ratio: float, **match: object) -> pd.DataFrame:
    moe = runs[runs["family"] == "moe"]
    moe = moe[_close(moe["target_ratio"], ratio)]
    for name, value in match.items():
        moe = moe[moe[name] == value]
    return moe


def _matched_moe(runs: pd.DataFrame, arm: pd.DataFrame) -> pd.DataFrame:
    """The parameter-equivalent MoE runs of ``arm`` (its ``pair_run_id``), found in ``runs``."""
    if "pair_run_id" not in arm.columns:
        return runs.iloc[0:0]
    return runs[runs["run_id"].isin(set(arm["pair_run_id"].dropna()))]


def _embedding_arm(runs: pd.DataFrame, family: str, ratio: float, **match: object) -> pd.DataFrame:
    arm = runs[runs["family"] == family]
    arm = arm[_close(arm["target_ratio"], ratio)]
    for name, value in match.items():
        arm = arm[arm[name] == value]
    return arm


def _sweep_of(runs: pd.DataFrame, key: str) -> str:
    if "sweep" in runs.columns and runs["sweep"].nunique() == 1:
        return str(runs["sweep"].iloc[0])
    return SWEEPS[key]


def _scale(runs: pd.DataFrame) -> str:
    if runs.empty:
        return ""
    activated = sorted({float(a) for a in runs["activated"].dropna()})
    tokens = sorted({float(t) for t in runs["tokens"].dropna()})
    low, high = activated[0], activated[-1]
    size = human(low) if high / low < 1.1 else f"{human(low)}-{human(high)}"
    budget = "/".join(human(t) for t in tokens)
    seeds = runs["seed"].nunique()
    return f"{size} activated, {budget} tokens, {seeds} seed(s)"


# ----------------------------------------------------------------------------------------------------------
# the findings

def fig2_findings(runs: pd.DataFrame, metrics: list[str]) -> list[Finding]:
    paper = PAPER_SCALE["fig2"]
    common = {"figure": "Fig. 2", "sweep": _sweep_of(runs, "fig2"), "scale": _scale(runs),
              "paper_scale": " activated, ".join(paper) + " tokens"}
    moe = runs[runs["family"] == "moe"]
    # MoE loss log-linear in the ratio: the slope of loss on ln(ratio), per seed, and the fit's R^2
    slopes: dict[str, Interval] = {}
    r2: dict[str, float] = {}
    for metric in metrics:
        column = loss_column(metric)
        per_seed = []
        for _, group in moe.groupby("seed"):
            group = group.dropna(subset=[column])
            if group["ratio"].nunique() >= 3:
                per_seed.append(float(np.polyfit(np.log(group["ratio"].astype(float)), group[column], 1)[0]))
        slopes[metric] = Interval(tuple(per_seed))
        mean = moe.groupby("target_ratio")[[column, "ratio"]].mean().dropna()
        if len(mean) >= 3:
            r2[metric] = float(stats.linregress(np.log(mean["ratio"]), mean[column]).rvalue ** 2)
    verdicts = {}
    for metric, slope in slopes.items():
        if slope.n == 0:
            continue
        fit = r2.get(metric, math.nan)
        if slope.sign == -1 and fit >= 0.9:
            verdicts[metric] = AGREE
        elif slope.sign == 1 or (slope.sign == -1 and fit < 0.5):  # rises, or falls but not along a line
            verdicts[metric] = DISAGREE
        else:
            verdicts[metric] = INCONCLUSIVE
    ratios = sorted({float(r) for r in moe["target_ratio"].dropna()})
    measured = (f"slope of loss on ln(ratio) over MoE ratios {', '.join(f'{r:g}' for r in ratios)}: "
                + "; ".join(f"{_metric_name(m)} {s.text()} (R² {r2.get(m, math.nan):.3f})"
                            for m, s in slopes.items()))
    log_linear = Finding(
        "fig2_log_linear", claim="MoE loss is log-linear in the ratio (falls as a straight line in ln ratio)",
        contrasts=(), verdict_override=combined(verdicts),
        measured_override=measured if verdicts else None, metric_verdicts=verdicts,
        notes=("agree: the slope is negative in every seed and the seed-mean losses fit a line in ln ratio with "
               "R² >= 0.9; disagree: the slope is positive in every seed, or negative in every seed with R² < 0.5 "
               "(the loss falls, but not along a line); otherwise inconclusive",), **common)

    ne = runs[runs["family"] == "ne"]
    low_base = sorted({float(r) for r in ne[ne["base_ratio"] == ne["base_ratio"].min()]["target_ratio"]}) \
        if len(ne) else []
    high_base = sorted({float(r) for r in ne[ne["base_ratio"] == ne["base_ratio"].max()]["target_ratio"]}) \
        if len(ne) else []
    base_low = float(ne["base_ratio"].min()) if len(ne) else math.nan
    base_high = float(ne["base_ratio"].max()) if len(ne) else math.nan

    def ne_minus_moe(base: float, ratio: float) -> Callable[[str], tuple[float, ...]]:
        arm = _embedding_arm(ne[ne["base_ratio"] == base], "ne", ratio)
        return lambda m: seed_differences(arm, _matched_moe(runs, arm), m)

    low = Finding("fig2_low_base", claim="NE added at a low base ratio never beats adding experts"
                  + (f" (here base {base_low:g})" if len(ne) else ""), contrasts=tuple(
                      contrast(f"NE - MoE at ratio {r:g}", +1, metrics, ne_minus_moe(base_low, r)) for r in low_base),
                  **common)
    doubled = 2 * base_high
    high_contrasts = [contrast(f"NE - MoE at ratio {doubled:g}", -1, metrics, ne_minus_moe(base_high, doubled))] \
        if doubled in high_base else []
    high = Finding("fig2_high_base", claim="NE added at a high base ratio beats the MoE of the same total once the "
                   "total is about twice the base (paper: base 12 crosses slightly above 20"
                   + (f"; here base {base_high:g} at {doubled:g})" if len(ne) else ")"),
                   contrasts=tuple(high_contrasts),
                   notes=tuple(f"NE - MoE at ratio {r:g} (base {base_high:g}), not judged: "
                               + "; ".join(f"{_metric_name(m)} {Interval(ne_minus_moe(base_high, r)(m)).text()}"
                                           for m in metrics) for r in high_base if r != doubled), **common)
    share = 2 * base_low
    did = []
    if share in low_base and doubled in high_base:
        did.append(contrast(f"(NE - MoE at {doubled:g}, base {base_high:g}) - (NE - MoE at {share:g}, base "
                            f"{base_low:g})", -1, metrics,
                            lambda m: _combine(ne_minus_moe(base_high, doubled)(m), ne_minus_moe(base_low, share)(m))))
    order = Finding("fig2_sweet_spot", claim="NE pays off more when added after the expert sweet spot: at the same "
                    "NE share (50%), NE gains more over the MoE from a high base ratio than from a low one",
                    contrasts=tuple(did), **common)
    return [log_linear, low, high, order]


def fig4_findings(runs: pd.DataFrame, metrics: list[str]) -> list[Finding]:
    common = {"figure": "Fig. 4", "sweep": _sweep_of(runs, "fig4"), "scale": _scale(runs),
              "paper_scale": " activated, ".join(PAPER_SCALE["fig4"]) + " tokens"}
    ne = runs[runs["family"] == "ne"]
    configs = {(int(n), int(k)): group for (n, k), group in ne.groupby(["ngram_n", "ngram_k"])}
    worst = configs.get((2, 1))
    large = {nk: g for nk, g in configs.items() if nk[0] >= 3 and nk[1] >= 2}
    worse = Finding("fig4_n2k1", claim="N=2, K=1 is clearly worse than the other N/K", contrasts=tuple(
        contrast(f"N2-K1 - N{n}-K{k}", +1, metrics, lambda m, g=g: seed_differences(worst, g, m))
        for (n, k), g in sorted(configs.items()) if (n, k) != (2, 1)) if worst is not None else (), **common)

    def spread_minus_gap(metric: str) -> tuple[float, ...]:
        column = loss_column(metric)
        table = pd.DataFrame({nk: g.groupby("seed")[column].mean() for nk, g in large.items()}).dropna()
        if worst is None or table.empty:
            return ()
        base = worst.groupby("seed")[column].mean()
        seeds = [s for s in table.index if s in base.index]
        return tuple(float((table.loc[s].max() - table.loc[s].min()) - (base[s] - table.loc[s].mean()))
                     for s in seeds)

    names = ", ".join(f"N{n}-K{k}" for n, k in sorted(large))
    small = Finding("fig4_small_differences", claim="For N >= 3 and K >= 2 the differences are small (N = 3-5 near "
                    "optimal)", contrasts=(contrast(f"spread among {names} - (N2-K1 minus their mean)", -1, metrics,
                                                    spread_minus_gap),) if len(large) >= 2 else (),
                    notes=(_best_configs(large, metrics),) if large else (), **common)
    return [worse, small]


def _best_configs(configs: dict[tuple[int, int], pd.DataFrame], metrics: list[str]) -> str:
    parts = []
    for metric in metrics:
        column = loss_column(metric)
        means = {nk: float(g[column].mean()) for nk, g in configs.items() if column in g}
        if means:
            ranked = sorted(means, key=means.get)
            parts.append(f"{_metric_name(metric)}: " + " < ".join(f"N{n}-K{k} {means[(n, k)]:.3f}"
                                                                   for n, k in ranked))
    return "seed-mean losses, best first: " + "; ".join(parts)


def fig5_findings(runs: pd.DataFrame, metrics: list[str]) -> list[Finding]:
    common = {"figure": "Fig. 5", "sweep": _sweep_of(runs, "fig5"), "scale": _scale(runs),
              "paper_scale": " activated, ".join(PAPER_SCALE["fig5"]) + " tokens"}
    ne = runs[runs["family"] == "ne"]
    arms = {a: g for a, g in ne.groupby("amplification")}
    none = arms.get("none")
    fixes = [a for a in ("sqrt_d", "layernorm") if a in arms]
    amplification = Finding(
        "fig5_amplification", claim="Multiplying the NE output by sqrt(D), or a LayerNorm on it, lowers the training "
        "and both validation losses (paper: about -0.02)", contrasts=tuple(
            contrast(f"{a} - none", -1, metrics, lambda m, a=a: seed_differences(arms[a], none, m))
            for a in fixes) if none is not None else (), **common)

    ratios = {}
    for name, group in arms.items():
        if {"norm_layer0.attn0", "norm_embedding"} <= set(group.columns):
            per_seed = (group.groupby("seed")["norm_layer0.attn0"].mean()
                        / group.groupby("seed")["norm_embedding"].mean()).dropna()
            ratios[name] = Interval(tuple(float(v) for v in per_seed))
    plain = ratios.get("none")
    if plain is None or plain.n == 0:
        verdict, measured = NOT_MEASURED, None
    else:
        low, high = plain.bounds
        verdict = INCONCLUSIVE if plain.n < 2 else AGREE if low >= 10 ** 0.5 and high <= 10 ** 1.5 else \
            DISAGREE if high < 10 ** 0.5 or low > 10 ** 1.5 else INCONCLUSIVE
        measured = "first attention output RMS / embedding output RMS at the last evaluation: " + "; ".join(
            f"{name} {iv.mean:.2f} [{iv.bounds[0]:.2f}, {iv.bounds[1]:.2f}]" for name, iv in ratios.items())
    norms = Finding("fig5_norms", claim="Without amplification the first attention output's norm is about 10x the "
                    "embedding's", verdict_override=verdict, measured_override=measured,
                    notes=("agree: the ratio (amplification none) lies within half a decade of 10 (3.2-32) in every "
                           "seed; disagree: entirely outside it",), **common)
    return [norms, amplification]


def fig67_findings(runs: pd.DataFrame, metrics: list[str]) -> list[Finding]:
    common = {"sweep": _sweep_of(runs, "fig67"), "scale": _scale(runs),
              "paper_scale": " activated, ".join(PAPER_SCALE["fig67"]) + " tokens"}
    ne = runs[runs["family"] == "ne"]
    ratios = sorted({float(r) for r in ne["target_ratio"].dropna()})

    def gap(width: int, depth: int, ratio: float) -> Callable[[str], tuple[float, ...]]:
        arm = _embedding_arm(ne, "ne", ratio, width=width, depth=depth)
        return lambda m: seed_differences(arm, _matched_moe(runs, arm), m)

    sizes = sorted({(int(w), int(d)) for w, d in ne[["width", "depth"]].itertuples(index=False)})
    widths = sorted({w for w, d in sizes if d == min(d for _, d in sizes)}) if sizes else []
    depths = sorted({d for w, d in sizes if w == max(w for w, _ in sizes)}) if sizes else []
    width_contrasts, depth_contrasts = [], []
    if len(widths) >= 2:
        narrow, wide, depth = widths[0], widths[-1], min(d for _, d in sizes)
        width_contrasts = [contrast(f"(NE - MoE, width {wide}) - (NE - MoE, width {narrow}) at ratio {r:g}", -1,
                                    metrics, lambda m, r=r: _combine(gap(wide, depth, r)(m), gap(narrow, depth, r)(m)))
                           for r in ratios]
    if len(depths) >= 2:
        shallow, deep, width = depths[0], depths[-1], max(w for w, _ in sizes)
        depth_contrasts = [contrast(f"(NE - MoE, depth {deep}) - (NE - MoE, depth {shallow}) at ratio {r:g}", +1,
                                    metrics, lambda m, r=r: _combine(gap(width, deep, r)(m), gap(width, shallow, r)(m)))
                           for r in ratios]
    gaps = []
    for w, d in sizes:
        for r in ratios:
            gaps.append(f"NE - MoE at width {w}, depth {d}, ratio {r:g}: " + "; ".join(
                f"{_metric_name(m)} {Interval(gap(w, d, r)(m)).text()}" for m in metrics))
    return [Finding("fig6_width", figure="Fig. 6", claim="Wider models keep the NE advantage to higher ratios "
                    "(NE gains more over the MoE when wider)", contrasts=tuple(width_contrasts), notes=tuple(gaps),
                    **common),
            Finding("fig7_depth", figure="Fig. 7", claim="Deeper models lose the NE advantage (paper: past 20 "
                    "layers)", contrasts=tuple(depth_contrasts), **common)]


def fig9_findings(runs: pd.DataFrame, metrics: list[str]) -> list[Finding]:
    common = {"figure": "Fig. 9", "sweep": _sweep_of(runs, "fig9"), "scale": _scale(runs),
              "paper_scale": " activated, ".join(PAPER_SCALE["fig9"]) + " tokens"}
    ne = runs[runs["family"] == "ne"]
    out = []
    for family, expected, claim in (("ple", +1, "PLE is worse than NE of the same total"),
                                    ("plne", -1, "PLNE is marginally better than NE of the same total")):
        arm = runs[runs["family"] == family]
        contrasts = []
        if len(arm) and len(ne):
            total = float(arm["total"].mean())
            ratio_of = ne.groupby("target_ratio")["total"].mean()
            nearest = float((ratio_of - total).abs().idxmin())
            twin = ne[ne["target_ratio"] == nearest]
            mismatch = float(twin["total"].mean()) / total - 1
            contrasts.append(contrast(f"{family.upper()} - NE (totals {human(total)} vs "
                                      f"{human(float(twin['total'].mean()))}, {mismatch:+.1%})", expected, metrics,
                                      lambda m, arm=arm, twin=twin: seed_differences(arm, twin, m)))
        out.append(Finding(f"fig9_{family}", claim=claim, contrasts=tuple(contrasts), **common))
    return out


FINDINGS: dict[str, Callable[[pd.DataFrame, list[str]], list[Finding]]] = {
    "fig2": fig2_findings, "fig4": fig4_findings, "fig5": fig5_findings, "fig67": fig67_findings,
    "fig9": fig9_findings,
}


def reproduction_findings(results: str | Path = "results", sweeps: dict[str, str] | None = None) -> list[Finding]:
    """Every finding, from the reproduction sweeps under ``results`` (a missing sweep gives its findings as
    ``not measured``). ``sweeps``: the sweep name of each figure key of :data:`SWEEPS` (default those names).
    Only runs usable by fits count (completed, no repeated data, not diverged)."""
    found: list[Finding] = []
    for key, default in SWEEPS.items():
        runs = _usable_runs(results, (sweeps or {}).get(key, default))
        if runs is None:
            found.extend(FINDINGS[key](_empty_runs(), ["train"]))
            continue
        found.extend(FINDINGS[key](runs, splits(runs) if len(runs) else ["train"]))
    return found


def _usable_runs(results: str | Path, sweep: str) -> pd.DataFrame | None:
    """The runs of ``results/<sweep>`` usable by fits (completed, no repeated data, not diverged), or None when
    the sweep is not there (under the results root only, never a folder of that name elsewhere)."""
    sweep_dir = Path(results) / sweep
    return usable(load(sweep_dir, curves=False)[0]) if sweep_dir.is_dir() else None


#: the control sweep (not a claim of the paper): fig2's MoE ladder with a sqrt(D)-scaled token embedding
CONTROL_SWEEP = "repro_control_moe_sqrt_d"


def control_contrasts(results: str | Path = "results", fig2_sweep: str = SWEEPS["fig2"],
                      control_sweep: str = CONTROL_SWEEP) -> list[Contrast]:
    """The control's differences, seed by seed, per metric: each NE arm of Fig. 2 against the amplified MoE of the
    same ratio (equal totals: the scale has no parameters), and the amplified MoE against the plain one at each
    ratio (what amplification alone does to the MoE). Empty when either sweep is missing. No verdict: the paper
    claims nothing about this; the differences say how much of NE's advantage the amplification could explain."""
    fig2, control = _usable_runs(results, fig2_sweep), _usable_runs(results, control_sweep)
    if fig2 is None or control is None or fig2.empty or control.empty:
        return []
    metrics = [m for m in splits(fig2) if m in splits(control)]
    out = []
    ne = fig2[fig2["family"] == "ne"]
    for (base, ratio), arm in ne.groupby(["base_ratio", "target_ratio"]):
        amplified = _moe_at(control, float(ratio))
        out.append(contrast(f"NE (base {base:g}) - MoE with sqrt(D) embedding at ratio {ratio:g}", 0, metrics,
                            lambda m, arm=arm, amplified=amplified: seed_differences(arm, amplified, m)))
    for ratio in sorted({float(r) for r in control["target_ratio"].dropna()}):
        amplified, plain = _moe_at(control, ratio), _moe_at(fig2, ratio)
        out.append(contrast(f"MoE with sqrt(D) embedding - MoE at ratio {ratio:g}", 0, metrics,
                            lambda m, amplified=amplified, plain=plain: seed_differences(amplified, plain, m)))
    return out


def repeated_runs(results: str | Path = "results", sweeps: Sequence[str] = tuple(SWEEPS.values()),
                  metric: str = "train") -> pd.DataFrame:
    """Runs that more than one sweep trained (the same run id: configuration, seed and data order), one row per
    run id: how many times it was trained, the ``metric`` loss of each training and their spread (max - min).
    Copies (``copied_from``) are not trainings. On a GPU, whose kernels accumulate in no fixed order, the spread
    is the run-to-run noise that the seed intervals do not hold."""
    column = loss_column(metric)
    frames = []
    for sweep in sweeps:
        runs = _usable_runs(results, sweep)
        if runs is not None and column in runs.columns:
            copied = runs["copied_from"].notna() if "copied_from" in runs.columns \
                else pd.Series(False, index=runs.index)
            frames.append(runs.loc[~copied, ["run_id", "sweep", column]])
    if not frames:
        return pd.DataFrame(columns=["run_id", "trainings", "losses", "spread"])
    runs = pd.concat(frames, ignore_index=True)
    out = []
    for run_id, group in runs.groupby("run_id"):
        if len(group) > 1:
            losses = tuple(float(v) for v in group[column])
            out.append({"run_id": run_id, "trainings": len(group), "losses": losses,
                        "spread": max(losses) - min(losses)})
    return pd.DataFrame(out, columns=["run_id", "trainings", "losses", "spread"]).sort_values(
        "spread", ascending=False, ignore_index=True)


def render_contrasts(contrasts: Sequence[Contrast]) -> str:
    """Contrasts as a Markdown table: one row each, one column per metric (mean [interval])."""
    metrics = list(contrasts[0].by_metric) if contrasts else []
    lines = ["| difference | " + " | ".join(_metric_name(m) for m in metrics) + " |",
             "| --- |" + " --- |" * len(metrics)]
    for c in contrasts:
        lines.append(f"| {c.label} | " + " | ".join(c.by_metric[m].text() for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _empty_runs() -> pd.DataFrame:
    columns = ["run_id", "family", "seed", "target_ratio", "base_ratio", "ratio", "width", "depth", "ngram_n",
               "ngram_k", "amplification", "total", "activated", "tokens", "pair_run_id", loss_column("train")]
    return pd.DataFrame({c: [] for c in columns})


# ----------------------------------------------------------------------------------------------------------
# rendering

def verdict_counts(findings: Sequence[Finding]) -> dict[str, int]:
    counts = dict.fromkeys((AGREE, DISAGREE, INCONCLUSIVE, NOT_MEASURED), 0)
    for finding in findings:
        counts[finding.verdict] += 1
    return counts


#: the figure of ``embscale plots`` that shows each finding (by the finding key's first part)
FIGURE_FILES = {"fig2": "fig2_loss_vs_ratio", "fig4": "fig4_ngram_nk", "fig5": "fig5_norms",
                "fig6": "fig6_width_loss_reduction", "fig7": "fig7_depth_loss_reduction", "fig9": "fig9_per_layer"}


def render_markdown(findings: Sequence[Finding], next_runs: dict[str, str] | None = None,
                    figures: dict[str, list[str]] | None = None) -> str:
    """The findings as a Markdown table (one row per claim) followed by each finding's notes. ``next_runs``: per
    finding key, what to run to settle it at a larger scale (shown for the rows that are not ``agree``);
    ``figures``: per finding key, the paths of its figures as the table should link them."""
    next_runs, figures = next_runs or {}, figures or {}
    lines = ["| figure | the paper's claim | measured: mean [interval] per metric | verdict | scale here (paper) "
             "| to settle it |", "| --- | --- | --- | --- | --- | --- |"]
    for f in findings:
        verdict = f.verdict
        per_metric = f.per_metric()
        if per_metric and len(set(per_metric.values())) > 1:
            verdict += " (" + ", ".join(f"{_metric_name(m)}: {v}" for m, v in per_metric.items()) + ")"
        settle = next_runs.get(f.key, "") if f.verdict != AGREE else ""
        scale = f"{f.scale} ({f.paper_scale})" if f.scale else f"- ({f.paper_scale})"
        links = " ".join(f"[{Path(path).stem}]({path})" for path in figures.get(f.key, []))
        shown = f"{f.figure}<br>{links}" if links else f.figure
        lines.append(f"| {shown} | {f.claim} | {_cell(f.measured())} | **{verdict}** | {scale} | {settle} |")
    notes = [(f, note) for f in findings for note in f.notes]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {f.figure} `{f.key}`: {note}" for f, note in notes]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")
