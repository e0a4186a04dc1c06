"""Sharded data parallelism (``training.parallel`` fsdp / hsdp, FSDP2) on CPU: two gloo ranks started with
``torch.multiprocessing`` train the same run as one process trained here, with the same global batch, to float
tolerance: losses rtol 1e-5, gradient norms rtol 1e-4, final parameters and optimizer moments rtol 1e-4 and
atol 1e-5 / 1e-6 (the parameter atol is wider: Adam's step on a row whose second moment is near zero turns a
float-rounding difference of the gradient, summed in another order over the ranks, into up to ~7e-6 of the
parameter, seen on one N-gram table element of 10k). Models: MoE (fsdp; hsdp with shortcut layers, PLE and
activation checkpointing), an N-gram Embedding with its tables in the table optimizer (kept replicated outside
the FSDP units), NE + PLNE + MLA + shortcut layers with activation checkpointing, which then resumes on two
ranks from its sharded (DCP) checkpoint bit for bit, and hsdp on four ranks (2 x 2), whose sharded checkpoint
resumes on two (resharded). The sharded runs' checkpoints are read back in this process for the comparison.
Activation checkpointing alone: the same gradients, MoE loads counted once."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_data import write_text_corpus
from test_ddp import assert_same_curves, corpus_section

from embscale.base import rundir
from embscale.base.errors import ConfigError
from embscale.training.config import RunConfig, TrainingConfig
from embscale.training.parallelize import mesh_shape
from embscale.training.sharded_checkpoint import read_sharded_checkpoint
from embscale.training.trainer import train_run

MOE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 4, "top_k": 2, "expert_hidden": 32,
       "n_shared_experts": 1, "max_seq_len": 64}
NGRAM = {"d_model": 32, "n_layers": 2, "n_heads": 2, "dense_hidden": 64, "max_seq_len": 64,
         "ngram": {"n": 3, "k": 2, "ratio": 1.0}}
RANKS_TIMEOUT_S = 180
# 512 tokens a step: 4 micro-batches of 4 x 32 in one process, 2 on each of two ranks.
TRAINING = {"steps": 6, "batch_tokens": 512, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2, "eval_every": 3,
            "eval_tokens": 512, "checkpoint_every": 3, "device": "cpu", "grad_clip": 0.5}


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch):
    """A corpus, a shared cache, one intra-op thread here and in the spawned ranks."""
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the trainer on CPU runs the PyTorch twins
    write_text_corpus(tmp_path / "train", 40, seed=1, sentences=40)
    write_text_corpus(tmp_path / "val", 3, seed=2, sentences=40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rank_main(rank: int, world_size: int, init_file: str, data: dict) -> None:
    """One rank: the environment torchrun would give it, a gloo group, then the run."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        summary = train_run(RunConfig.from_dict(data))
        assert summary["state"] == "completed", summary
    finally:
        torch.distributed.destroy_process_group()
    # A rank that finished leaves without the interpreter's shutdown, where gloo objects still alive can abort it
    # (SIGABRT) after a run that succeeded; what this test compares is on disk. The exit path of a real run is
    # tested under torchrun in test_ddp.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_on_ranks(tmp_path: Path, data: dict, name: str, world_size: int = 2) -> Path:
    """Train ``data`` on ``world_size`` spawned gloo ranks under ``<tmp>/<name>``; returns the run folder."""
    data = {**data, "output": {"sweep": "f", "root": str(tmp_path / name)}}
    init_file = tmp_path / f"init_{name}_{len(list(tmp_path.glob('init_*')))}"
    context = torch.multiprocessing.spawn(rank_main, args=(world_size, str(init_file), data), nprocs=world_size,
                                          join=False)
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:  # a collective that one rank never joins hangs the others
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} ranks did not finish in {RANKS_TIMEOUT_S} s")
    return tmp_path / name / "f" / RunConfig.from_dict(data).run_id


def train_here(tmp_path: Path, data: dict) -> Path:
    """The single-process reference, trained in the test process."""
    data = {**data, "output": {"sweep": "f", "root": str(tmp_path / "single")}}
    return Path(train_run(RunConfig.from_dict(data))["run_dir"])


def last_checkpoint(run_dir: Path) -> dict:
    """The newest checkpoint in the single-file layout (a sharded run's read from its shards in this process)."""
    path = rundir.list_checkpoints(run_dir)[-1][1]
    return read_sharded_checkpoint(path) if path.is_dir() else torch.load(path, weights_only=True)


