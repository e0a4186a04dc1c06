"""DDP on CPU: two gloo processes under torchrun train the same run as one process with the same global
batch (the MoE load counts summed over ranks; the N-gram tables' sparse gradients exchanged and averaged for
the table optimizer), to float tolerance; only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_data import write_text_corpus

from embscale.base.rundir import list_checkpoints
from embscale.kernels.ngram import PAD_ROW, SparseRowGrad
from embscale.kernels.table_optim import merge_row_grads
from embscale.training.config import RunConfig
from embscale.training.table_ddp import all_reduce_table_grads, exclude_from_ddp
from embscale.training.trainer import train_run

ROOT = Path(__file__).resolve().parents[1]
# Run under torchrun instead of ``-m embscale train``: every rank saves its N-gram tables at each evaluation (the
# last one follows the last optimizer step), so the test can see that the ranks stayed in sync; and a table
# with a dense .grad fails the rank (DDP would otherwise all-reduce a table-sized zero gradient every step).
SAVE_TABLES_SCRIPT = """
import os, sys
import torch
import embscale.training.trainer as train
from embscale.kernels.table_optim import TableAdamW
from embscale.training.config import RunConfig

original = train.Trainer.evaluate
original_step = TableAdamW.step


def step(self, closure=None):
    for group in self.param_groups:
        for param in group["params"]:
            assert param.grad is None, "DDP gave an N-gram table a dense gradient"
    return original_step(self, closure)


def evaluate(self):
    tables = {name: p.detach().clone() for name, p in self.model.named_parameters() if name.endswith("tables.weight")}
    torch.save(tables, os.path.join(sys.argv[2], f"tables_rank{self.dist.rank}.pt"))
    return original(self)


