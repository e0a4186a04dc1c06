"""Live curves: the run's metrics rows, as :class:`embscale.training.metrics.Metrics` records them for
``metrics.parquet``, also sent to trackers a researcher watches while the run trains (``output.tracking``).

- ``tensorboard``: a TensorBoard event file in ``<run_dir>/tensorboard/``, written by embscale itself
  (:mod:`embscale.base.tfevents`), so nothing is needed at run time; ``tensorboard --logdir results/<sweep>`` shows
  every run of a sweep.
- ``wandb``: a Weights & Biases offline run in ``<run_dir>/wandb/`` (project = sweep, name = run id, config = the
  run config); ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it. Needs ``wandb`` installed (checked when
  the config is read).

Each row becomes one set of scalars at its step: every numeric column, tagged ``train/<column>``,
``val/<column>`` (``val_*``) or ``norm/<column>`` (``norm_*``). A column that is NaN in a row was not measured at
that step (validation losses between evaluations, MFU without a known peak, MoE statistics of a dense model) and is
left out, except the training loss, gradient norm and auxiliary loss, whose NaN is a measurement (a divergence).

Only the rank that writes the metrics (rank 0) has trackers. A run that resumes gives new trackers every row kept
from its checkpoint first, so each holds the whole curve: TensorBoard's new event file replaces the earlier
attempts' files (after a session-start mark that tells a TensorBoard already reading them to drop their points),
so no step appears twice; W&B gets a new offline run per attempt, the newest holding the whole curve. (Replayed rows
carry the replay's wall time: ``metrics.parquet`` keeps no time of day.) Turning tracking on for a run that resumes
gives the whole curve too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

from embscale.base import rundir
from embscale.training.config import TRACKERS

# NaN in these columns is a measurement (the step diverged), written; elsewhere it means "not measured here".
NAN_IS_MEASURED = ("train_loss", "grad_norm", "aux_loss")
FLUSH_INTERVAL_S = 2.0  # an event file's buffered rows reach the disk at least this often while steps arrive


def scalar_tag(column: str) -> str:
    """The tracker tag of a metrics column: ``val/<column>``, ``norm/<column>`` or ``train/<column>``."""
    if column.startswith("val_"):
        return f"val/{column}"
    if column.startswith("norm_"):
        return f"norm/{column}"
    return f"train/{column}"


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics row, tagged (:func:`scalar_tag`): numeric columns other than ``step``, without
    the values that were not measured at this step."""
    scalars = {}
    for column, value in row.items():
        if column == "step" or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isnan(number) and column not in NAN_IS_MEASURED:
            continue
        scalars[scalar_tag(column)] = number
    return scalars


class Tracker(Protocol):
    """Where the metrics rows go besides ``metrics.parquet``."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` (tag -> value) at ``step``."""

    def flush(self) -> None:
        """Make what was logged visible to readers now (the metrics were just written)."""

    def close(self, ok: bool) -> None:
        """End the attempt: ``ok`` is False when the run failed with an error."""


class TensorBoardTracker:
    """Scalars into a new event file in the run's ``tensorboard/`` folder. Event files of earlier attempts are
    superseded: the new file starts with a session start at step 1 (a TensorBoard already reading the folder drops
    their points) and, at the first :meth:`flush` (after the kept rows have been replayed into it), they are
    removed, so the folder holds one file whose points are the rows of ``metrics.parquet``."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.supersedes = bool(rundir.event_log_files(self.run_dir))
        self.writer = rundir.open_event_log(self.run_dir)  # starts with a session start at step 1
        self.last_flush = time.monotonic()

    @property
    def path(self) -> Path:
        return self.writer.path

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.writer.add_scalars(step, scalars)
        now = time.monotonic()
        if now - self.last_flush >= FLUSH_INTERVAL_S:
            self.writer.flush()
            self.last_flush = now

    def flush(self) -> None:
        # On disk before the earlier files go: a crash in between leaves both, which TensorBoard still reads right.
        self.writer.flush(fsync=self.supersedes)
        self.last_flush = time.monotonic()
        if self.supersedes:
            rundir.remove_event_files(self.run_dir, keep=self.writer.path)
            self.supersedes = False

    def close(self, ok: bool) -> None:
        self.flush()
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in offline mode, written under the run folder (``wandb`` must be installed)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any]):
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(mode="offline", dir=str(run_dir), project=project, name=name,
                              config=json.loads(json.dumps(config)))

    @property
    def path(self) -> Path:
        """The offline run's folder (what ``wandb sync`` takes)."""
        return Path(self.run.dir).parent

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def flush(self) -> None:
        """Nothing to do: W&B writes its offline run as it goes."""

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def open_trackers(names: tuple[str, ...] | list[str], run_dir: Path, run_id: str, sweep: str,
                  config: dict[str, Any]) -> list[Tracker]:
    """The trackers ``names`` (``output.tracking``) of one attempt of run ``run_id``; ``config`` is the run config
    mapping W&B records. A tracker that fails to open closes those opened before it."""
    trackers: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir))
            elif name == "wandb":
                trackers.append(WandbTracker(run_dir, project=sweep, name=run_id, config=config))
            else:
                raise ValueError(f"unknown tracker {name!r}; expected any of {', '.join(TRACKERS)}")
    except BaseException:
        for tracker in trackers:
            tracker.close(ok=False)
        raise
    return trackers


__all__ = ["FLUSH_INTERVAL_S", "NAN_IS_MEASURED", "TensorBoardTracker", "Tracker", "WandbTracker",
           "open_trackers", "row_scalars", "scalar_tag"]
