"""Results store: gather a sweep's run folders into two tables, written atomically next to them.

``results/<sweep>/runs.parquet``: one row per run. Columns, in groups:

- identity and state: ``run_id``, ``sweep``, ``family``, ``state``, ``step``, ``total_steps``, ``error``,
  ``updated_at``, ``wall_time_s``, ``fit_ok`` (usable by fits), ``excluded_reason`` (why not, else "");
- the axes of the design, from the run's ``point`` with the resolved config as fallback: ``target_ratio``,
  ``base_ratio``, ``width``, ``depth``, ``ngram_n``, ``ngram_k``, ``table_ratio``, ``sizing``,
  ``amplification``, ``seed``, ``lr`` (other point keys keep their name, or ``point_<key>`` on a clash);
- the resolved model config flattened with ``_`` (``vocab_size``, ``d_model``, ``n_layers``, ``n_experts``,
  ``top_k``, ``ngram_ratio``, ``per_layer_kind``, ...; the trainer's resolved ``model`` over the planned
  ``config.model``), the other config sections as ``training_*``, ``data_*``, ``output_*``, and the other
  keys of run.json (scalars as they are, mappings flattened: ``pair_run_id``, ``tokenizer_fingerprint``);
- accounting: ``total``, ``activated``, ``activated_min``, ``activated_max``, ``ratio`` (total/activated; the
  target ratio when accounting is missing), ``ne_share``, ``flops_per_token``, ``group_<name>``;
- budget: ``tokens`` and ``flops`` (planned), ``tokens_seen`` (reached), ``corpus_fingerprint``;
- final losses: ``final_<split>_loss`` and ``final_<split>_loss_spread`` for ``split`` in ``train`` and every
  ``val_<name>``: the mean and standard deviation of the last ``last_k`` evaluations (the train loss is first
  smoothed over the window since the previous evaluation), ``n_evals``;
- ``norm_<name>``: sub-layer output norms at the last evaluation that recorded them;
- data: ``epochs`` (planned passes over the training split), ``epochs_seen`` (reached, from the metrics'
  ``epoch``), ``repeated_data`` (the run saw some training tokens more than once: ``epochs_seen``, else
  ``epochs``, above 1), ``train_split_tokens`` and ``val_<name>_split_tokens`` (the shards' sizes), and
  ``small_val_splits`` (the validation splits with fewer tokens than the run's ``eval_tokens``, comma-separated).
  Fits exclude runs with ``repeated_data`` unless told otherwise (:func:`embscale.analysis.fits.analyse`).

``results/<sweep>/curves.parquet``: one row per run and evaluation step: ``run_id``, ``step``, ``tokens``,
``lr``, ``train_loss`` (mean over the window that ends at that step), every ``val_<name>_loss`` and
``norm_<name>``.

Both are plain parquet files readable with pandas or pyarrow alone. A sweep whose runs came from different
corpora (different ``corpus_fingerprint``) is collected with a warning; fits are made per fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from embscale.base import rundir
from embscale.base.errors import ResultsError
from embscale.base.files import atomic_file

log = logging.getLogger(__name__)

RUNS_FILE = "runs.parquet"
CURVES_FILE = "curves.parquet"
RUN_FILES = (rundir.RUN_FILE, rundir.STATUS_FILE, rundir.METRICS_FILE)
FIT_STATES = ("completed",)
DEFAULT_LAST_K = 3

# Point axes with a canonical column name different from their key.
_POINT_RENAMES = {"n": "ngram_n", "k": "ngram_k"}
# Canonical axis columns and where to find them in the flattened model config when the point lacks them.
_AXIS_FALLBACKS = {
    "width": ("d_model",),
    "depth": ("n_layers",),
    "ngram_n": ("ngram_n", "per_layer_ngram_n"),
    "ngram_k": ("ngram_k", "per_layer_ngram_k"),
    "table_ratio": ("ngram_ratio", "per_layer_ngram_ratio"),
    "sizing": ("ngram_sizing", "per_layer_ngram_sizing"),
    "amplification": ("ngram_amplification", "embedding_amplification"),
}
_ACCOUNTING_KEYS = ("total", "activated", "activated_min", "activated_max", "ratio", "ne_share",
                    "flops_per_token")


# ----------------------------------------------------------------------------------------------------------
# naming helpers shared by the other analysis modules

def loss_column(split: str) -> str:
    """Column of a run's final loss for ``split`` (``train``, ``val_code``, ...)."""
    return f"final_{split}_loss"


