"""The trainer: determinism, metrics and run files, MoE statistics, divergence, signals, schedules, parameter
groups, and bad input failing with exit code 2 before anything is written."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_data import write_text_corpus

from embscale.base.rundir import read_status, write_status
from embscale.cli import main as cli_main
from embscale.training.config import RunConfig, TrainingConfig
from embscale.training.optim import learning_rate, parameter_groups
from embscale.training.trainer import EXIT_CODES, train_run

ROOT = Path(__file__).resolve().parents[1]
CONTRIBUTING_COLUMNS = ["step", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s", "mfu",
                        "moe_imbalance", "zero_expert_fraction"]


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(corpus: Path, results: Path, model: dict | None = None, **training) -> dict:
    return {
        "model": model or {"d_model": 32, "n_layers": 2, "n_heads": 2, "dense_hidden": 64, "max_seq_len": 64},
        "training": {"steps": 16, "batch_tokens": 256, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2,
                     "eval_every": 8, "eval_tokens": 256, "checkpoint_every": 4, "device": "cpu", **training},
        "data": {"corpus": str(corpus / "train"), "val_paths": {"held": str(corpus / "val")}, "vocab_size": 300},
        "output": {"root": str(results), "sweep": "t"},
    }


def metrics_of(summary: dict) -> pd.DataFrame:
    return pd.read_parquet(Path(summary["run_dir"]) / "metrics.parquet")


def test_same_seed_same_run_and_the_run_files(corpus, tmp_path):
    cfg = RunConfig.from_dict(config(corpus, tmp_path / "a"))
    first = train_run(cfg)
    second = train_run(cfg.replace(output={"root": str(tmp_path / "b")}))
    other_seed = train_run(RunConfig.from_dict(config(corpus, tmp_path / "c", seed=1)))
    assert first["state"] == second["state"] == "completed" and first["step"] == 16
    a, b, c = metrics_of(first), metrics_of(second), metrics_of(other_seed)
    assert np.array_equal(a["train_loss"].to_numpy(), b["train_loss"].to_numpy())
    assert np.array_equal(a["val_held_loss"].to_numpy(), b["val_held_loss"].to_numpy(), equal_nan=True)
    assert not np.array_equal(a["train_loss"].to_numpy(), c["train_loss"].to_numpy())

    # metrics.parquet: one row per step, CONTRIBUTING's columns, validation and norms at evaluation steps.
    assert list(a.columns[:9]) == CONTRIBUTING_COLUMNS and "val_held_loss" in a.columns
    assert a["step"].tolist() == list(range(1, 17))
    assert a["tokens"].tolist() == [256 * s for s in range(1, 17)]
    evaluated = a["val_held_loss"].notna()
    assert a.loc[evaluated, "step"].tolist() == [8, 16]
    assert "norm_embedding" in a.columns and a.loc[evaluated, "norm_embedding"].gt(0).all()
    assert a.loc[~evaluated, "norm_embedding"].isna().all()
    assert a["mfu"].isna().all() and a["moe_imbalance"].isna().all()  # CPU: no peak FLOP/s; dense model
    assert a["train_loss"].iloc[-3:].mean() < a["train_loss"].iloc[:3].mean() - 0.5
    assert a["lr"].iloc[0] < a["lr"].max() and (a["grad_norm"] > 0).all()
    assert first["val_held_loss"] == pytest.approx(a["val_held_loss"].iloc[-1])

    run_dir = Path(first["run_dir"])
    assert run_dir == tmp_path / "a" / "t" / cfg.run_id
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["run_id"] == cfg.run_id and run_json["model"]["vocab_size"] == 300
    assert run_json["model"]["eos_token_id"] == 0
    assert run_json["corpus"]["fingerprint"]["n_files"] == 40 and run_json["corpus"]["id"]
    assert run_json["accounting"]["flops_per_token"] > 0
    status = read_status(run_dir)
    assert status["state"] == "completed" and status["step"] == status["total_steps"] == 16
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert checkpoints == ["step_00000012.pt", "step_00000016.pt"]  # the last two kept

    # A completed run is not trained again.
    mtime = (run_dir / "metrics.parquet").stat().st_mtime_ns
    again = train_run(cfg)
    assert again["state"] == "completed" and again["train_loss"] == pytest.approx(first["train_loss"])
    assert (run_dir / "metrics.parquet").stat().st_mtime_ns == mtime


def test_moe_run_reports_load_statistics(corpus, tmp_path):
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 4, "n_zero_experts": 2, "top_k": 2,
             "expert_hidden": 32, "max_seq_len": 64, "aux_loss_coef": 0.01}
    summary = train_run(RunConfig.from_dict(config(corpus, tmp_path, model=model, steps=6, eval_every=0,
                                                  lr=3e-3)))
    frame = metrics_of(summary)
    assert summary["state"] == "completed"
    assert (frame["moe_imbalance"] >= 1).all()
    assert frame["zero_expert_fraction"].between(0, 1).all() and (frame["aux_loss"] > 0).all()


def test_keep_checkpoints_zero_writes_no_checkpoint(corpus, tmp_path):
    """``training.keep_checkpoints: 0`` (a throughput run whose checkpoint would not fit the disk): the run
    completes with every metrics row and evaluation, and no checkpoint is ever written; a negative count is a
    ConfigError naming the field."""
    from embscale.base.errors import ConfigError

    summary = train_run(RunConfig.from_dict(config(corpus, tmp_path, steps=8, keep_checkpoints=0)))
    assert summary["state"] == "completed" and len(metrics_of(summary)) == 8
    assert not list((Path(summary["run_dir"]) / "checkpoints").glob("*"))
    with pytest.raises(ConfigError) as info:
        TrainingConfig(steps=8, keep_checkpoints=-1)
    assert info.value.field == "keep_checkpoints"

    # killed before it finished (the reproduction runbook cancels what a device call cannot finish): trained again,
    # it starts over, and its metrics hold each step once
    run_dir = Path(summary["run_dir"])
    pd.read_parquet(run_dir / "metrics.parquet").head(5).to_parquet(run_dir / "metrics.parquet")
    write_status(run_dir, "running", step=5)
    again = train_run(RunConfig.from_dict(config(corpus, tmp_path, steps=8, keep_checkpoints=0)))
    assert again["state"] == "completed" and metrics_of(again)["step"].tolist() == list(range(1, 9))


def test_one_held_out_split_reads_as_val_loss(corpus, tmp_path):
    """A corpus without named validation sets holds 2% out as split ``val``: its column is ``val_loss`` (not
    ``val_val_loss``), the collected column ``final_val_loss``, and its panels say "validation loss"."""
    from embscale.analysis.store import collect, splits
    from embscale.analysis.style import split_title

    write_text_corpus(tmp_path / "docs", 300, seed=3, sentences=8)  # enough documents for a 2% hold-out
    cfg = config(corpus, tmp_path, steps=4, eval_every=2)
    cfg["data"] = {"corpus": str(tmp_path / "docs"), "vocab_size": 300}
    summary = train_run(RunConfig.from_dict(cfg))
    frame = metrics_of(summary)
    assert "val_loss" in frame.columns and not any(c.startswith("val_val") for c in frame.columns)
    assert summary["val_loss"] == pytest.approx(frame["val_loss"].dropna().iloc[-1])
    runs, _ = collect(Path(summary["run_dir"]).parent, write=False)
    assert splits(runs) == ["train", "val"] and runs["final_val_loss"].notna().all()
    assert split_title("val") == "validation loss" and split_title("val_code") == "validation loss (code)"


def test_divergence_is_detected_and_recorded(corpus, tmp_path):
    cfg = RunConfig.from_dict(config(corpus, tmp_path, lr=1e3, grad_clip=0.0, warmup_fraction=0.0, steps=40,
                                     eval_every=0))
    summary = train_run(cfg)
    assert summary["state"] == "diverged" and EXIT_CODES["diverged"] == 3
    status = read_status(summary["run_dir"])
    assert status["state"] == "diverged" and status["diverged_at"] == summary["diverged_at"] == status["step"]
    assert "diverged at step" in status["error"]
    frame = metrics_of(summary)
    assert frame["step"].max() == status["step"] < 40
    last = frame["train_loss"].iloc[-1]
    assert not math.isfinite(last) or last > 4.0 * frame["train_loss"].iloc[:-1].min()


def test_sigterm_stops_cleanly_and_the_run_resumes(corpus, tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(config(corpus, tmp_path / "results", steps=150, checkpoint_every=100)))
    cfg = RunConfig.from_yaml(run_file)
    run_dir = tmp_path / "results" / "t" / cfg.run_id
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBSCALE_PROGRESS": "plain"}
    process = subprocess.Popen([sys.executable, "-m", "embscale", "train", str(run_file)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (read_status(run_dir) or {}).get("step", 0) < 3:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_CODES["interrupted"] == 75, err
    status = read_status(run_dir)
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM"
    step = status["step"]
    assert 3 <= step < 150 and "interrupted" in out
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    assert frame["step"].tolist() == list(range(1, step + 1))
    assert (run_dir / "checkpoints" / f"step_{step:08d}.pt").is_file()

    # Running it again resumes where it stopped and finishes.
    resumed = train_run(cfg)
    assert resumed["state"] == "completed" and resumed["step"] == 150
    assert pd.read_parquet(run_dir / "metrics.parquet")["step"].tolist() == list(range(1, 151))


def test_sigusr2_in_process_interrupts_with_a_checkpoint(corpus, tmp_path):
    cfg = RunConfig.from_dict(config(corpus, tmp_path, steps=400, checkpoint_every=0, eval_every=0))
    run_dir = tmp_path / "t" / cfg.run_id

    def signal_at_step_two():
        deadline = time.monotonic() + 60
        while (read_status(run_dir) or {}).get("step", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    watcher = threading.Thread(target=signal_at_step_two, daemon=True)
    watcher.start()
    summary = train_run(cfg)
    watcher.join()
    assert summary["state"] == "interrupted" and summary["signal"] == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # handlers restored
    step = read_status(run_dir)["step"]
    assert step == summary["step"] < 400
    assert (run_dir / "checkpoints" / f"step_{step:08d}.pt").is_file()


def test_learning_rate_schedules():
    cosine = TrainingConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1)
    values = [learning_rate(s, cosine) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(values[9:-1], values[10:], strict=True))
    wsd = TrainingConfig(steps=100, lr=1.0, min_lr_ratio=0.0, schedule="wsd", warmup_fraction=0.1,
                         decay_fraction=0.2)
    values = [learning_rate(s, wsd) for s in range(100)]
    assert values[5] == pytest.approx(0.6) and set(values[9:80]) == {1.0}
    assert values[80] == pytest.approx(0.95) and values[-1] == pytest.approx(0.0)


def test_parameter_groups_spare_norms_biases_and_tables():
    from embscale.models.config import ModelConfig
    from embscale.models.model import build_model

    cfg = ModelConfig.from_dict({"vocab_size": 300, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                 "dense_hidden": 64, "ngram": {"n": 3, "k": 2, "ratio": 1.0}})
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups, counts = parameter_groups(model, 0.1, table_weight_decay=False)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    spared = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"embed.token.weight", "embed.tables.weight", "layers.0.ffn_norm.weight"} <= spared
    assert {"embed.projection.weight", "lm_head.weight", "layers.0.mlp0.w_up.weight"} <= decayed
    assert counts["decay"] + counts["no_decay"] == sum(p.numel() for p in model.parameters())
    groups, _ = parameter_groups(model, 0.1, table_weight_decay=True)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"embed.token.weight", "embed.tables.weight"} <= decayed


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit code 2, a message naming the field or file, nothing written
# ----------------------------------------------------------------------------------------------------------
def _bad_corpus(tmp_path: Path, case: str) -> dict:
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        return {"corpus": str(tmp_path / "empty")}
    if case == "empty_files":
        (tmp_path / "blank").mkdir()
        for i in range(3):
            (tmp_path / "blank" / f"{i}.txt").write_text("")
        (tmp_path / "v.txt").write_text("some validation text")
        return {"corpus": str(tmp_path / "blank"), "val_paths": {"v": str(tmp_path / "v.txt")}}
    (tmp_path / "rows.jsonl").write_text('{"text": "hello there"}\n')
    return {"corpus": str(tmp_path / "rows.jsonl"), "text_column": "body"}


@pytest.mark.parametrize("case, expected", [
    ("missing_corpus", "data.corpus"),
    ("empty_folder", "no files found"),
    ("empty_files", "has no text"),
    ("missing_column", "data.text_column"),
    ("small_vocab", "data.vocab_size"),
    ("indivisible_batch", "training.batch_tokens"),
    ("unknown_key", "training.stepz"),
])
def test_bad_input_exits_2_and_writes_nothing(corpus, tmp_path, capsys, case, expected):
    data = config(corpus, tmp_path / "results")
    if case == "missing_corpus":
        data["data"]["corpus"] = str(tmp_path / "nowhere")
    elif case in ("empty_folder", "empty_files", "missing_column"):
        data["data"] = {**_bad_corpus(tmp_path, case), "vocab_size": 300}
    elif case == "small_vocab":
        data["data"]["vocab_size"] = 100
    elif case == "indivisible_batch":
        data["training"]["batch_tokens"] = 200
    else:
        data["training"]["stepz"] = 3
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(data))
    cache_before = sorted((corpus / "cache").rglob("*"))
    assert cli_main(["train", str(run_file)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()
    assert [p for p in sorted((corpus / "cache").rglob("*")) if p.suffix != ".lock"] == \
        [p for p in cache_before if p.suffix != ".lock"]


def test_tf32_is_put_back_after_a_cuda_run():
    """A run on CUDA trains with TF32 float32 products, and leaves the process's switches as it found them (a
    test or notebook that trains in-process must not find its own float32 products changed)."""
    from embscale.training.trainer import tf32_matmuls

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tf32_matmuls(torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with tf32_matmuls(torch.device("cpu")):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_deterministic_kernels_are_switched_on_for_a_cuda_run_and_put_back(monkeypatch):
    """``training.deterministic`` on CUDA: deterministic algorithms, cuDNN without autotuning, cuBLAS's fixed
    workspace (an environment's own setting kept); the process's switches as they were afterwards; no change on
    CPU. (Touches no GPU: the switches are the process's.)"""
    from embscale.training.trainer import CUBLAS_DETERMINISTIC_WORKSPACE, deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with deterministic_kernels(torch.device("cpu"), True), deterministic_kernels(torch.device("cuda"), False):
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark) == before
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_kernels(torch.device("cuda"), True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC_WORKSPACE
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic_kernels(torch.device("cuda"), True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_is_part_of_the_run_id_only_when_asked_for(corpus, tmp_path):
    plain = RunConfig.from_dict(config(corpus, tmp_path / "results"))
    same = RunConfig.from_dict(config(corpus, tmp_path / "results", deterministic=False))
    asked = RunConfig.from_dict(config(corpus, tmp_path / "results", deterministic=True))
    assert plain.run_id == same.run_id != asked.run_id  # the ids of runs made before the switch stay
    summary = train_run(asked)  # on CPU the switch changes nothing: the same curve as without it
    assert metrics_of(summary)["train_loss"].tolist() == metrics_of(train_run(plain))["train_loss"].tolist()
    with pytest.raises(Exception, match="deterministic"):
        RunConfig.from_dict(config(corpus, tmp_path / "results", deterministic="yes"))
