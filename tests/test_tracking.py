"""Live curves (output.tracking): TensorBoard event files written by embscale itself and read back by TensorBoard's
own reader, equal to metrics.parquet step by step, also across a resume; the config switch and its errors, in run
files and sweep files; W&B's offline run (only where wandb is installed)."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_data import write_text_corpus

from embscale.base import rundir
from embscale.base.errors import ConfigError
from embscale.base.tfevents import EventFileWriter, crc32c, masked_crc32c
from embscale.training.config import RunConfig
from embscale.training.metrics import Metrics
from embscale.training.tracking import TensorBoardTracker, row_scalars, scalar_tag
from embscale.training.trainer import train_run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_text_corpus(root / "train", 40, seed=1, sentences=40)
    write_text_corpus(root / "val", 3, seed=2, sentences=40)
    return root


@pytest.fixture(autouse=True)
def setup(corpus, monkeypatch):
    """One intra-op thread (tiny tensors; a busy 2-core machine), a cache shared by this module's runs."""
    monkeypatch.setenv("EMBSCALE_CACHE", str(corpus / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(corpus: Path, results: Path, tracking: list[str] | None = None, **training) -> dict:
    return {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "dense_hidden": 64, "max_seq_len": 64},
        "training": {"steps": 16, "batch_tokens": 256, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2,
                     "eval_every": 8, "eval_tokens": 256, "checkpoint_every": 4, "device": "cpu", **training},
        "data": {"corpus": str(corpus / "train"), "val_paths": {"held": str(corpus / "val")}, "vocab_size": 300},
        "output": {"root": str(results), "sweep": "t", **({"tracking": tracking} if tracking is not None else {})},
    }


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` as TensorBoard shows a folder of event files (its own reader, which also
    drops the points a session start voids)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as accumulator_module
    from tensorboard.util import tensor_util

    accumulator = accumulator_module.EventAccumulator(str(folder), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: [(event.step, float(tensor_util.make_ndarray(event.tensor_proto).item()))
                  for event in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]}


def expected_scalars(metrics: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should show for metrics.parquet: each measured value at its step, as float32."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for column in metrics.columns:
        if column == "step":
            continue
        points = [(int(step), float(np.float32(value)))
                  for step, value in zip(metrics["step"], metrics[column], strict=True) if not math.isnan(value)]
        if points:
            expected[scalar_tag(column)] = points
    return expected


# ----------------------------------------------------------------------------------------------------------
# The event file writer
# ----------------------------------------------------------------------------------------------------------
def test_event_records_are_read_back_by_tensorboards_reader_which_checks_their_crcs(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0 and masked_crc32c(b"") == 0xA282EAD8
    writer = EventFileWriter(tmp_path, session_step=7)
    big_step = 2**40 + 3  # a multi-byte varint
    writer.add_scalars(7, {"train/train_loss": 2.5, "val/val_loss": -0.125}, wall_time=1000.5)
    writer.add_scalars(big_step, {"train/lr": 3e-4, "train/grad_norm": float("nan")})
    writer.close()

    events = list(LegacyEventFileLoader(str(writer.path)).Load())
    assert len(events) == 4
    assert events[0].file_version == "brain.Event:2" and events[0].step == 0
    assert events[1].step == 7 and events[1].session_log.status == events[1].session_log.START
    assert events[2].step == 7 and events[2].wall_time == 1000.5
    values = {v.tag: v.simple_value for v in events[2].summary.value}
    assert values == {"train/train_loss": 2.5, "val/val_loss": -0.125}
    values = {v.tag: v.simple_value for v in events[3].summary.value}
    assert events[3].step == big_step and values["train/lr"] == np.float32(3e-4)
    assert math.isnan(values["train/grad_norm"])

    # The reader does check the CRCs: a flipped bit in the last value (still a parseable float) ends the read there.
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0x01
    writer.path.write_bytes(bytes(data))
    assert len(list(LegacyEventFileLoader(str(writer.path)).Load())) == 3


def test_row_scalars_leave_out_what_was_not_measured():
    nan = float("nan")
    row = {"step": 5, "tokens": 1280, "lr": 0.01, "train_loss": nan, "grad_norm": nan, "mfu": nan,
           "val_held_loss": nan, "val_code_loss": 3.5, "norm_embedding": 0.25, "epoch": 1}
    scalars = row_scalars(row)
    assert set(scalars) == {"train/tokens", "train/lr", "train/train_loss", "train/grad_norm", "val/val_code_loss",
                            "norm/norm_embedding", "train/epoch"}
    assert math.isnan(scalars["train/train_loss"]) and scalars["train/tokens"] == 1280.0  # a divergence shows


def test_a_resumed_attempt_supersedes_the_earlier_event_file(tmp_path):
    """While both files exist (the new attempt has not flushed yet, or died before it did), TensorBoard shows
    the new attempt's points only; after the first flush the earlier file is gone."""
    earlier = EventFileWriter(rundir.tensorboard_dir(tmp_path))
    for step in range(1, 7):
        earlier.add_scalars(step, {"train/train_loss": 10.0 + step})
    earlier.close()

    tracker = TensorBoardTracker(tmp_path)
    for step in range(1, 5):
        tracker.log(step, {"train/train_loss": 20.0 + step})
    tracker.writer.flush()
    assert len(rundir.event_log_files(tmp_path)) == 2 and tracker.path.name > earlier.path.name
    shown = {"train/train_loss": [(step, 20.0 + step) for step in range(1, 5)]}
    assert tensorboard_scalars(rundir.tensorboard_dir(tmp_path)) == shown
    tracker.flush()
    assert rundir.event_log_files(tmp_path) == [tracker.path]
    tracker.close(ok=True)
    assert tensorboard_scalars(rundir.tensorboard_dir(tmp_path)) == shown


def test_metrics_send_values_that_arrive_after_a_flush(tmp_path):
    metrics = Metrics(tmp_path, ["held"], enabled=True)
    metrics.attach([TensorBoardTracker(tmp_path)])
    metrics.add({"step": 1, "tokens": 8, "train_loss": 4.0, "val_held_loss": float("nan")})
    metrics.flush()
    metrics.update_last({"val_held_loss": 3.0})
    metrics.add({"step": 2, "tokens": 16, "train_loss": 3.5, "val_held_loss": float("nan")})
    metrics.close()
    assert tensorboard_scalars(rundir.tensorboard_dir(tmp_path)) == {
        "train/tokens": [(1, 8.0), (2, 16.0)], "train/train_loss": [(1, 4.0), (2, 3.5)],
        "val/val_held_loss": [(1, 3.0)]}


# ----------------------------------------------------------------------------------------------------------
# A run with tracking on, and its resume
# ----------------------------------------------------------------------------------------------------------
def test_run_event_files_hold_the_metrics_and_a_resume_leaves_one_step_each(corpus, tmp_path):
    cfg = RunConfig.from_dict(run_config(corpus, tmp_path, tracking=["tensorboard"]))
    assert cfg.run_id == RunConfig.from_dict(run_config(corpus, tmp_path)).run_id  # output is not the run's identity
    summary = train_run(cfg)
    run_dir = Path(summary["run_dir"])
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    first_files = rundir.event_log_files(run_dir)
    assert len(first_files) == 1
    shown = tensorboard_scalars(rundir.tensorboard_dir(run_dir))
    assert shown == expected_scalars(metrics)
    assert {"train/train_loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/epoch",
            "val/val_held_loss"} <= set(shown)
    assert [step for step, _ in shown["val/val_held_loss"]] == [8, 16]

    # The last checkpoint never landed (killed after step 16): resuming redoes steps 13-16 from step 12's.
    for path in (rundir.checkpoint_path(run_dir, 16), Path(f"{rundir.checkpoint_path(run_dir, 16)}.sha256")):
        path.unlink()
    rundir.write_status(run_dir, "running", step=16, total_steps=16)
    resumed = train_run(cfg)
    assert resumed["state"] == "completed"
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["step"].tolist() == list(range(1, 17))
    files = rundir.event_log_files(run_dir)
    assert len(files) == 1 and files != first_files  # the new attempt's file replaced the earlier one
    shown = tensorboard_scalars(rundir.tensorboard_dir(run_dir))
    assert all(len({s for s, _ in points}) == len(points) for points in shown.values())  # no step twice
    assert shown == expected_scalars(metrics)  # the resumed rows (steps 13-16 of the second attempt)


def test_a_run_without_tracking_writes_no_tracker_files(corpus, tmp_path):
    summary = train_run(RunConfig.from_dict(run_config(corpus, tmp_path, steps=2, eval_every=0)))
    run_dir = Path(summary["run_dir"])
    assert not rundir.tensorboard_dir(run_dir).exists() and not rundir.wandb_dir(run_dir).exists()


# ----------------------------------------------------------------------------------------------------------
# The switch: run files and sweep files
# ----------------------------------------------------------------------------------------------------------
def test_tracking_names_are_checked_naming_the_field(corpus, tmp_path):
    data = run_config(corpus, tmp_path, tracking=["tensorboard", "mlflow"])
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'") as raised:
        RunConfig.from_dict(data)
    assert raised.value.field == "output.tracking"
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_dict(run_config(corpus, tmp_path, tracking=[1]))
    assert raised.value.field == "output.tracking"
    assert RunConfig.from_dict(run_config(corpus, tmp_path, tracking="tensorboard")).output.tracking == ("tensorboard",)
    assert RunConfig.from_dict(run_config(corpus, tmp_path)).output.tracking == ()


def test_wandb_without_the_package_is_a_config_error_saying_how_to_install(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None: wandb as if not installed
    with pytest.raises(ConfigError, match="pip install wandb") as raised:
        RunConfig.from_dict(run_config(corpus, tmp_path, tracking=["wandb"]))
    assert raised.value.field == "output.tracking"


def test_a_sweep_files_output_section_reaches_every_run(tmp_path):
    from embscale.sweeps.plan import load_plan, run_config_dict

    sweep = {
        "name": "tracked",
        "model": {"vocab_size": 512, "width": 64, "depth": 1, "heads": 2, "dense_hidden": 128, "expert_size": 32,
                  "experts": 4, "top_k": 2},
        "training": {"tokens": 65536, "batch_tokens": 4096, "seq_len": 64, "micro_batch_size": 4},
        "data": {"corpus": "builtin", "vocab_size": 512},
        "output": {"tracking": ["tensorboard"], "log_interval_s": 30},
        "grid": {"family": ["moe"], "ratio": [2, 3]},
    }
    path = tmp_path / "tracked.yaml"
    path.write_text(yaml.safe_dump(sweep))
    plan = load_plan(path, tmp_path / "results")
    untracked = tmp_path / "untracked.yaml"
    untracked.write_text(yaml.safe_dump({**{k: v for k, v in sweep.items() if k != "output"}, "name": "untracked"}))
    assert [r.run_id for r in plan.runs] == [r.run_id for r in load_plan(untracked, tmp_path / "results").runs]
    for run in plan.runs:
        cfg = RunConfig.from_dict(run_config_dict(run, plan))
        assert cfg.output.tracking == ("tensorboard",) and cfg.output.log_interval_s == 30
        assert cfg.output.sweep == "tracked" and Path(cfg.output.root) == (tmp_path / "results").resolve()


# ----------------------------------------------------------------------------------------------------------
# W&B, offline (wandb is in the dev extra for this test; a run does not need it)
# ----------------------------------------------------------------------------------------------------------
def wandb_records(path: Path) -> list:
    """The records of an offline run's ``.wandb`` file (a LevelDB-style log of ``wandb_internal_pb2.Record``:
    a 7-byte W&B header, then 32 KiB blocks of chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        else:
            continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_logs_the_same_rows(corpus, tmp_path):
    cfg = RunConfig.from_dict(run_config(corpus, tmp_path, tracking=["wandb"]))
    summary = train_run(cfg)
    run_dir = Path(summary["run_dir"])
    (log_file,) = rundir.wandb_dir(run_dir).glob("offline-run-*/*.wandb")
    records = wandb_records(log_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "t" and run.display_name == cfg.run_id
    assert {item.key for item in run.config.update} >= {"model", "training", "data", "output"}
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history[int(items["_step"])] = items
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert sorted(history) == metrics["step"].tolist()
    for row in metrics.to_dict("records"):
        logged = {tag: value for tag, value in history[row["step"]].items() if not tag.startswith("_")}
        assert logged == pytest.approx(row_scalars(row), rel=1e-12)