def spread_column(split: str) -> str:
    return f"final_{split}_loss_spread"


def splits(runs: pd.DataFrame) -> list[str]:
    """The loss splits present in a runs table: ``train`` first, then validation splits in name order."""
    found = [c[len("final_"):-len("_loss")] for c in runs.columns
             if c.startswith("final_") and c.endswith("_loss")]
    return sorted(found, key=lambda s: (s != "train", s))


def curve_columns(curves: pd.DataFrame) -> list[str]:
    """Loss columns of a curves table: ``train_loss`` then ``val_*_loss``."""
    return [c for c in curves.columns if c == "train_loss" or (c.startswith("val_") and c.endswith("_loss"))]


def usable(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that fits may use (``fit_ok``)."""
    if runs.empty:
        return runs
    return runs[runs["fit_ok"].astype(bool)]


# ----------------------------------------------------------------------------------------------------------
# atomic writes

def atomic_write_parquet(table: pd.DataFrame, path: Path) -> None:
    """Write a DataFrame as parquet (zstd) through :func:`embscale.base.files.atomic_file`."""
    arrow = pa.Table.from_pandas(_parquet_safe(table), preserve_index=False)
    with atomic_file(path) as tmp:
        pq.write_table(arrow, tmp, compression="zstd")


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Make object columns of mixed types storable: numbers stay numbers, anything else becomes text."""
    out = frame.copy()
    for name in out.columns:
        col = out[name]
        if col.dtype != object:
            continue
        values = [v for v in col if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not values:
            out[name] = col.astype("float64")
            continue
        kinds = {type(v) for v in values}
        if kinds <= {int, float} or kinds <= {bool}:
            out[name] = pd.to_numeric(col, errors="coerce") if kinds != {bool} else col
        elif kinds <= {str}:
            continue
        else:
            out[name] = [None if v is None or (isinstance(v, float) and math.isnan(v))
                         else (v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))
                         for v in col]
    return out


# ----------------------------------------------------------------------------------------------------------
# locating sweeps

def resolve_sweep_dir(sweep: str | os.PathLike, results: str | os.PathLike = "results") -> Path:
    """A sweep given as a folder path, or as a name under ``results``; a clear error when neither exists."""
    given = Path(sweep)
    if given.is_dir():
        return given
    under = Path(results) / str(sweep)
    if under.is_dir():
        return under
    if given.exists():
        raise ResultsError(f"{given}: not a folder (expected a sweep folder of run folders)")
    raise ResultsError(f"sweep {str(sweep)!r} not found: neither {given} nor {under} is a folder")


def run_dirs(sweep_dir: Path) -> list[Path]:
    with os.scandir(sweep_dir) as entries:
        dirs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
    return sorted(d for d in dirs if rundir.is_run_dir(d))


def discover_sweeps(results: str | os.PathLike = "results") -> list[Path]:
    """Every sweep folder under ``results``: a folder holding run folders or a collected ``runs.parquet``."""
    root = Path(results)
    if not root.is_dir():
        raise ResultsError(f"results folder {root} does not exist")
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / RUNS_FILE).exists() or run_dirs(child):
            found.append(child)
    if not found:
        raise ResultsError(f"no sweeps under {root}: no folder there holds run folders (run.json/status.json) "
                           f"or a {RUNS_FILE}")
    return found


# ----------------------------------------------------------------------------------------------------------
# reading one run

def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}_{key}" if prefix else str(key), sub, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value, default=str)
    else:
        out[prefix] = value


# Top-level keys of run.json read explicitly below; other scalar keys become columns, other mappings are
# flattened under their name (``pair_run_id``, ``tokenizer_fingerprint``), except these bulky ones.
_HANDLED_RUN_KEYS = {"run_id", "sweep", "family", "point", "config", "model", "accounting", "tokens", "flops",
                     "corpus_fingerprint", "corpus"}
_SKIPPED_RUN_KEYS = {"identity", "shards", "parameter_groups"}