def assert_same_run(run_dir: Path, reference: Path, steps: int, parameter_atol: float = 1e-5) -> None:
    """Same loss / norm curves as the reference and, from the final checkpoints, the same parameters, buffers
    and optimizer moments (the sharded run's checkpoint holds the full tensors, under the same keys)."""
    assert_same_curves(pd.read_parquet(run_dir / "metrics.parquet"), pd.read_parquet(reference / "metrics.parquet"),
                       steps)
    have, want = last_checkpoint(run_dir), last_checkpoint(reference)
    assert have["step"] == want["step"] == steps
    assert have["model"].keys() == want["model"].keys()
    for key in want["model"]:
        torch.testing.assert_close(have["model"][key], want["model"][key], rtol=1e-4, atol=parameter_atol,
                                   msg=key)
    for name in ("optimizer", "table_optimizer"):
        if name not in want:
            continue
        assert have[name]["param_groups"] == want[name]["param_groups"]
        assert have[name]["state"].keys() == want[name]["state"].keys()
        for index, state in want[name]["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(have[name]["state"][index][key], value, rtol=1e-4, atol=1e-6,
                                           msg=f"{name} {index} {key}")


def run_data(tmp_path: Path, model: dict, **training) -> dict:
    return {"model": model, "training": {**TRAINING, **training}, "data": corpus_section(tmp_path)}


@pytest.mark.parametrize("parallel", ["fsdp", "hsdp"])
def test_moe_on_two_sharded_ranks_matches_one_process(tmp_path, parallel):
    """MoE (router biases balanced on the loads summed over the ranks); hsdp with shard groups of one rank
    replicated twice, shortcut layers, PLE and activation checkpointing (the recomputed forward must not count
    the loads again)."""
    model, extra = MOE, {}
    if parallel == "hsdp":  # and shortcut layers (each with two dense MLPs) with per-layer embeddings
        model = {**MOE, "layer_type": "shortcut", "dense_hidden": 64, "per_layer": {"kind": "ple"}}
        extra = {"shard_degree": 1, "activation_checkpointing": True}
    data = run_data(tmp_path, model, parallel=parallel, **extra)
    reference = train_here(tmp_path, data)
    run_dir = train_on_ranks(tmp_path, data, parallel)
    assert_same_run(run_dir, reference, steps=6)
    assert pd.read_parquet(reference / "metrics.parquet")["grad_norm"].gt(0.5).any()  # clipping took part
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.parquet", "run.json",
                                                          "status.json"]


def test_ngram_tables_in_the_table_optimizer_stay_replicated(tmp_path):
    """NE with the sparse table optimizer: the tables outside FSDP, their row gradients all-reduced; the
    clipping norm spans the sharded dense gradients and the tables' rows. 17 evaluation windows: rank 0 gets
    three batches, rank 1 two (and one idle forward, for FSDP's gathers)."""
    data = run_data(tmp_path, NGRAM, parallel="fsdp", table_optimizer="sparse", eval_tokens=17 * 32)
    reference = train_here(tmp_path, data)
    assert_same_run(train_on_ranks(tmp_path, data, "fsdp"), reference, steps=6)


def test_plne_mla_shortcut_with_checkpointing_and_resume(tmp_path, capfd, monkeypatch):
    """NE and PLNE (their N-gram tables sharded as ordinary parameters: table optimizer adamw), MLA and
    shortcut layers under fsdp with activation checkpointing; then the run resumes on two ranks from its step-3
    checkpoint and ends where the uninterrupted run did."""
    model = {**NGRAM, "layer_type": "shortcut", "attention": "mla",
             "per_layer": {"kind": "plne", "ngram": {"n": 2, "k": 2, "ratio": 1.0}}}
    try:
        data = run_data(tmp_path, model, parallel="fsdp", activation_checkpointing=True)
    except ConfigError as exc:
        pytest.fail(f"the test's model section is out of date: {exc}")
    reference = train_here(tmp_path, data)
    run_dir = train_on_ranks(tmp_path, data, "fsdp")
    assert_same_run(run_dir, reference, steps=6)
    finished = last_checkpoint(run_dir)

    # Resume: drop the final checkpoint, mark the run interrupted at step 3, train again on two ranks.
    shutil.rmtree(rundir.list_checkpoints(run_dir)[-1][1])  # the sharded checkpoint's folder
    rundir.write_status(run_dir, "interrupted", step=3, total_steps=6)
    monkeypatch.setenv("EMBSCALE_PROGRESS", "plain")  # the ranks log the step they resume from
    capfd.readouterr()
    train_on_ranks(tmp_path, data, "fsdp")
    assert f"resuming run {run_dir.name} from step 3" in capfd.readouterr().err
    resumed = last_checkpoint(run_dir)
    for key, value in finished["model"].items():
        assert torch.equal(resumed["model"][key], value), key  # same ranks, same order of sums: bit for bit
    assert_same_run(run_dir, reference, steps=6)


