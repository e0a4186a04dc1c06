"""The run folder, ``results/<sweep>/<run_id>/``: the interface between training, the sweep engine and analysis.

This module owns the folder's file names, the one list of run states, and every read and write of its files; all
writes go through :mod:`embscale.base.files` (temporary file, then rename)::

    run.json          the run. The sweep engine writes the planned record before a job starts (``family``,
                      ``point``, ``config``, ``accounting``, ``tokens``, ``flops``, ``sweep``, ``planned_by``); the
                      trainer writes its own when the run starts (``identity``, the resolved ``model``, ``corpus``,
                      ``tokenizer``, ``shards``, ...) and the planned keys it lacks are merged into it. A record with
                      ``identity`` was written by the trainer (:func:`written_by_trainer`). After each attempt's
                      first step the trainer adds ``startup`` (:func:`record_startup`).
    status.json       ``state`` (one of :data:`STATES`), ``step``, ``total_steps``, ``error``, ``updated_at``; the
                      sweep engine's ``job_id``; what the trainer leaves at the end of an attempt: ``summary``,
                      ``diverged_at``, ``signal``, ``traceback``. A run copied from another sweep's completed
                      folder (:func:`copy_completed_run`) has ``copied_from`` here and in run.json.
    metrics.parquet   one row per optimizer step (``step``, ``tokens``, ``lr``, ``train_loss``, ...,
                      ``val_<split>_loss`` (:func:`val_loss_column`: ``val_loss`` for a single held-out split)
                      and ``norm_<name>`` at evaluation steps, NaN elsewhere).
    checkpoints/      ``step_00001200.pt`` (a plain dict of tensors, numbers, strings, lists and dicts: loaded with
                      ``weights_only=True``, nothing unpickled) and ``step_00001200.pt.sha256``; or, for a sharded
                      run (``training.parallel`` fsdp / hsdp on several ranks), a folder ``step_00001200/`` that
                      every rank writes its shards into (:mod:`embscale.training.sharded_checkpoint` says what
                      is in it), with ``manifest.json`` (every other file's size and sha256) written last.
    tensorboard/      with ``output.tracking: [tensorboard]``: one TensorBoard event file
                      (:mod:`embscale.base.tfevents`) holding the metrics rows as scalars, appended as the run trains
                      (an append-only log a live reader follows, so not written atomically). An attempt that
                      resumes writes a new file, replays the rows kept from the checkpoint into it, then removes the
                      earlier files (:func:`open_event_log`, :func:`remove_event_files`).
    wandb/            with ``output.tracking: [wandb]``: Weights & Biases' offline runs (``wandb`` writes them).

Checkpoints are written and flushed to disk, then their checksum file; one without its checksum file is
incomplete and never loaded. A sharded checkpoint is written into a hidden folder ``.step_00001200.tmp/``; once
every rank has written its files, rank 0 writes ``manifest.json`` and renames the folder to ``step_00001200/``
(:func:`commit_sharded_checkpoint`): a folder of that name without a manifest is never loaded, and a hidden one
is what a killed save left (removed by :func:`remove_partial_writes`). Loading tries the newest first; one whose
checksums do not match, or that does not load, is renamed ``*.corrupt`` (kept for inspection) and the one before
is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from embscale.base.files import (
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_path,
    read_json,
)
from embscale.base.progress import log
from embscale.base.tfevents import EventFileWriter, event_files

RUN_FILE = "run.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.parquet"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"

# ----------------------------------------------------------------------------------------------------- states
# Every state status.json can hold. The trainer writes running, completed, failed, diverged and interrupted; the
# sweep engine writes queued (a job is about to start), pending (taken back before it started) and cancelled.
STATES = ("pending", "queued", "running", "completed", "failed", "diverged", "interrupted", "cancelled")
# The run has its final result and is never trained again: the trainer returns the stored summary.
DONE_STATES = ("completed", "diverged")
# No job will change the state on its own: resubmitting skips these (failed and diverged only on request).
TERMINAL_STATES = ("completed", "failed", "diverged")
FAILED_STATES = ("failed", "diverged")
# A job has the run, or is about to.
IN_FLIGHT_STATES = ("queued", "running")
# Shown by `embscale status`, never written: what reconciling status.json with the scheduler finds.
LOST = "lost"  # status says running, and no job runs it any more
FAILED_TO_START = "failed-to-start"  # status says queued, and its job is gone without having started training
SHOWN_STATES = (*STATES, LOST, FAILED_TO_START)

# status.json keys that describe how one attempt ended: a new state drops them unless it is given them again.
_ATTEMPT_KEYS = ("error", "summary", "diverged_at", "signal", "traceback")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run folder (it holds run.json or status.json)."""
    return Path(path).is_dir() and any((Path(path) / name).exists() for name in (RUN_FILE, STATUS_FILE))


