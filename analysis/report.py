"""A sweep's figures and fit summary, regenerated from its results: what ``embscale plots`` and the demo run.

:func:`plot_sweep` loads a sweep (collecting it first when its tables are stale), fits the laws
(:mod:`embscale.analysis.fits`) and writes, as PNG and PDF under ``<sweep>/figures/``, every figure the sweep holds
data for (:mod:`embscale.analysis.figures`), and ``<sweep>/summary.csv``.

With ``jobs=2`` (``embscale plots`` on a large sweep, when other programs leave a CPU for it: :func:`default_jobs`)
a helper process shares the work. It is started first (its imports take a second, while this process fits the
ratio laws), then offered the parameter laws' minimisations (the starts and the bootstrap replicates of each fit,
in batches) and every figure but the loss curves (their table stays here); meanwhile this process takes, from the
end of the helper's queue, whatever the helper has not started. Each piece is computed whole by one process from
the same inputs, so the fits, the files and the skip notes (given in the order of :data:`FIGURES`) are those of
one process.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

from embscale.analysis import figures
from embscale.analysis.fits import Analysis, analyse, summary_table
from embscale.analysis.laws import single_threaded_blas
from embscale.analysis.store import load, resolve_sweep_dir
from embscale.analysis.style import STYLE, figure_caveats
from embscale.base.files import atomic_write_bytes

logger = logging.getLogger(__name__)
Log = Callable[[str], None]

# Sweeps with at least this many runs are plotted by two processes (when the machine has a CPU to spare): below it
# the helper's start-up (a second of imports) costs more than the work it would take.
PARALLEL_MIN_RUNS = 200


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from ``/proc/stat`` (None where there is none)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


class CpuMeter:
    """How many CPUs others left idle between this meter's start and :meth:`spare`: all CPUs less those the
    system was busy on, not counting this process (whose own work, a sweep's loading, runs meanwhile)."""

    def __init__(self) -> None:
        self.start = (_cpu_jiffies(), time.process_time(), time.monotonic())

    def spare(self, min_seconds: float = 0.2) -> float:
        """Idle CPUs (this process not counted as busy); measured over at least ``min_seconds`` (it waits for
        the rest), or, without ``/proc/stat``, the CPU count less the load average."""
        count = os.cpu_count() or 1
        jiffies, cpu_start, wall_start = self.start
        if jiffies is None:
            try:
                return count - os.getloadavg()[0]
            except (AttributeError, OSError):
                return float(count)
        time.sleep(max(0.0, min_seconds - (time.monotonic() - wall_start)))
        end = _cpu_jiffies()
        wall = time.monotonic() - wall_start
        if end is None or end[1] <= jiffies[1]:
            return float(count)
        busy_cpus = count * (end[0] - jiffies[0]) / (end[1] - jiffies[1])
        own_cpus = (time.process_time() - cpu_start) / wall
        return count - max(0.0, busy_cpus - own_cpus)


def default_jobs(n_runs: int, spare_cpus: float) -> int:
    """Processes ``embscale plots`` uses for a sweep of ``n_runs`` runs, with ``spare_cpus`` idle
    (:class:`CpuMeter`): 2 for a large sweep when others leave one and a half CPUs idle or more (this process
    takes one; a helper on a CPU that others keep busy only slows both down), else 1."""
    return 2 if n_runs >= PARALLEL_MIN_RUNS and (os.cpu_count() or 1) >= 2 and spare_cpus >= 1.5 else 1


@dataclass
class PlotResult:
    sweep_dir: Path
    figures: list[Path]
    summary: pd.DataFrame
    summary_path: Path | None
    skipped: list[str]


@dataclass
class _Inputs:
    """What the figures are drawn from (sent once to the helper process)."""

    result: Analysis
    curves: pd.DataFrame | None
    out_dir: Path
    sweep_dir: Path | None


# Every figure, in the order they are drawn and their skip notes given: (name, drawn from the curves table). The
# helper process is not sent the curves.
FIGURES: tuple[tuple[str, bool], ...] = (
    ("fig2_loss_vs_ratio", False),
    ("fig3_collisions", False),
    ("fig4_ngram_nk", False),
    ("fig5_norms", False),
    ("fig6_width_loss_reduction", False),
    ("fig7_depth_loss_reduction", False),
    ("fig9_per_layer", False),
    ("pareto", False),
    ("param_law", False),
    ("loss_curves", True),
)
Job = tuple[str, int | None]  # a figure of FIGURES, and for fig2 the index of one backbone size (one file each)


def figure_jobs(result: Analysis) -> list[Job]:
    """:data:`FIGURES` in order, ``fig2_loss_vs_ratio`` as one job per backbone size (the largest figure set)."""
    jobs: list[Job] = []
    for name, _ in FIGURES:
        sizes = figures.loss_vs_ratio_sizes(result) if name == "fig2_loss_vs_ratio" else []
        jobs += [(name, index) for index in range(len(sizes))] if sizes else [(name, None)]
    return jobs


def draw_figure(job: Job, inputs: _Inputs, log: Log) -> list[Path]:
    """Draw one job of :func:`figure_jobs` (PNG and PDF); returns its files (none when it is skipped)."""
    result, out_dir = inputs.result, inputs.out_dir
    name, part = job
    with matplotlib.rc_context(STYLE), figure_caveats([caveat.text for caveat in result.caveats]):
        if name == "fig2_loss_vs_ratio":
            sizes = None if part is None else figures.loss_vs_ratio_sizes(result)[part:part + 1]
            return figures.fig_loss_vs_ratio(result, out_dir, log, sizes=sizes)
        if name == "fig3_collisions":
            return figures.fig_collisions(inputs.sweep_dir, result.runs, out_dir, log)
        if name == "fig4_ngram_nk":
            return figures.fig_ngram_nk(result, out_dir, log)
        if name == "fig5_norms":
            return figures.fig_norms(result, out_dir, log)
        if name == "fig6_width_loss_reduction":
            return figures.fig_reduction(result, out_dir, log, "width")
        if name == "fig7_depth_loss_reduction":
            return figures.fig_reduction(result, out_dir, log, "depth")
        if name == "fig9_per_layer":
            return figures.fig_per_layer(result, out_dir, log)
        if name == "pareto":
            return figures.fig_pareto(result, out_dir, log)
        if name == "param_law":
            return figures.fig_param_law(result, out_dir, log)
        if name == "loss_curves":
            return figures.fig_loss_curves(result, inputs.curves, out_dir, log)
    raise KeyError(f"no figure {name!r}")


def plot_results(runs: pd.DataFrame, curves: pd.DataFrame, out_dir: str | Path, *,
                 sweep_dir: Path | None = None, n_boot: int = 400, n_boot_param: int = 100,
                 repeated_data: str = "exclude", log: Log | None = None, jobs: int | None = 1
                 ) -> tuple[list[Path], pd.DataFrame, list[str]]:
    """Fit and draw every figure the runs support into ``out_dir``; returns (paths, summary, skip lines).

    ``repeated_data``: ``exclude`` (default) or ``include`` the runs that repeated their training data
    (:func:`embscale.analysis.fits.apply_data_policy` says why excluding is the default); either way every figure
    says how many there were.

    ``jobs``: processes that fit the parameter laws and draw the figures, 1 or 2; None: :func:`default_jobs`
    (what ``embscale plots`` does; it looks at the CPUs for 0.2 s first). The
    helper process is started with ``spawn``, which imports the program's main module again: a script that calls
    this with ``jobs`` other than 1 keeps its own work under ``if __name__ == "__main__":``.
    """
    skipped: list[str] = []
    emit = log or logger.info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if jobs is None:
        jobs = default_jobs(len(runs), CpuMeter().spare())
    helper = _Helper.start() if jobs > 1 else None
    try:
        mapper = None if helper is None else helper.mapper
        result = analyse(runs, n_boot=n_boot, n_boot_param=n_boot_param, repeated_data=repeated_data,
                         mapper=mapper)
        for line in result.notes:
            emit(line)
        drawn = _draw_all(_Inputs(result, curves, out_dir, sweep_dir), helper)
    finally:
        if helper is not None:
            helper.stop()
    paths: list[Path] = []
    for files, notes, caught in drawn:
        for message in notes:
            skipped.append(message)
            emit(message)
        for message, category in caught:
            warnings.warn(message, category, stacklevel=2)
        paths += files
    return paths, summary_table(result), skipped


def _draw_all(inputs: _Inputs, helper: _Helper | None) -> list[tuple[list[Path], list[str], list]]:
    """Every job of :func:`figure_jobs`, in order: (files, skip notes, warnings) each; with a helper process, all
    but those drawn from the curves are offered to it, and this process draws those first."""
    jobs = figure_jobs(inputs.result)
    from_curves = {name for name, uses_curves in FIGURES if uses_curves}
    if helper is None or not helper.send_inputs(inputs):
        return [_draw_recording(job, inputs) for job in jobs]
    here = [job for job in jobs if job[0] in from_curves]
    offered = [job for job in jobs if job[0] not in from_curves]
    results = dict(zip(here, (_draw_recording(job, inputs) for job in here), strict=True))
    results.update(zip(offered, helper.share(_helper_draw, offered, lambda job: _draw_recording(job, inputs)),
                       strict=True))
    return [results[job] for job in jobs]


def _draw_recording(job: Job, inputs: _Inputs) -> tuple[list[Path], list[str], list]:
    """:func:`draw_figure`, with its skip notes and warnings kept to be given in figure order."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = draw_figure(job, inputs, notes.append)
    return files, notes, [(str(w.message), w.category) for w in caught]


class _Helper:
    """One helper process that shares the work of this one (parameter-law fits, figures): started with ``spawn``
    (a fresh interpreter: nothing of this process, its threads included, is copied), it imports what it needs
    while this process fits the ratio laws."""

    def __init__(self, executor: ProcessPoolExecutor):
        self.executor = executor

    @classmethod
    def start(cls) -> _Helper | None:
        import multiprocessing

        try:
            executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            executor.submit(_helper_warm_up)
        except (OSError, RuntimeError) as exc:  # no processes to be had here: everything in this one
            logger.info("plotting in one process: %s", exc)
            return None
        return cls(executor)

    def share(self, remote: Callable[[Any], Any], items: list, local: Callable[[Any], Any]) -> list:
        """``[local(item) for item in items]``, shared with the helper: it is offered every item in order and
        computes ``remote(item)`` (the same result, or None when it failed there); meanwhile this process takes
        items one at a time from the end of its queue, those it has not started. Whatever failed in the helper,
        or could not be given to it, is computed here (so an error is raised from this process)."""
        try:
            futures = [self.executor.submit(remote, item) for item in items]
        except RuntimeError:  # the pool is broken or shut down
            return [local(item) for item in items]
        results: dict[int, Any] = {}
        while True:
            for index in reversed(range(len(items))):
                if index not in results and futures[index].cancel():
                    results[index] = local(items[index])
                    break
            else:
                break
        for index, future in enumerate(futures):
            if index not in results:
                try:
                    value = future.result()
                except Exception as exc:  # noqa: BLE001 - the helper died or could not take the item
                    logger.info("computed here: the helper process failed (%s)", exc)
                    value = None
                results[index] = value if value is not None else local(items[index])
        return [results[index] for index in range(len(items))]

    def mapper(self, fn: Callable[..., Any], calls: list[tuple]) -> list:
        """A ``mapper`` of :func:`embscale.analysis.laws.fit_power_sum`: ``fn(*args)`` for each call, shared in
        about 12 batches (one replicate is a few milliseconds: handing them over one at a time cost more than
        they took)."""
        size = max(1, -(-len(calls) // 12))
        batches = [calls[start:start + size] for start in range(0, len(calls), size)]
        done = self.share(functools.partial(_helper_call, fn), batches,
                          lambda batch: [fn(*args) for args in batch])
        return [value for batch in done for value in batch]

    def send_inputs(self, inputs: _Inputs) -> bool:
        """Give the helper what the figures are drawn from (without the curves: it does not draw those)."""
        try:
            self.executor.submit(_helper_receive, _Inputs(inputs.result, None, inputs.out_dir, inputs.sweep_dir))
        except RuntimeError:
            return False
        return True

    def stop(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------
# in the helper process

_HELPER_INPUTS: _Inputs | None = None


def _helper_warm_up() -> None:
    """Import and initialise what fitting and drawing need (fonts, both backends) while the parent fits."""
    import io

    import matplotlib.pyplot as plt

    with matplotlib.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.set_title("warm-up")
        for fmt in ("png", "pdf"):
            fig.savefig(io.BytesIO(), format=fmt)
        plt.close(fig)


def _helper_call(fn: Callable[..., Any], batch: list[tuple]) -> list | None:
    """``[fn(*args) for args in batch]``, or None when one raised (the parent computes them again, and raises).
    With BLAS on one thread, as the fits run in the parent (its threads only slow these small products down)."""
    try:
        with single_threaded_blas():
            return [fn(*args) for args in batch]
    except Exception:  # noqa: BLE001
        return None


def _helper_receive(inputs: _Inputs) -> None:
    global _HELPER_INPUTS
    _HELPER_INPUTS = inputs


def _helper_draw(job: Job) -> tuple[list[Path], list[str], list] | None:
    """One figure, or None when the inputs did not arrive or the figure failed (the parent draws it then)."""
    if _HELPER_INPUTS is None:
        return None
    try:
        return _draw_recording(job, _HELPER_INPUTS)
    except Exception:  # noqa: BLE001 - drawn again by the parent, which raises it
        return None


def plot_sweep(sweep: str | os.PathLike, *, results: str | os.PathLike = "results", n_boot: int = 400,
               n_boot_param: int = 100, repeated_data: str = "exclude", log: Log | None = None,
               jobs: int | None = 1) -> PlotResult:
    """Load (collecting when stale), fit and plot one sweep into ``<sweep>/figures/``; write ``summary.csv``.
    ``repeated_data`` and ``jobs``: as :func:`plot_results`."""
    sweep_dir = resolve_sweep_dir(sweep, results)
    emit = log or logger.info
    meter = CpuMeter()  # what others leave idle is measured while the sweep loads
    runs, curves = load(sweep_dir, progress=lambda done, total: emit(f"collecting: {done}/{total} runs read"))
    if jobs is None:
        jobs = default_jobs(len(runs), meter.spare(min_seconds=0.1))
    paths, summary, skipped = plot_results(runs, curves, sweep_dir / "figures", sweep_dir=sweep_dir,
                                           n_boot=n_boot, n_boot_param=n_boot_param,
                                           repeated_data=repeated_data, log=log, jobs=jobs)
    summary_path = sweep_dir / "summary.csv"
    atomic_write_bytes(summary_path, summary.to_csv(index=False).encode())
    return PlotResult(sweep_dir, paths, summary, summary_path, skipped)


__all__ = ["FIGURES", "PARALLEL_MIN_RUNS", "CpuMeter", "PlotResult", "default_jobs", "draw_figure", "figure_jobs",
           "plot_results", "plot_sweep"]
