"""Figures of ``embscale decode-bench`` (paper section 4, Fig. 8a), drawn from its JSON report.

- ``decode_experts``: distinct real experts a step touches (mean over the MoE layers, zero experts excluded)
  against the batch size, one line per model (NE against MoE), solid for plain decoding (``B`` tokens a step)
  and dashed for the speculative verification pass (``B (k + 1)`` tokens); a dotted level marks each model's
  real expert count.
- ``decode_throughput``: tokens/s against the batch size, and the milliseconds of a decode step next to its
  memory floor (the bytes it must read over the measured copy bandwidth).

Reads only the report (plain dicts), so analysis stays free of the decoder and the models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib import ticker

from embscale.analysis.style import FAMILY_COLORS, STYLE, make_room_right, save_figure, set_title, subplots

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _colors(models: list[dict[str, Any]]) -> list[str]:
    families = [m.get("family", "") for m in models]
    if len(set(families)) == len(families):
        return [FAMILY_COLORS.get(f, PALETTE[i % len(PALETTE)]) for i, f in enumerate(families)]
    return [PALETTE[i % len(PALETTE)] for i in range(len(models))]


def _series(rows: list[dict[str, Any]], mode: str, key: str) -> tuple[list[int], list[float]]:
    picked = [(r["batch"], r[key]) for r in rows if r["mode"] == mode and r.get(key) is not None
              and not (isinstance(r[key], float) and math.isnan(r[key]))]
    picked.sort()
    return [b for b, _ in picked], [v for _, v in picked]


def _batch_axis(ax, batches: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(set(batches))))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("batch size (sequences)")


def _subtitle(report: dict[str, Any]) -> str:
    machine = report.get("machine", {})
    return f"{report.get('dtype', '')} on {machine.get('device', '?')}"


def experts_figure(report: dict[str, Any], out_dir: Path) -> list[Path]:
    colored = zip(report["models"], _colors(report["models"]), strict=True)  # the colours of the other figure
    models, colors = zip(*[(m, c) for m, c in colored if m.get("n_experts", 0) > 0], strict=True)
    fig, axes = subplots(1, 1, panel=(4.2, 2.9), right=2.0, top=0.45)
    ax = axes[0, 0]
    batches: list[int] = []
    k = report.get("k", 0)
    for model, color in zip(models, colors, strict=True):
        x, y = _series(model["rows"], "decode", "experts_per_step")
        ax.plot(x, y, "o-", color=color, label=f"{model['label']}: decode")
        batches += x
        x, y = _series(model["rows"], "speculative", "experts_per_step")
        if x:
            ax.plot(x, y, "s--", color=color, alpha=0.8, label=f"{model['label']}: verify k={k}")
            batches += x
        ax.axhline(model["n_experts"], color=color, linestyle=":", linewidth=1,
                   label=f"{model['label']}: all {model['n_experts']} experts")
    if batches:
        _batch_axis(ax, batches)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("distinct real experts per step\n(mean over MoE layers)")
    make_room_right(fig, ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0)))
    set_title(fig, f"Active experts per decode step ({_subtitle(report)})")
    return save_figure(fig, out_dir, "decode_experts")


def throughput_figure(report: dict[str, Any], out_dir: Path) -> list[Path]:
    models = report["models"]
    fig, axes = subplots(1, 2, panel=(3.3, 2.7), right=2.3, wgap=0.8, top=0.75)
    speed, step = axes[0, 0], axes[0, 1]
    batches: list[int] = []
    k = report.get("k", 0)
    for model, color in zip(models, _colors(models), strict=True):
        x, y = _series(model["rows"], "decode", "tokens_per_s")
        speed.plot(x, y, "o-", color=color, label=f"{model['label']}: decode")
        batches += x
        x, y = _series(model["rows"], "speculative", "tokens_per_s")
        if x:
            speed.plot(x, y, "s--", color=color, alpha=0.8, label=f"{model['label']}: speculative k={k}")
        x, y = _series(model["rows"], "decode", "ms_per_step")
        step.plot(x, y, "o-", color=color)
        x, y = _series(model["rows"], "decode", "floor_ms")
        if x:
            step.plot(x, y, "v:", color=color, alpha=0.8, label=f"{model['label']}: memory floor")
    for ax in (speed, step):
        if batches:
            _batch_axis(ax, batches)
        ax.set_yscale("log")
    speed.set_ylabel("generated tokens / s")
    speed.set_title("throughput")
    step.set_ylabel("ms per decode step (solid: measured)")
    step.set_title("decode step against its memory floor")
    handles, labels = [], []
    for ax in (speed, step):  # one legend for both panels, beside them
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    make_room_right(fig, step.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.03, 1.0)))
    bandwidth = report.get("copy_bandwidth_gb_s")
    note = f"; floor at {bandwidth:.1f} GB/s copy bandwidth" if bandwidth else ""
    set_title(fig, f"Decoding speed ({_subtitle(report)}{note})")
    return save_figure(fig, out_dir, "decode_throughput")


def decode_figures(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write both figures (PNG and PDF) to ``out_dir``; the experts figure only when a model has experts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        paths = throughput_figure(report, out_dir)
        if any(m.get("n_experts", 0) > 0 for m in report["models"]):
            paths += experts_figure(report, out_dir)
    return paths


__all__ = ["decode_figures", "experts_figure", "throughput_figure"]
