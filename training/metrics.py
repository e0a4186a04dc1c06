"""The run's metrics: one row per optimizer step, kept in memory and written whole to the run folder's
``metrics.parquet`` at each flush (atomically, by :func:`embscale.base.rundir.write_metrics`).

Columns: ``step``, ``tokens``, ``lr``, ``train_loss``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ``moe_imbalance``,
``zero_expert_fraction``, ``val_<split>_loss`` (at evaluation steps, NaN elsewhere; ``val_loss`` for a single
held-out split), then others (``aux_loss``,
``epoch``) and ``norm_<name>`` (sub-layer output norms at evaluation steps).

The rows are also the stream the run's trackers (:mod:`.tracking`, ``output.tracking``) receive: each row is sent
to them once complete (when the next row is added, or at a flush, which every way out of the training loop passes
through), and :meth:`Metrics.attach` first sends the rows kept from an earlier attempt.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from embscale.base import rundir
from embscale.training.tracking import Tracker, row_scalars

BASE_COLUMNS = ("step", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s", "mfu", "moe_imbalance",
                "zero_expert_fraction")


def is_missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


class Metrics:
    """Rows of the run's metrics; ``enabled`` only on the rank that writes (rank 0)."""

    def __init__(self, run_dir: Path, val_splits: list[str], enabled: bool):
        self.run_dir = Path(run_dir)
        self.val_splits = {rundir.val_loss_column(split): split for split in val_splits}
        self.val_columns = list(self.val_splits)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.trackers: list[Tracker] = []
        self.sent = 0  # rows[:sent] have gone to the trackers

    def attach(self, trackers: list[Tracker]) -> None:
        """Send the rows so far (those kept from an earlier attempt) to ``trackers``, then every new row."""
        self.trackers = list(trackers)
        self.sent = 0
        self._send_complete(len(self.rows))
        for tracker in self.trackers:
            tracker.flush()

    def _send_complete(self, upto: int) -> None:
        """Send ``rows[sent:upto]`` (complete rows) to the trackers."""
        for row in self.rows[self.sent:upto]:
            self._send(int(row["step"]), row)
        self.sent = max(self.sent, upto)

    def _send(self, step: int, values: dict[str, Any]) -> None:
        if self.trackers:
            scalars = row_scalars(values)
            for tracker in self.trackers:
                tracker.log(step, scalars)

    def close(self, ok: bool = True) -> None:
        """Send the last rows and close the trackers (``ok``: False when the run failed with an error)."""
        self._send_complete(len(self.rows))
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(ok)

    def load(self, up_to_step: int) -> None:
        """Keep the rows of steps ``<= up_to_step`` from an earlier attempt (the checkpoint's steps)."""
        if not self.enabled:
            return
        table = rundir.read_metrics(self.run_dir)
        if table is None:
            return
        frame = table.to_pandas()
        frame = frame[frame["step"] <= up_to_step]
        self.rows = [{k: v for k, v in row.items() if not is_missing(v) or k in BASE_COLUMNS}
                     for row in frame.to_dict("records")]

    def add(self, row: dict[str, Any]) -> None:
        """A new step's row; the one before it is complete, and goes to the trackers."""
        self._send_complete(len(self.rows))
        self.rows.append(row)

    def update_last(self, values: dict[str, Any]) -> None:
        """Values measured later in the newest row's step (validation losses, norms)."""
        self.rows[-1].update(values)
        if self.sent == len(self.rows):  # the row went out already (a flush came first): send these too
            self._send(int(self.rows[-1]["step"]), values)

    def last_validation(self) -> dict[str, float]:
        """``{split: loss}`` of the newest row that has validation losses (empty when none has)."""
        for row in reversed(self.rows):
            found = {self.val_splits[c]: row[c] for c in self.val_columns if not is_missing(row.get(c, float("nan")))}
            if found:
                return found
        return {}

    def frame(self) -> Any:
        import pandas as pd

        columns = list(BASE_COLUMNS) + self.val_columns
        extra = sorted({k for row in self.rows for k in row} - set(columns))
        norms = [c for c in extra if c.startswith("norm_")]
        columns += [c for c in extra if c not in norms] + norms
        frame = pd.DataFrame.from_records(self.rows, columns=columns)
        for column in columns:
            if column in ("step", "tokens"):
                frame[column] = frame[column].astype("int64")
            else:
                frame[column] = frame[column].astype("float64")
        return frame

    def flush(self) -> None:
        """Write ``metrics.parquet`` whole, and send the rows so far to the trackers (made visible)."""
        if not self.enabled:
            return
        rundir.write_metrics(self.run_dir, self.frame())
        self.last_flush = time.monotonic()
        self._send_complete(len(self.rows))
        for tracker in self.trackers:
            tracker.flush()


__all__ = ["BASE_COLUMNS", "Metrics", "is_missing"]