# ----------------------------------------------------------------------------------------------------- run.json
def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's run.json, or None when it has none (or an unreadable one)."""
    record = read_json(Path(run_dir) / RUN_FILE)
    return record if isinstance(record, dict) else None


def write_run_record(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / RUN_FILE, record)


def written_by_trainer(record: Any) -> bool:
    """Whether a run.json record was written by the trainer (the run has started), not planned only."""
    return isinstance(record, dict) and "identity" in record


PLANNED_BY = "planned_by"  # the command that planned a run (a planned record's key; not kept once trained)


def write_planned_record(run_dir: Path, planned: dict[str, Any]) -> None:
    """Write the planned run.json before a job starts; the trainer's run.json (the run has started) only gains
    the planned keys it lacks."""
    existing = read_run_record(run_dir)
    if written_by_trainer(existing):
        missing = {k: v for k, v in planned.items() if k not in existing and k != PLANNED_BY}
        if missing:
            write_run_record(run_dir, {**existing, **missing})
    elif existing != planned:
        write_run_record(run_dir, planned)


def with_planned(trainer_record: dict[str, Any], planned: dict[str, Any] | None) -> dict[str, Any]:
    """The trainer's run.json: its own record, plus the planned keys it lacks (family, point, pair, ...)."""
    extra = {k: v for k, v in (planned or {}).items() if k not in trainer_record and k != PLANNED_BY}
    return {**trainer_record, **extra}


def record_startup(run_dir: Path, startup: dict[str, Any]) -> None:
    """Put the start-up phases of the run's latest attempt into its run.json as ``startup``: ``since`` (``process
    start`` or ``train_run call``), ``origin`` (seconds since the epoch), ``imports_s``, ``data_s``, ``model_s``,
    ``first_step_s`` and ``total_s`` (seconds). Nothing is written for a run without a trainer's run.json."""
    record = read_run_record(run_dir)
    if written_by_trainer(record):
        write_run_record(run_dir, {**record, "startup": startup})


def read_json_checked(path: Path) -> tuple[dict[str, Any] | None, str]:
    """``(mapping, "")``, ``(None, "")`` when the file does not exist, or ``(None, why)`` when it is unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as exc:
        return None, f"unreadable {path.name}: {exc}"
    if not isinstance(data, dict):
        return None, f"unreadable {path.name}: not a JSON object"
    return data, ""


# ----------------------------------------------------------------------------------------------------- status
def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's status.json, or None when it has none (or an unreadable one)."""
    status = read_json(Path(run_dir) / STATUS_FILE)
    return status if isinstance(status, dict) else None


def run_state(run_dir: Path) -> str:
    """The state in the run's status.json; ``pending`` when there is none."""
    status = read_status(run_dir)
    return str(status.get("state", "pending")) if status else "pending"


