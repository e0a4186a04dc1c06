"""DDP on CPU: two gloo processes under torchrun train the same run as one process with the same global
batch (the MoE load counts summed over ranks), to float tolerance; only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from test_data import write_text_corpus

from sweeps.run_config import RunConfig
from sweeps.train import train_run

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    write_text_corpus(tmp_path / "train", 40, seed=1, sentences=40)
    write_text_corpus(tmp_path / "val", 3, seed=2, sentences=40)
    data = {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 4, "top_k": 2, "expert_hidden": 32,
                  "n_shared_experts": 1, "max_seq_len": 64},
        # 256 tokens a step: 2 micro-batches of 4 x 32 on one process, 1 on each of two ranks.
        "training": {"steps": 8, "batch_tokens": 256, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2,
                     "eval_every": 4, "eval_tokens": 512, "checkpoint_every": 4, "device": "cpu"},
        "data": {"corpus": str(tmp_path / "train"), "val_paths": {"held": str(tmp_path / "val")},
                 "vocab_size": 300},
        "output": {"root": str(tmp_path / "single"), "sweep": "d"},
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_run(RunConfig.from_dict(data))
    finally:
        torch.set_num_threads(threads)
    expected = pd.read_parquet(Path(single["run_dir"]) / "metrics.parquet")

    data["output"]["root"] = str(tmp_path / "ddp")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "sweeps.train", str(run_file)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "ddp" / "d" / RunConfig.from_dict(data).run_id
    got = pd.read_parquet(run_dir / "metrics.parquet")
    assert got["step"].tolist() == list(range(1, 9))
    np.testing.assert_allclose(got["train_loss"], expected["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], expected["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(got["val_held_loss"], expected["val_held_loss"], rtol=1e-5)
    assert got["moe_imbalance"].ge(1).all()  # rank 0's share of the batch
    # One writer: a single set of run files, both ranks' summary lines show one run.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.parquet", "run.json",
                                                          "status.json"]
    assert result.stdout.count("completed: run") == 1