def corpus_fingerprint(run: dict[str, Any]) -> str:
    """A short text naming the run's corpus: ``corpus_fingerprint``, else the trainer's ``corpus.id``, else a
    hash of ``corpus.fingerprint``; "" when the run names none."""
    value = run.get("corpus_fingerprint")
    corpus = run.get("corpus") if isinstance(run.get("corpus"), dict) else {}
    if value is None:
        value = corpus.get("id") or corpus.get("fingerprint")
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    return str(value)


def _run_record(run_dir: Path, run: dict[str, Any] | None, status: dict[str, Any] | None,
                problems: list[str]) -> dict[str, Any]:
    """The config, point, accounting and status part of a run's row (losses are added later).

    Reads both the planned run.json of the sweep engine (``family``, ``point``, ``config``, ``accounting``,
    ``tokens``, ``flops``) and the keys the trainer adds (the resolved ``model``, ``corpus``, ...).
    """
    run = run or {}
    status = status or {}
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    row: dict[str, Any] = {}

    # the resolved model (trainer) over the model section as planned (it may omit vocab_size)
    model = dict(config.get("model") or {}) if isinstance(config.get("model"), dict) else {}
    if isinstance(run.get("model"), dict):
        model.update(run["model"])
    model_flat: dict[str, Any] = {}
    _flatten("", model, model_flat)
    for section, value in config.items():
        if section != "model" and isinstance(value, dict):
            flat: dict[str, Any] = {}
            _flatten(section, value, flat)
            row.update(flat)
    row.update(model_flat)
    for key, value in run.items():
        if key in _HANDLED_RUN_KEYS or key in _SKIPPED_RUN_KEYS or key in row:
            continue
        if isinstance(value, dict):
            flat = {}
            _flatten(key, value, flat)
            row.update({k: v for k, v in flat.items() if k not in row})
        else:
            row[key] = json.dumps(value, default=str) if isinstance(value, list) else value

    accounting = run.get("accounting") if isinstance(run.get("accounting"), dict) else {}
    for key in _ACCOUNTING_KEYS:
        row[key] = accounting.get(key)
    for key, value in (accounting.get("groups") or {}).items():
        if isinstance(value, (int, float)):
            row[f"group_{key}"] = value

    canonical = set(_AXIS_FALLBACKS) | {"target_ratio", "base_ratio", "seed", "lr"}
    reserved = set(row) | {"run_id", "sweep", "family", "state", "fit_ok", "excluded_reason"}
    point = run.get("point") if isinstance(run.get("point"), dict) else {}
    for key, value in point.items():
        if key == "family":
            continue
        name = _POINT_RENAMES.get(key, key)
        if name in reserved and name not in canonical:
            name = f"point_{key}"
        row[name] = value if not isinstance(value, (dict, list)) else json.dumps(value, default=str)
    for axis, sources in _AXIS_FALLBACKS.items():
        if row.get(axis) is None:
            for source in sources:
                if model_flat.get(source) is not None:
                    row[axis] = model_flat[source]
                    break
    if row.get("amplification") == "none" and model_flat.get("embedding_amplification") not in (None, "none"):
        row["amplification"] = model_flat["embedding_amplification"]
    for key in ("target_ratio", "base_ratio", "seed", "lr"):
        if row.get(key) is None:
            row[key] = run.get(key) if not isinstance(run.get(key), (dict, list)) else None
    if row.get("lr") is None:
        row["lr"] = row.get("training_lr")
    if row.get("seed") is None:
        row["seed"] = row.get("training_seed")
    if row.get("ratio") is None:
        row["ratio"] = run.get("achieved_ratio") if run.get("achieved_ratio") is not None else row.get("target_ratio")
    if row.get("ne_share") is None:
        row["ne_share"] = run.get("ne_share")

    row["run_id"] = run_dir.name  # the layout's run id, unique in the sweep even for a copied folder
    if run.get("run_id") not in (None, run_dir.name):
        row["run_json_id"] = str(run["run_id"])
    row["family"] = run.get("family") or point.get("family")
    row["state"] = status.get("state") or ("unknown" if run else "unreadable")
    row["step"] = status.get("step")
    row["total_steps"] = status.get("total_steps") if status.get("total_steps") is not None else run.get(
        "total_steps")
    row["error"] = str(status.get("error") or "")
    row["updated_at"] = status.get("updated_at")
    summary = status.get("summary") if isinstance(status.get("summary"), dict) else {}
    row["wall_time_s"] = status.get("wall_time_s") if status.get("wall_time_s") is not None else summary.get(
        "wall_s")
    row["tokens"] = run.get("tokens")
    row["flops"] = run.get("flops")
    row["corpus_fingerprint"] = corpus_fingerprint(run)
    row["epochs"] = run.get("epochs") if isinstance(run.get("epochs"), (int, float)) else None
    shards = run.get("shards") if isinstance(run.get("shards"), dict) else {}
    for split, shard in shards.items():
        if isinstance(shard, dict) and isinstance(shard.get("n_tokens"), int):
            row["train_split_tokens" if split == "train" else f"{rundir.val_loss_column(split)[:-5]}_split_tokens"] \
                = shard["n_tokens"]
    if not run and not problems:
        problems.append("missing run.json")
    return row