train.Trainer.evaluate = evaluate
TableAdamW.step = step
summary = train.train_run(RunConfig.from_yaml(sys.argv[1]))
sys.exit(train.EXIT_CODES.get(summary["state"], 1))
"""


def train_single_then_ddp(tmp_path: Path, data: dict, script: Path | None = None
                          ) -> tuple[dict, Path, subprocess.CompletedProcess]:
    """Train ``data`` in this process (one thread) under ``<tmp>/single``, then on two gloo ranks under
    ``<tmp>/ddp``; returns the single run's summary, the DDP run's folder and torchrun's result."""
    write_text_corpus(tmp_path / "train", 40, seed=1, sentences=40)
    write_text_corpus(tmp_path / "val", 3, seed=2, sentences=40)
    data["output"]["root"] = str(tmp_path / "single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_run(RunConfig.from_dict(data))
    finally:
        torch.set_num_threads(threads)

    data["output"]["root"] = str(tmp_path / "ddp")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    target = [str(script), str(run_file), str(tmp_path)] if script else ["-m", "embscale", "train", str(run_file)]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             *target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return single, tmp_path / "ddp" / "d" / RunConfig.from_dict(data).run_id, result


def assert_same_curves(got: pd.DataFrame, expected: pd.DataFrame, steps: int) -> None:
    assert got["step"].tolist() == list(range(1, steps + 1))
    np.testing.assert_allclose(got["train_loss"], expected["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], expected["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(got["val_held_loss"], expected["val_held_loss"], rtol=1e-5)


def corpus_section(tmp_path: Path) -> dict:
    return {"corpus": str(tmp_path / "train"), "val_paths": {"held": str(tmp_path / "val")}, "vocab_size": 300}


def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    data = {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 4, "top_k": 2, "expert_hidden": 32,
                  "n_shared_experts": 1, "max_seq_len": 64},
        # 256 tokens a step: 2 micro-batches of 4 x 32 on one process, 1 on each of two ranks.
        "training": {"steps": 8, "batch_tokens": 256, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2,
                     "eval_every": 4, "eval_tokens": 512, "checkpoint_every": 4, "device": "cpu"},
        "data": corpus_section(tmp_path),
        "output": {"sweep": "d"},
    }
    single, run_dir, result = train_single_then_ddp(tmp_path, data)
    expected = pd.read_parquet(Path(single["run_dir"]) / "metrics.parquet")
    got = pd.read_parquet(run_dir / "metrics.parquet")
    assert_same_curves(got, expected, steps=8)
    assert got["moe_imbalance"].ge(1).all()  # rank 0's share of the batch
    # One writer: a single set of run files, both ranks' summary lines show one run.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.parquet", "run.json",
                                                          "status.json"]
    assert result.stdout.count("completed: run") == 1


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_table_optimizer_on_two_gloo_ranks_matches_one_process(tmp_path, monkeypatch, mode):
    """The N-gram tables stay out of DDP's reducer; their sparse gradients are averaged over the ranks
    before clipping, so the curves, the final tables and the table optimizer's state match one process, and
    both ranks end with the same tables."""
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the trainer on CPU runs the PyTorch twins
    data = {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "dense_hidden": 64, "max_seq_len": 64,
                  "ngram": {"n": 3, "k": 2, "ratio": 1.0}},
        # 512 tokens a step: 4 micro-batches of 4 x 32 on one process, 2 on each rank (no_sync on the first);
        # grad_clip low enough to clip, so the clipping norm must include the exchanged gradients.
        "training": {"steps": 6, "batch_tokens": 512, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2,
                     "eval_every": 3, "eval_tokens": 512, "checkpoint_every": 3, "device": "cpu",
                     "grad_clip": 0.5, "table_optimizer": mode},
        "data": corpus_section(tmp_path),
        "output": {"sweep": "d"},
    }
    script = tmp_path / "save_tables.py"
    script.write_text(SAVE_TABLES_SCRIPT)
    single, run_dir, _ = train_single_then_ddp(tmp_path, data, script)
    expected = pd.read_parquet(Path(single["run_dir"]) / "metrics.parquet")
    got = pd.read_parquet(run_dir / "metrics.parquet")
    assert_same_curves(got, expected, steps=6)
    assert (expected["grad_norm"] > 0.5).any()  # clipping took part

    rank_tables = [torch.load(tmp_path / f"tables_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert rank_tables[0].keys() == rank_tables[1].keys() and rank_tables[0]
    for name in rank_tables[0]:
        assert torch.equal(rank_tables[0][name], rank_tables[1][name]), name
    want = torch.load(list_checkpoints(Path(single["run_dir"]))[-1][1], weights_only=True)
    have = torch.load(list_checkpoints(run_dir)[-1][1], weights_only=True)
    for name in rank_tables[0]:
        torch.testing.assert_close(have["model"][name], want["model"][name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rank_tables[0][name], have["model"][name], rtol=0, atol=0)
    want_state, have_state = want["table_optimizer"]["state"][0], have["table_optimizer"]["state"][0]
    assert want_state["step"] == have_state["step"] == 6
    for key in ("exp_avg", "exp_avg_sq") + (("row_step",) if mode == "sparse" else ()):
        torch.testing.assert_close(have_state[key], want_state[key], rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# The exchange itself, in a one-process gloo group
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture()
def one_process_group(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # merge with the PyTorch twin, as the trainer on CPU
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def padded_grad(generator: torch.Generator, num_rows: int, d: int, count: int, padding: int) -> SparseRowGrad:
    rows = torch.randperm(num_rows, generator=generator)[:count].sort().values
    values = torch.randn(count, d, generator=generator)
    return SparseRowGrad(rows=torch.cat([rows, torch.full((padding,), PAD_ROW)]),
                         values=torch.cat([values, torch.zeros(padding, d)]))


def test_exchange_in_one_process_equals_the_local_merge(one_process_group):
    generator = torch.Generator().manual_seed(3)
    table = torch.nn.Parameter(torch.zeros(50, 4))
    table.sparse_grads = [padded_grad(generator, 50, 4, count=9, padding=3) for _ in range(3)]
    untouched = torch.nn.Parameter(torch.zeros(20, 4))  # no pending gradient: stays without one
    expected = merge_row_grads(list(table.sparse_grads))
    pending = table.sparse_grads

    all_reduce_table_grads([table, untouched])
    assert table.sparse_grads is pending and len(pending) == 1  # replaced in place
    got = pending[0]
    real = expected.rows != PAD_ROW
    assert torch.equal(got.rows, expected.rows[real])  # compacted: the distinct rows, no padding
    assert torch.equal(got.values, expected.values[real])
    assert not getattr(untouched, "sparse_grads", None)


def test_tables_are_ignored_by_ddp_under_every_name(one_process_group):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = torch.nn.Embedding(10, 4)
            self.alias = self.tables  # the same table under a second name
            self.projection = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.projection(x)  # like a sparse table: no .grad for tables.weight, ever

    model = Model()
    assert exclude_from_ddp(model, [model.tables.weight]) == ["tables.weight", "alias.weight"]
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for _ in range(2):  # a parameter DDP waits for would fail the second iteration's forward
        ddp(torch.randn(2, 4)).sum().backward()
    assert model.tables.weight.grad is None and model.projection.weight.grad is not None


def exchange_on_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of the two-rank exchange test: table ``a`` with a different number of touched rows on each
    rank, table ``b`` with a gradient on rank 0 only; saves its inputs and what the exchange left."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(100 + rank)
        a = torch.nn.Parameter(torch.zeros(40, 3))
        b = torch.nn.Parameter(torch.zeros(30, 3))
        a.sparse_grads = [padded_grad(generator, 40, 3, count=5 + 7 * rank, padding=2) for _ in range(2)]
        b.sparse_grads = [padded_grad(generator, 30, 3, count=6, padding=1)] if rank == 0 else []
        local = {"a": merge_row_grads(list(a.sparse_grads)).to_dense(40),
                 "b": b.sparse_grads[0].to_dense(30) if b.sparse_grads else torch.zeros(30, 3)}
        all_reduce_table_grads([a, b])
        torch.save({"local": local, "a": (a.sparse_grads[0].rows, a.sparse_grads[0].values),
                    "b": (b.sparse_grads[0].rows, b.sparse_grads[0].values)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_exchange_on_two_ranks_averages_and_agrees(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the spawned ranks merge with the PyTorch twin
    torch.multiprocessing.spawn(exchange_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, num_rows in (("a", 40), ("b", 30)):
        rows, values = results[0][name]
        assert torch.equal(rows, results[1][name][0]) and torch.equal(values, results[1][name][1])  # bitwise
        real = rows != PAD_ROW
        assert bool((rows[real].diff() > 0).all()) and bool((values[~real] == 0).all())
        want = (results[0]["local"][name] + results[1]["local"][name]) / 2
        touched = (results[0]["local"][name] != 0).any(1) | (results[1]["local"][name] != 0).any(1)
        assert torch.equal(rows[real], touched.nonzero().flatten())  # the union of the ranks' rows
        torch.testing.assert_close(SparseRowGrad(rows, values).to_dense(num_rows), want)