def write_status(run_dir: Path, state: str, **fields: Any) -> dict[str, Any]:
    """Set the run's state and ``fields``, keeping its other keys (``step``, ``total_steps``, ``job_id``, ...)
    except those of the previous attempt's ending (error, summary, ...), unless given again; ``updated_at`` is now
    unless given. Returns the status."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; expected one of {', '.join(STATES)}")
    previous = read_status(run_dir) or {"step": 0, "total_steps": None}
    status = {k: v for k, v in previous.items() if k not in _ATTEMPT_KEYS}
    status.update(fields)
    status.setdefault("error", None)
    status["state"] = state
    status["updated_at"] = fields.get("updated_at") or utc_now()
    atomic_write_json(Path(run_dir) / STATUS_FILE, status)
    return status


def completed_copy_source(results_root: Path, sweep: str, run_id: str) -> Path | None:
    """A completed run folder ``<results_root>/<other sweep>/<run_id>/`` of another sweep (the run id is a hash
    of the model, training and data sections, so the same id is the same training), or None. The first in name
    order when several sweeps hold it."""
    for candidate in sorted(Path(results_root).glob(f"*/{run_id}")):
        if candidate.parent.name == sweep or not (candidate / METRICS_FILE).exists():
            continue
        status = read_status(candidate)
        if status and status.get("state") == "completed" and written_by_trainer(read_run_record(candidate)):
            return candidate
    return None


def copy_completed_run(source: Path, dest: Path, planned: dict[str, Any]) -> None:
    """Make ``dest`` the completed run of ``source`` (the same run id in another sweep): its metrics, and its
    trainer's run.json and status.json with this sweep's planned keys (``sweep``, ``point``, ``family``, ...) and
    ``copied_from`` (the source folder). Checkpoints and tracking files stay behind: a completed run is never
    resumed. Built in a temporary folder beside ``dest`` and renamed into place, so ``dest`` is either as it was
    or complete."""
    source, dest = Path(source), Path(dest)
    record = read_run_record(source) or {}
    status = read_status(source) or {}
    planned = {k: v for k, v in planned.items() if k != PLANNED_BY}
    staging = dest.parent / f".{dest.name}.copy-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    replaced = dest.parent / f".{dest.name}.replaced-{os.getpid()}"
    moved = False
    try:
        shutil.copy2(source / METRICS_FILE, staging / METRICS_FILE)
        write_run_record(staging, {**record, **planned, "copied_from": str(source)})
        atomic_write_json(staging / STATUS_FILE, {**status, "job_id": None, "copied_from": str(source)})
        if dest.exists():
            dest.rename(replaced)
            moved = True
        staging.rename(dest)
    except BaseException:
        if moved and not dest.exists():
            replaced.rename(dest)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if moved:
        shutil.rmtree(replaced, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- metrics
HELD_OUT_SPLIT = "val"  # the validation split of a corpus without named ones


def val_loss_column(split: str) -> str:
    """The metrics column of a validation split's loss: ``val_<split>_loss``, and ``val_loss`` for the single
    held-out split (``val``) of a corpus without named validation sets."""
    return "val_loss" if split == HELD_OUT_SPLIT else f"val_{split}_loss"


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def read_metrics(run_dir: Path, columns: list[str] | None = None) -> Any | None:
    """The run's metrics as a ``pyarrow.Table`` (``columns`` only), or None when there are none (yet), or the
    file is being replaced, or a column asked for is not there. :func:`read_metrics_checked` says why."""
    table, _ = read_metrics_checked(run_dir, columns)
    return table


def read_metrics_checked(run_dir: Path, columns: list[str] | None = None) -> tuple[Any | None, str]:
    """``(table, "")``, or ``(None, why)``: ``no metrics.parquet`` or ``unreadable metrics.parquet: ...``."""
    import pyarrow.parquet as pq

    path = metrics_path(run_dir)
    if not path.is_file():
        return None, f"no {METRICS_FILE}"
    if columns is None:
        # the whole file through ParquetFile: the same table in a tenth of read_table's time, which sets up its
        # dataset machinery for each file (most of `embscale collect`'s time on a 1,000-run sweep). A file it
        # cannot read is read again below, so that the reason given is read_table's own.
        try:
            with pq.ParquetFile(path) as parquet:
                return parquet.read(use_threads=False), ""
        except Exception:  # noqa: BLE001, S110 - read_table says why, below
            pass
    try:
        return pq.read_table(path, columns=columns, use_threads=False), ""
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, or without the column: the caller says so
        return None, f"unreadable {METRICS_FILE}: {exc}"


def write_metrics(run_dir: Path, frame: Any) -> None:
    """Replace the run's metrics with ``frame`` (a pandas DataFrame), whole."""
    with atomic_file(metrics_path(run_dir)) as tmp:
        frame.to_parquet(tmp, index=False)


