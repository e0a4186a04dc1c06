"""Resuming: a run killed with SIGKILL at three different steps (and once left with a corrupt newest checkpoint)
and resumed each time reproduces the uninterrupted run's loss curve bit for bit; checkpoint checksums."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_data import write_text_corpus

from embscale.base.rundir import list_checkpoints, load_latest_checkpoint, read_status, save_checkpoint
from embscale.training.config import RunConfig
from embscale.training.trainer import train_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    """The reference run and the subprocesses all use one intra-op thread (bitwise comparable results)."""
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_checkpoints_are_checksummed_pruned_and_fall_back(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((4,), float(step))}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    (folder / ".step_00000004.pt.abc.tmp").write_bytes(b"half a save")
    newest = folder / "step_00000003.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    step, state = load_latest_checkpoint(tmp_path)
    assert step == 2 and torch.equal(state["w"], torch.full((4,), 2.0))
    assert (folder / "step_00000003.pt.corrupt").is_file() and not newest.exists()
    assert not list(folder.glob("*.tmp"))
    (folder / "step_00000002.pt.sha256").unlink()  # a save killed before its checksum: never loaded
    assert load_latest_checkpoint(tmp_path) is None


def _wait_for_status(run_dir: Path, min_step: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the run's status says it is running at ``min_step`` or later."""
    deadline = time.monotonic() + timeout
    while True:
        status = read_status(run_dir)
        if status and status.get("state") == "running" and status.get("step", 0) >= min_step:
            return
        assert process.poll() is None, f"the run ended before step {min_step}: {process.communicate()}"
        assert time.monotonic() < deadline, f"the run never reported step {min_step}"
        time.sleep(0.005)


def test_sigkill_at_three_steps_resumes_bit_for_bit(tmp_path):
    write_text_corpus(tmp_path / "train", 40, seed=1, sentences=40)
    write_text_corpus(tmp_path / "val", 3, seed=2, sentences=40)
    data = {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "dense_hidden": 64, "max_seq_len": 64},
        "training": {"steps": 80, "batch_tokens": 256, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2,
                     "eval_every": 20, "eval_tokens": 256, "checkpoint_every": 10, "device": "cpu"},
        "data": {"corpus": str(tmp_path / "train"), "val_paths": {"held": str(tmp_path / "val")},
                 "vocab_size": 300},
        "output": {"root": str(tmp_path / "reference"), "sweep": "r"},
    }
    reference = train_run(RunConfig.from_dict(data))  # uninterrupted; also fills the data cache
    expected = pd.read_parquet(Path(reference["run_dir"]) / "metrics.parquet")

    data["output"]["root"] = str(tmp_path / "killed")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "killed" / "r" / RunConfig.from_dict(data).run_id
    command = [sys.executable, "-m", "embscale", "train", str(run_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_at = []
    # Kill a little after the run reports a checkpoint, so each attempt dies between checkpoints and redoes
    # steps. The wait is on the status the run writes after each checkpoint (what the kill is then read back
    # from), and on a step past the previous kill: a fast machine may run past the next planned checkpoint
    # before the kill lands, and a stale status must not end the next wait.
    for checkpoint_step, delay_s, corrupt_newest in ((10, 0.05, False), (30, 0.12, True), (50, 0.02, False)):
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            _wait_for_status(run_dir, max(checkpoint_step, killed_at[-1] + 1 if killed_at else 0), process)
            time.sleep(delay_s)
            process.kill()
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == -9, "the run finished before it could be killed"
        status = read_status(run_dir)
        assert status["state"] == "running"
        killed_at.append(status["step"])
        if corrupt_newest:  # truncated newest checkpoint: detected, set aside, the previous one used
            _, newest = list_checkpoints(run_dir)[-1]
            newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "falling back to the previous one" in finished.stderr or any(
        (run_dir / "checkpoints").glob("*.corrupt"))
    assert len(set(killed_at)) == 3 and all(0 < s < 80 for s in killed_at), killed_at

    resumed = pd.read_parquet(run_dir / "metrics.parquet")
    assert resumed["step"].tolist() == list(range(1, 81))
    assert np.array_equal(resumed["train_loss"].to_numpy(), expected["train_loss"].to_numpy())
    assert np.array_equal(resumed["grad_norm"].to_numpy(), expected["grad_norm"].to_numpy())
    assert np.array_equal(resumed["val_held_loss"].to_numpy(), expected["val_held_loss"].to_numpy(),
                          equal_nan=True)
    assert read_status(run_dir)["state"] == "completed"