def test_parallel_fields_are_validated_and_opt_in():
    base = {"steps": 1, "seq_len": 32}
    plain = RunConfig.from_dict({"model": MOE, "training": base})
    assert "parallel" not in plain.identity()["training"]  # existing run ids unchanged
    sharded = RunConfig.from_dict({"model": MOE, "training": {**base, "parallel": "fsdp"}})
    assert sharded.identity()["training"]["parallel"] == "fsdp" and sharded.run_id != plain.run_id
    for fields, field in (({"parallel": "zero3"}, "parallel"), ({"shard_degree": 2}, "shard_degree"),
                          ({"parallel": "hsdp", "shard_degree": -1}, "shard_degree"),
                          ({"activation_checkpointing": "yes"}, "activation_checkpointing")):
        with pytest.raises(ConfigError) as info:
            TrainingConfig(**base, **fields)
        assert info.value.field == field
    hsdp = TrainingConfig(**base, parallel="hsdp", shard_degree=4)
    assert mesh_shape(hsdp, world_size=8, ranks_per_node=8) == (2, 4)
    assert mesh_shape(TrainingConfig(**base, parallel="hsdp"), world_size=16, ranks_per_node=8) == (2, 8)
    assert mesh_shape(TrainingConfig(**base, parallel="fsdp"), world_size=8, ranks_per_node=4) == (1, 8)
    with pytest.raises(ConfigError, match="do not divide"):
        mesh_shape(TrainingConfig(**base, parallel="hsdp", shard_degree=3), world_size=8, ranks_per_node=8)
    with pytest.raises(ConfigError, match="hsdp"):
        mesh_shape(TrainingConfig(**base, parallel="fsdp", shard_degree=2), world_size=8, ranks_per_node=8)


def test_activation_checkpointing_keeps_gradients_and_counts_loads_once():
    """A checkpointed MoE model (one process) gets the same gradients as without checkpointing, its blocks'
    recomputation in the backward does run, and the MoE load counters count each token once."""
    from embscale.models.config import ModelConfig
    from embscale.models.model import build_model
    from embscale.training.parallelize import parallelize

    cfg = ModelConfig(**{**MOE, "vocab_size": 64, "eos_token_id": 0})
    torch.manual_seed(0)
    plain = build_model(cfg)
    checkpointed = build_model(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    parallelize(checkpointed, None, TrainingConfig(steps=1, seq_len=32, activation_checkpointing=True))
    moe_forwards = {id(plain): 0, id(checkpointed): 0}
    for model in (plain, checkpointed):
        def count(*_: object, key: int = id(model)) -> None:
            moe_forwards[key] += 1

        model.moe_layers()[0].register_forward_pre_hook(count)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for model in (plain, checkpointed):
        out = model(ids, ids)
        (out.loss + out.aux_loss).backward()
    assert moe_forwards == {id(plain): 1, id(checkpointed): 2}  # the backward recomputed the block
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(plain.router_load_counts(), checkpointed.router_load_counts(), strict=True):
        assert torch.equal(a, b) and int(a.sum()) > 0


def test_hsdp_on_four_ranks_resumes_on_two(tmp_path, capfd, monkeypatch):
    """hsdp on four ranks (two shard groups of two ranks, replicated), then, its newest checkpoint dropped, the
    run resumes on two ranks (one shard group) from the four ranks' step-3 sharded checkpoint (DCP reshards it)
    and continues the curve of one process."""
    data = run_data(tmp_path, MOE, parallel="hsdp", shard_degree=2, batch_tokens=1024)
    reference = train_here(tmp_path, data)
    run_dir = train_on_ranks(tmp_path, data, "hsdp", world_size=4)
    assert_same_run(run_dir, reference, steps=6)
    (_, written_at_3), (_, final) = rundir.list_checkpoints(run_dir)
    assert rundir.read_manifest(written_at_3)[0]["world_size"] == 4

    shutil.rmtree(final)  # the sharded checkpoint's folder
    rundir.write_status(run_dir, "interrupted", step=3, total_steps=6)
    monkeypatch.setenv("EMBSCALE_PROGRESS", "plain")
    capfd.readouterr()
    train_on_ranks(tmp_path, data, "hsdp", world_size=2)
    assert f"resuming run {run_dir.name} from step 3" in capfd.readouterr().err
    assert rundir.read_manifest(rundir.list_checkpoints(run_dir)[-1][1])[0]["world_size"] == 2
    assert_same_run(run_dir, reference, steps=6)
