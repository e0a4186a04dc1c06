"""The run's metrics: one row per optimizer step, kept in memory and written whole to the run folder's
``metrics.parquet`` at each flush (atomically, by :func:`embscale.base.rundir.write_metrics`).

Columns: ``step``, ``tokens``, ``lr``, ``train_loss``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ``moe_imbalance``,
``zero_expert_fraction``, ``val_<split>_loss`` (at evaluation steps, NaN elsewhere; ``val_loss`` for a single
held-out split), then others (``aux_loss``,
``epoch``) and ``norm_<name>`` (sub-layer output norms at evaluation steps).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from embscale.base import rundir

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
        self.rows.append(row)

    def update_last(self, values: dict[str, Any]) -> None:
        self.rows[-1].update(values)

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
        if not self.enabled:
            return
        rundir.write_metrics(self.run_dir, self.frame())
        self.last_flush = time.monotonic()


__all__ = ["BASE_COLUMNS", "Metrics", "is_missing"]
