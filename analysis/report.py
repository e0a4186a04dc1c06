"""A sweep's figures and fit summary, regenerated from its results: what ``embscale plots`` and the demo run.

:func:`plot_sweep` loads a sweep (collecting it first when its tables are stale), fits the laws
(:mod:`embscale.analysis.fits`) and writes, as PNG and PDF under ``<sweep>/figures/``, every figure the sweep holds
data for (:mod:`embscale.analysis.figures`), and ``<sweep>/summary.csv``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd

from embscale.analysis.figures import (
    fig_collisions,
    fig_loss_curves,
    fig_loss_vs_ratio,
    fig_ngram_nk,
    fig_norms,
    fig_param_law,
    fig_pareto,
    fig_per_layer,
    fig_reduction,
)
from embscale.analysis.fits import analyse, summary_table
from embscale.analysis.store import load, resolve_sweep_dir
from embscale.analysis.style import STYLE, figure_caveats
from embscale.base.files import atomic_write_bytes

logger = logging.getLogger(__name__)
Log = Callable[[str], None]


@dataclass
class PlotResult:
    sweep_dir: Path
    figures: list[Path]
    summary: pd.DataFrame
    summary_path: Path | None
    skipped: list[str]


def plot_results(runs: pd.DataFrame, curves: pd.DataFrame, out_dir: str | Path, *,
                 sweep_dir: Path | None = None, n_boot: int = 400, n_boot_param: int = 100,
                 repeated_data: str = "exclude", log: Log | None = None
                 ) -> tuple[list[Path], pd.DataFrame, list[str]]:
    """Fit and draw every figure the runs support into ``out_dir``; returns (paths, summary, skip lines).
    ``repeated_data``: ``exclude`` (default) or ``include`` the runs that repeated their training data
    (:func:`embscale.analysis.fits.apply_data_policy` says why excluding is the default); either way every
    figure says how many there were."""
    skipped: list[str] = []
    emit = log or logger.info

    def note(message: str) -> None:
        skipped.append(message)
        emit(message)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = analyse(runs, n_boot=n_boot, n_boot_param=n_boot_param, repeated_data=repeated_data)
    for line in result.notes:
        emit(line)
    paths: list[Path] = []
    with matplotlib.rc_context(STYLE), figure_caveats(result.caveats):
        paths += fig_loss_vs_ratio(result, out_dir, note)
        paths += fig_collisions(sweep_dir, runs, out_dir, note)
        paths += fig_ngram_nk(result, out_dir, note)
        paths += fig_norms(result, out_dir, note)
        paths += fig_reduction(result, out_dir, note, "width")
        paths += fig_reduction(result, out_dir, note, "depth")
        paths += fig_per_layer(result, out_dir, note)
        paths += fig_pareto(result, out_dir, note)
        paths += fig_param_law(result, out_dir, note)
        paths += fig_loss_curves(result, curves, out_dir, note)
    return paths, summary_table(result), skipped


def plot_sweep(sweep: str | os.PathLike, *, results: str | os.PathLike = "results", n_boot: int = 400,
               n_boot_param: int = 100, repeated_data: str = "exclude", log: Log | None = None) -> PlotResult:
    """Load (collecting when stale), fit and plot one sweep into ``<sweep>/figures/``; write ``summary.csv``."""
    sweep_dir = resolve_sweep_dir(sweep, results)
    emit = log or logger.info
    runs, curves = load(sweep_dir, progress=lambda done, total: emit(f"collecting: {done}/{total} runs read"))
    paths, summary, skipped = plot_results(runs, curves, sweep_dir / "figures", sweep_dir=sweep_dir,
                                           n_boot=n_boot, n_boot_param=n_boot_param,
                                           repeated_data=repeated_data, log=log)
    summary_path = sweep_dir / "summary.csv"
    atomic_write_bytes(summary_path, summary.to_csv(index=False).encode())
    return PlotResult(sweep_dir, paths, summary, summary_path, skipped)


__all__ = ["PlotResult", "plot_results", "plot_sweep"]