def _eval_rows(columns: dict[str, np.ndarray], val_cols: list[str], norm_cols: list[str]) -> np.ndarray:
    """Indices of evaluation rows: where any validation loss (else any norm) is recorded."""
    marks = val_cols or norm_cols
    if marks:
        mask = np.zeros(len(columns["step"]), dtype=bool)
        for name in marks:
            mask |= np.isfinite(columns[name])
        return np.flatnonzero(mask)
    # no evaluations at all: use up to 100 evenly spaced logged training steps
    logged = np.flatnonzero(np.isfinite(columns.get("train_loss", np.full(len(columns["step"]), np.nan))))
    if len(logged) > 100:
        logged = logged[np.linspace(0, len(logged) - 1, 100).round().astype(int)]
    return logged


def _metrics_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """The numeric columns of a run's metrics, as float64 arrays."""
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(
                column.type):
            out[name] = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def _summarise_metrics(columns: dict[str, np.ndarray], last_k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Final losses and norms (for the runs row) and the per-evaluation curve (for curves.parquet)."""
    if "step" not in columns or len(columns["step"]) == 0:
        return {"n_evals": 0}, {}
    order = np.argsort(columns["step"], kind="stable")
    columns = {k: v[order] for k, v in columns.items()}
    step = columns["step"]
    val_cols = sorted(c for c in columns if c.startswith("val_") and c.endswith("_loss"))
    norm_cols = sorted(c for c in columns if c.startswith("norm_"))
    rows = _eval_rows(columns, val_cols, norm_cols)
    summary: dict[str, Any] = {"n_evals": int(len(rows))}
    curve: dict[str, Any] = {}
    if len(rows) == 0:
        return summary, curve
    eval_steps = step[rows]
    curve["step"] = eval_steps
    curve["tokens"] = columns["tokens"][rows] if "tokens" in columns else np.full(len(rows), np.nan)
    if "lr" in columns:
        curve["lr"] = columns["lr"][rows]

    if "train_loss" in columns:
        train = columns["train_loss"]
        logged = np.isfinite(train)
        t_step, t_loss = step[logged], train[logged]
        # smooth over the window since the previous evaluation (the first window: the interval to the next)
        if len(eval_steps) > 1:
            window = float(np.median(np.diff(eval_steps)))
        else:
            window = float(eval_steps[0]) if eval_steps[0] > 0 else 1.0
        cums = np.concatenate([[0.0], np.cumsum(t_loss)])
        hi = np.searchsorted(t_step, eval_steps, side="right")
        lo = np.searchsorted(t_step, eval_steps - window, side="right")
        count = hi - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            smoothed = np.where(count > 0, (cums[hi] - cums[lo]) / np.maximum(count, 1), np.nan)
        curve["train_loss"] = smoothed
        summary.update(_final("train", smoothed, last_k))
        summary["diverged_loss"] = bool(np.any(~np.isfinite(train[~np.isnan(train)])))
    for name in val_cols:
        values = columns[name][rows]
        curve[name] = values
        summary.update(_final(name[:-len("_loss")], values, last_k))
    for name in norm_cols:
        values = columns[name][rows]
        curve[name] = values
        finite = np.flatnonzero(np.isfinite(values))
        summary[name] = float(values[finite[-1]]) if len(finite) else np.nan
    if "tokens" in columns:
        seen = columns["tokens"][np.isfinite(columns["tokens"])]
        summary["tokens_seen"] = float(seen[-1]) if len(seen) else np.nan
    if "epoch" in columns:
        seen_epochs = columns["epoch"][np.isfinite(columns["epoch"])]
        summary["epochs_seen"] = float(seen_epochs[-1]) if len(seen_epochs) else np.nan
    summary["last_step"] = float(step[-1])
    return summary, curve


def _data_marks(row: dict[str, Any]) -> None:
    """``repeated_data`` and ``small_val_splits`` of a run's row (see the module docstring)."""
    seen, planned = row.get("epochs_seen"), row.get("epochs")
    epochs = seen if isinstance(seen, float) and math.isfinite(seen) else planned
    row["repeated_data"] = bool(isinstance(epochs, (int, float)) and epochs > 1.0)
    eval_tokens = row.get("training_eval_tokens")
    small = []
    if isinstance(eval_tokens, (int, float)):
        for key, value in row.items():
            if key.startswith("val_") and key.endswith("_split_tokens") and isinstance(value, (int, float)) \
                    and value < eval_tokens:
                small.append(key[len("val_"):-len("_split_tokens")] or rundir.HELD_OUT_SPLIT)
    row["small_val_splits"] = ",".join(sorted(small))


def _final(split: str, values: np.ndarray, last_k: int) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    tail = finite[-last_k:]
    mean = float(np.mean(tail)) if len(tail) else np.nan
    spread = float(np.std(tail, ddof=1)) if len(tail) > 1 else (0.0 if len(tail) else np.nan)
    return {loss_column(split): mean, spread_column(split): spread}


def _exclusion(row: dict[str, Any], metrics_problem: str, problems: list[str]) -> str:
    state = row.get("state")
    if problems and state in FIT_STATES + ("unknown", "unreadable"):
        return "; ".join(problems)
    if state not in FIT_STATES:
        if state == "running":
            return f"still running (step {row.get('step')} of {row.get('total_steps')})"
        if state in ("failed", "diverged"):
            detail = str(row.get("error") or "").strip().splitlines()
            return f"{state}" + (f": {detail[0][:200]}" if detail else "")
        return f"state {state}"
    if metrics_problem:
        return metrics_problem
    if row.get("family") in (None, ""):
        return "no family in run.json"
    if not math.isfinite(float(row.get(loss_column("train"), np.nan) or np.nan)) and not any(
            k.startswith("final_val_") and k.endswith("_loss") and np.isfinite(row[k]) for k in row):
        return "no finite final loss"
    if row.get("diverged_loss"):
        return "non-finite training loss"
    step, total = row.get("step"), row.get("total_steps")
    if isinstance(step, (int, float)) and isinstance(total, (int, float)) and total and step < total:
        return f"incomplete: step {step} of {total}"
    return ""


# ----------------------------------------------------------------------------------------------------------
# collect and load

def collect(sweep_dir: str | os.PathLike, *, last_k: int = DEFAULT_LAST_K, write: bool = True,
            results: str | os.PathLike = "results",
            progress: Callable[[int, int], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gather every run folder of a sweep into ``(runs, curves)``; write them as parquet unless ``write`` is off.

    ``sweep_dir`` is a folder or a sweep name under ``results``. Runs that did not complete (failed, diverged,
    running, pending, interrupted) or whose files are unreadable are kept with ``fit_ok = False`` and an
    ``excluded_reason``. ``progress(done, total)`` is called every 250 runs.
    """
    sweep_path = resolve_sweep_dir(sweep_dir, results)
    dirs = run_dirs(sweep_path)
    if not dirs:
        raise ResultsError(f"{sweep_path}: no run folders (folders holding run.json or status.json)")
    sweep_name = sweep_path.resolve().name
    rows: list[dict[str, Any]] = []
    curve_parts: list[dict[str, Any]] = []
    for index, run_dir in enumerate(dirs):
        if progress is not None and index and index % 250 == 0:
            progress(index, len(dirs))
        problems: list[str] = []
        run, run_problem = rundir.read_json_checked(run_dir / rundir.RUN_FILE)
        status, status_problem = rundir.read_json_checked(run_dir / rundir.STATUS_FILE)
        problems += [p for p in (run_problem, status_problem) if p]
        row = _run_record(run_dir, run, status, problems)
        row["sweep"] = sweep_name  # the folder is the sweep, whatever a copied run.json says
        table, metrics_problem = rundir.read_metrics_checked(run_dir)
        summary, curve = {"n_evals": 0}, {}
        if table is not None:
            try:
                summary, curve = _summarise_metrics(_metrics_columns(table), last_k)
            except Exception as exc:  # a malformed file must not stop the collection
                metrics_problem = f"unreadable {rundir.METRICS_FILE}: {exc}"
        row.update(summary)
        _data_marks(row)
        reason = _exclusion(row, metrics_problem, problems)
        row.pop("diverged_loss", None)
        row["fit_ok"] = reason == ""
        row["excluded_reason"] = reason
        rows.append(row)
        if curve:
            curve["run_id"] = np.full(len(curve["step"]), row["run_id"], dtype=object)
            curve_parts.append(curve)

    runs = _order_columns(pd.DataFrame.from_records(rows))
    curves = _concat_curves(curve_parts)
    _check_fingerprints(runs, str(sweep_path))
    if write:
        atomic_write_parquet(runs, sweep_path / RUNS_FILE)
        atomic_write_parquet(curves, sweep_path / CURVES_FILE)
    return runs, curves


def _concat_curves(parts: list[dict[str, Any]]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame({"run_id": pd.Series([], dtype=object), "step": pd.Series([], dtype=float),
                             "tokens": pd.Series([], dtype=float)})
    names: list[str] = []
    for part in parts:
        for name in part:
            if name not in names:
                names.append(name)
    lead = ["run_id", "step", "tokens", "lr", "train_loss"]
    rest = sorted(n for n in names if n not in lead)
    names = ([n for n in lead if n in names] + [n for n in rest if not n.startswith("norm_")]
             + [n for n in rest if n.startswith("norm_")])
    data = {}
    for name in names:
        pieces = [part[name] if name in part else np.full(len(part["step"]), np.nan) for part in parts]
        data[name] = np.concatenate(pieces)
    return pd.DataFrame(data)


_LEADING = ["run_id", "sweep", "family", "state", "fit_ok", "excluded_reason", "target_ratio", "base_ratio",
            "ratio", "width", "depth", "n_experts", "top_k", "ngram_n", "ngram_k", "table_ratio", "sizing",
            "amplification", "seed", "lr", "total", "activated", "ne_share", "tokens", "flops", "epochs",
            "epochs_seen", "repeated_data", "small_val_splits", "corpus_fingerprint"]


def _order_columns(runs: pd.DataFrame) -> pd.DataFrame:
    finals = sorted((c for c in runs.columns if c.startswith("final_")),
                    key=lambda c: (not c.startswith("final_train"), c))
    lead = [c for c in _LEADING if c in runs.columns]
    rest = [c for c in runs.columns if c not in lead and c not in finals]
    runs = runs[lead + finals + rest].copy()
    for name in ("target_ratio", "base_ratio", "ratio", "total", "activated", "ne_share", "tokens", "flops",
                 "lr", "table_ratio", "wall_time_s", "step", "total_steps"):
        if name in runs.columns:
            runs[name] = pd.to_numeric(runs[name], errors="coerce").astype("float64")
    runs["fit_ok"] = runs["fit_ok"].astype(bool)
    return runs


def _check_fingerprints(runs: pd.DataFrame, where: str) -> None:
    prints = sorted(set(runs.loc[runs["fit_ok"], "corpus_fingerprint"].astype(str)))
    if len(prints) > 1:
        message = (f"{where}: runs come from {len(prints)} different corpora (corpus_fingerprint "
                   f"{', '.join(p[:12] or '<none>' for p in prints)}); laws are fitted per fingerprint")
        warnings.warn(message, stacklevel=3)
        log.warning(message)


def is_stale(sweep_dir: str | os.PathLike) -> bool:
    """Whether ``runs.parquet`` is missing, counts a different number of runs than there are run folders, or
    is older than a run folder or one of its files."""
    sweep_path = Path(sweep_dir)
    target = sweep_path / RUNS_FILE
    if not target.exists() or not (sweep_path / CURVES_FILE).exists():
        return True
    stamp = target.stat().st_mtime
    count = 0
    with os.scandir(sweep_path) as entries:
        for entry in entries:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            stamps = []
            for name in RUN_FILES:
                try:
                    stamps.append(os.stat(os.path.join(entry.path, name)).st_mtime)
                except FileNotFoundError:
                    stamps.append(None)
            if stamps[0] is None and stamps[1] is None:
                continue  # not a run folder (figures/, ...)
            count += 1
            if entry.stat().st_mtime > stamp or any(t is not None and t > stamp for t in stamps):
                return True
    try:
        return pq.ParquetFile(target).metadata.num_rows != count
    except Exception:
        return True


def load(*paths: str | os.PathLike, results: str | os.PathLike = "results", curves: bool = True,
         refresh: bool = True, progress: Callable[[int, int], None] | None = None
         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load one or more sweeps (folders or names under ``results``) into ``(runs, curves)``.

    Each sweep's tables are read from its parquet files; with ``refresh`` a sweep whose files are missing or
    older than its run folders is collected again first. Both tables carry a ``sweep`` column; curves are
    keyed by ``(sweep, run_id)``. With ``curves=False`` the curves table is left empty. ``progress`` is
    passed to :func:`collect`.
    """
    if not paths:
        raise ResultsError("no sweep given")
    run_tables, curve_tables = [], []
    for given in paths:
        sweep_path = resolve_sweep_dir(given, results)
        runs_file, curves_file = sweep_path / RUNS_FILE, sweep_path / CURVES_FILE
        if runs_file.exists() and not (refresh and _needs_collect(sweep_path)):
            runs = pd.read_parquet(runs_file)
            sweep_curves = pd.read_parquet(curves_file) if curves and curves_file.exists() else None
        else:
            runs, sweep_curves = collect(sweep_path, progress=progress)
        name = sweep_path.resolve().name
        runs["sweep"] = name
        run_tables.append(runs)
        if curves and sweep_curves is not None:
            if "sweep" in sweep_curves.columns:
                sweep_curves["sweep"] = name
            else:
                sweep_curves.insert(0, "sweep", name)
            curve_tables.append(sweep_curves)
    runs = pd.concat(run_tables, ignore_index=True, sort=False) if len(run_tables) > 1 else run_tables[0]
    curves_df = (pd.concat(curve_tables, ignore_index=True, sort=False) if curve_tables
                 else pd.DataFrame({"sweep": [], "run_id": [], "step": []}))
    if len(run_tables) > 1:
        _check_fingerprints(runs, ", ".join(str(p) for p in paths))
    return runs, curves_df


def _needs_collect(sweep_path: Path) -> bool:
    """A sweep with run folders whose tables are missing or stale (a sweep holding only its collected
    tables, copied without the run folders, is read as it is)."""
    if not (sweep_path / RUNS_FILE).exists():
        return True
    with os.scandir(sweep_path) as entries:
        has_runs = any(e.is_dir() and rundir.is_run_dir(Path(e.path)) for e in entries)
    return has_runs and is_stale(sweep_path)


def describe(runs: pd.DataFrame) -> str:
    """A short text summary of a runs table: counts by family and state, exclusions, splits."""
    lines = []
    by_state = runs.groupby(["family", "state"], dropna=False).size().unstack(fill_value=0)
    lines.append(f"{len(runs)} runs, {int(runs['fit_ok'].sum())} usable by fits")
    lines.append(by_state.to_string())
    excluded = runs[~runs["fit_ok"]]
    if len(excluded):
        lines.append(f"excluded from fits ({len(excluded)}):")
        for _, row in excluded.head(20).iterrows():
            lines.append(f"  {row['run_id']}: {row['excluded_reason']}")
        if len(excluded) > 20:
            lines.append(f"  ... and {len(excluded) - 20} more")
    found = splits(runs)
    if found:
        lines.append("splits: " + ", ".join(found))
    prints = sorted(set(runs["corpus_fingerprint"].dropna().astype(str)))  # runs not started yet have none
    if len(prints) > 1:
        lines.append(f"WARNING: {len(prints)} corpus fingerprints; laws are fitted per fingerprint")
    return "\n".join(lines)