# ----------------------------------------------------------------------------------------------------- tracking
def tensorboard_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TENSORBOARD_DIR


def wandb_dir(run_dir: Path) -> Path:
    """The folder Weights & Biases writes its offline runs into (``wandb.init(dir=run_dir)`` makes it)."""
    return Path(run_dir) / WANDB_DIR


def event_log_files(run_dir: Path) -> list[Path]:
    """The run's TensorBoard event files, in the order TensorBoard reads them."""
    return event_files(tensorboard_dir(run_dir))


def open_event_log(run_dir: Path) -> EventFileWriter:
    """A new TensorBoard event file in the run's ``tensorboard/`` folder, named to be read after any there, that
    voids every point of those (a session start at step 1: the new file is given every row from step 1 on)."""
    return EventFileWriter(tensorboard_dir(run_dir), session_step=1)


def remove_event_files(run_dir: Path, keep: Path) -> list[Path]:
    """Delete the run's event files other than ``keep`` (earlier attempts' logs, once ``keep`` holds their kept
    rows); returns those deleted."""
    removed = [path for path in event_log_files(run_dir) if path != Path(keep)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# ----------------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_NAME = re.compile(r"^step_(\d{8})\.pt$")
SHARDED_CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")
MANIFEST_FILE = "manifest.json"
SHARDED_FORMAT = "embscale-dcp-1"  # manifest.json's ``format``: what the folder holds and how it is read


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def sharded_checkpoint_path(run_dir: Path, step: int) -> Path:
    """The folder of the sharded checkpoint of ``step`` (once committed)."""
    return checkpoint_dir(run_dir) / f"step_{step:08d}"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints, oldest first: a ``.pt`` with its ``.sha256`` beside it, or a sharded
    checkpoint's folder with its ``manifest.json``."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and _checksum_path(path).is_file():
            found.append((int(match.group(1)), path))
        match = SHARDED_CHECKPOINT_NAME.match(path.name)
        if match and (path / MANIFEST_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _checksum_path(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (of either format)."""
    for _, old in list_checkpoints(run_dir)[:-keep]:
        _remove_checkpoint(old)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep`` checkpoints."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(run_dir, step)
    # A stale checksum of an older checkpoint at this step must not vouch for the new file being written.
    _checksum_path(path).unlink(missing_ok=True)
    atomic_write_bytes(path, data, fsync=True)
    atomic_write_text(_checksum_path(path), hashlib.sha256(data).hexdigest() + "\n", fsync=True)
    prune_checkpoints(run_dir, keep)
    return path


def verify_checkpoint(path: Path) -> bool:
    """Whether the file's sha256 matches its ``.sha256`` file."""
    path = Path(path)
    try:
        expected = _checksum_path(path).read_text().strip()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return False
    return digest == expected


def read_checkpoint_file(path: Path, map_location: Any = "cpu") -> tuple[dict[str, Any] | None, str]:
    """``(state, "")`` of an intact single-file checkpoint (checksum right, loaded with ``weights_only=True``), or
    ``(None, why)``."""
    import torch

    if not verify_checkpoint(path):
        return None, "checksum mismatch (truncated or corrupt)"
    try:
        return torch.load(path, map_location=map_location, weights_only=True), ""
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        return None, f"cannot be loaded: {exc}"


def set_aside_corrupt(path: Path, problem: str) -> None:
    """Log why checkpoint ``path`` (a file or a sharded checkpoint's folder) is unusable and rename it (and its
    checksum file) ``*.corrupt``, kept for inspection; the loader then falls back to the one before."""
    log(f"checkpoint {path} is unusable ({problem}); falling back to the previous one")
    for item in (path, _checksum_path(path)):
        if item.exists():
            target = item.with_name(item.name + ".corrupt")
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(item, target)


def _remove_leftovers(folder: Path, pattern: str) -> None:
    for leftover in folder.glob(pattern):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def load_latest_checkpoint(run_dir: Path, map_location: Any = "cpu") -> tuple[int, dict[str, Any]] | None:
    """``(step, state)`` of the newest intact single-file checkpoint, or None when there is none (sharded
    checkpoints are loaded by :func:`embscale.training.checkpoint.restore_latest`).

    Corrupt or truncated checkpoints met on the way are renamed ``*.corrupt`` and reported, and temporary files of
    a save that was killed are removed."""
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        _remove_leftovers(folder, ".step_*.tmp")
    for step, path in reversed(list_checkpoints(run_dir)):
        if path.is_dir():
            continue
        state, problem = read_checkpoint_file(path, map_location)
        if state is not None:
            return step, state
        set_aside_corrupt(path, problem)
    return None


# Sharded checkpoints: every rank writes into the hidden folder, then rank 0 commits it.
def begin_sharded_checkpoint(run_dir: Path, step: int) -> Path:
    """The empty hidden folder a sharded checkpoint of ``step`` is written into (any leftover of an earlier save
    of this step removed). Rank 0 calls it; the other ranks wait for it (a barrier) before writing."""
    tmp = sharded_checkpoint_tmp(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def sharded_checkpoint_tmp(run_dir: Path, step: int) -> Path:
    """Where :func:`begin_sharded_checkpoint` put the folder being written (the other ranks' view of it)."""
    return checkpoint_dir(run_dir) / f".step_{step:08d}.tmp"


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, read in 16 MiB pieces (a shard can be many GB)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def commit_sharded_checkpoint(run_dir: Path, step: int, tmp: Path, files: dict[str, dict[str, Any]],
                              info: dict[str, Any], keep: int = 2) -> Path:
    """Make the sharded checkpoint written into ``tmp`` count (rank 0, once every rank has written and digested
    its files): check that ``files`` (name -> :func:`file_digest`, from every rank) covers exactly the folder's
    files, write ``manifest.json`` (``format``, ``step``, ``files`` and ``info``) last, flushed to disk, rename the
    folder to ``step_<step>`` and delete all but the newest ``keep`` checkpoints."""
    present = {p.name for p in tmp.iterdir()}
    if present != set(files):
        raise RuntimeError(f"sharded checkpoint {tmp}: files written {sorted(present)} differ from the files "
                           f"digested {sorted(files)}")
    manifest = {"format": SHARDED_FORMAT, "step": step, "files": dict(sorted(files.items())), **info}
    atomic_write_json(tmp / MANIFEST_FILE, manifest, fsync=True)
    final = sharded_checkpoint_path(run_dir, step)
    if final.exists():  # a stale checkpoint of this step (a run that went back to an earlier one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(checkpoint_dir(run_dir))  # the rename, on disk
    prune_checkpoints(run_dir, keep)
    return final


def read_manifest(path: Path) -> tuple[dict[str, Any] | None, str]:
    """``(manifest, "")`` of a sharded checkpoint's folder, or ``(None, why)`` when it is missing or malformed."""
    manifest, problem = read_json_checked(Path(path) / MANIFEST_FILE)
    if manifest is None:
        return None, problem or f"no {MANIFEST_FILE}"
    if manifest.get("format") != SHARDED_FORMAT or not isinstance(manifest.get("files"), dict):
        return None, f"{MANIFEST_FILE} is not an {SHARDED_FORMAT} manifest"
    return manifest, ""


def verify_sharded_checkpoint(path: Path, part: int = 0, parts: int = 1) -> str:
    """Why the sharded checkpoint in folder ``path`` is unusable, or "" when it is intact: its manifest is read
    and every listed file must be there with its size; the sha256 of every ``parts``-th file from the ``part``-th
    on is checked (each rank checks its share, then the ranks agree; one process checks all)."""
    path = Path(path)
    manifest, problem = read_manifest(path)
    if manifest is None:
        return problem
    names = sorted(manifest["files"])
    for index, name in enumerate(names):
        expected = manifest["files"][name]
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, the manifest says {expected.get('bytes')} (truncated or corrupt)"
        if index % parts == part and file_digest(file)["sha256"] != expected.get("sha256"):
            return f"checksum mismatch of {name} (corrupt)"
    return ""


def read_latest_checkpoint(run_dir: Path, map_location: Any = "cpu"
                           ) -> tuple[tuple[int, Path, dict[str, Any]] | None, list[tuple[Path, str]]]:
    """For readers of a run that is not theirs (``embscale decode-bench``): ``(step, path, state)`` of the newest
    intact checkpoint (None when there is none) and ``(path, why)`` of every newer one that is unusable. Nothing
    is renamed or removed: the run's trainer decides what happens to its files."""
    unusable = []
    for step, path in reversed(list_checkpoints(run_dir)):
        if path.is_dir():
            unusable.append((path, "a sharded checkpoint (read it with "
                                   "embscale.training.sharded_checkpoint.read_sharded_checkpoint)"))
            continue
        state, problem = read_checkpoint_file(path, map_location)
        if state is not None:
            return (step, path, state), unusable
        unusable.append((path, problem))
    return None, unusable


def remove_partial_writes(run_dir: Path) -> None:
    """Delete the temporary files of writes that a killed attempt never finished (also half-written sharded
    checkpoints)."""
    _remove_leftovers(Path(run_dir), ".*.tmp")
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        _remove_leftovers(folder, ".step_*.tmp")


__all__ = [
    "CHECKPOINT_DIR", "DONE_STATES", "FAILED_STATES", "FAILED_TO_START", "HELD_OUT_SPLIT", "IN_FLIGHT_STATES", "LOST",
    "MANIFEST_FILE", "METRICS_FILE", "PLANNED_BY", "RUN_FILE", "SHARDED_FORMAT", "SHOWN_STATES", "STATES",
    "STATUS_FILE", "TENSORBOARD_DIR", "TERMINAL_STATES", "WANDB_DIR", "begin_sharded_checkpoint", "checkpoint_dir",
    "checkpoint_path", "commit_sharded_checkpoint", "event_log_files", "file_digest", "is_run_dir",
    "list_checkpoints", "load_latest_checkpoint", "metrics_path", "open_event_log", "prune_checkpoints",
    "read_checkpoint_file", "read_latest_checkpoint", "read_json_checked", "read_manifest", "read_metrics",
    "read_metrics_checked", "completed_copy_source", "copy_completed_run",
    "read_run_record", "read_status", "record_startup", "remove_event_files", "remove_partial_writes", "run_state",
    "save_checkpoint", "set_aside_corrupt", "sharded_checkpoint_path", "sharded_checkpoint_tmp", "tensorboard_dir",
    "utc_now", "val_loss_column", "verify_checkpoint", "verify_sharded_checkpoint", "wandb_dir", "with_planned",
    "write_metrics", "write_planned_record", "write_run_record", "write_status", "written_by_trainer",
]
