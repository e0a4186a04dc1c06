"""N-gram tables sharded by rows over the ranks (``training.table_sharding: rows``, training/table_shard.py), on
CPU with gloo ranks started by ``torch.multiprocessing``.

The lookup: an NE + PLNE model whose tables are cut into row shards over 2 and 4 ranks (fsdp-like, one shard
group) and over 2 x 2 ranks (hsdp-like: two shard groups, replicated), each rank taking its part of a global
batch, gives the logits of one process on the whole batch (rtol 1e-5, atol 1e-6: the rows are copied, but one
process's fused lookup adds and scales in another order) and, after :func:`reduce_row_grads`, each rank's table
gradient equals rows ``[start, stop)`` of one process's gradient of the global batch (rtol 1e-5, atol 1e-7: the
per-row sums are added in another order over the ranks); no rank holds a whole table, and every gradient row a
rank holds is one of its own.

Training: an NE model with the tables row-sharded under fsdp on two ranks trains as one process does with each
table optimizer (dense, sparse, compact moments), and NE + PLNE under hsdp on four ranks (two shard groups of two)
too, then resumes on two ranks from the four ranks' checkpoint; tolerances those of tests/test_fsdp.py (losses
rtol 1e-5, gradient norms rtol 1e-4, parameters and moments rtol 1e-4, moments atol 1e-6) except the parameters'
atol, 5e-5 (:data:`PARAMETER_ATOL`). Compact moments are compared on NE only: PLNE's per-layer tables get
gradients near 1e-6, whose bf16 first moment flips an ulp under a reordered sum and moves a parameter by ~7e-5
(seen at 4 ranks), rounding, not a different update. The PLNE run at four ranks uses the dense table optimizer:
with the lazy (sparse) one its gradient norm at step 5 is 1.1e-4 (relative) from one process's, past the 1e-4
tolerance, where the replicated tables (``table_sharding: replicate``, the path this module does not touch) are
5.8e-5 off on the same run: that model is sensitive to summation order whichever way the tables live. The single-process
reference is trained in this process, with the same config (one process never shards)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback

import pytest
import torch
from test_fsdp import (
    NGRAM,
    RANKS_TIMEOUT_S,
    assert_same_run,
    environment,  # noqa: F401  (autouse: a corpus, a shared cache, one thread)
    last_checkpoint,
    run_data,
    train_here,
    train_on_ranks,
)

from embscale.base import rundir
from embscale.base.errors import ConfigError
from embscale.models.config import ModelConfig
from embscale.models.model import build_model
from embscale.training.config import TrainingConfig
from embscale.training.table_shard import reduce_row_grads, row_range, shard_table_rows

PLNE = {**NGRAM, "layer_type": "shortcut", "per_layer": {"kind": "plne", "ngram": {"n": 2, "k": 2, "ratio": 1.0}}}
VOCAB, EOS = 97, 3
# Parameters after six steps: the row-sharded lookup cannot take one process's fused kernel (it reads a whole
# table), so the embedding is summed in another order (1e-7 apart); Adam's step on elements with a near-zero second
# moment (e.g. LM-head rows of tokens never targeted) turns that into up to ~1.5e-5 of a parameter (seen on the
# LM head, lr 1e-2). Everything else keeps tests/test_fsdp.py's tolerances.
PARAMETER_ATOL = 5e-5


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**PLNE, "vocab_size": VOCAB, "eos_token_id": EOS}))
    model.set_ngram_backend("torch", sparse_grad=True)
    return model


def global_batch() -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(5))
    ids[:, 7] = EOS  # documents restart mid-sequence
    return ids


def lookup_rank(rank: int, world_size: int, init_file: str, shape: tuple[int, ...]) -> None:
    """One rank: the reference on the whole batch, then the row-sharded model on this rank's sequences."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        ids = global_batch()
        reference = tiny_model()
        out = reference(ids, ids)
        out.loss.backward()
        want = {name: (m.tables.weight.detach().clone(), m.tables.weight.sparse_grads[0].to_dense(
            m.tables.weight.shape[0])) for name, m in reference.named_modules() if hasattr(m, "row_ids")}

        model = tiny_model()
        names = ("dp_replicate", "dp_shard") if len(shape) == 2 else ("dp_shard",)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        tables = shard_table_rows(model, mesh)
        assert len(tables) == len(want)
        model.set_ngram_backend("torch", sparse_grad=True)
        mine = ids.chunk(world_size)[rank]
        sharded_out = model(mine, mine)
        # the same rows; one process's fused lookup sums and scales in another order (``ngram_embed``'s addmm)
        torch.testing.assert_close(sharded_out.logits, out.logits.chunk(world_size)[rank], rtol=1e-5, atol=1e-6)
        sharded_out.loss.backward()
        reduce_row_grads(model.ngram_tables(), tables[0].groups)
        shard_size, shard_rank = shape[-1], rank % shape[-1]
        for name, module in model.named_modules():
            if not hasattr(module, "row_ids"):
                continue
            table = module.tables
            weight, grad = want[name]
            start, stop = row_range(weight.shape[0], shard_size, shard_rank)
            assert (table.row_start, table.row_stop) == (start, stop)
            assert table.weight.numel() == (stop - start) * weight.shape[1] < weight.numel()  # never a whole table
            assert torch.equal(table.weight, weight[start:stop])
            (pending,) = table.weight.sparse_grads
            real = pending.rows[pending.rows != 2**63 - 1]
            assert real.numel() > 0 and int(real.max()) < stop - start  # only its own rows
            torch.testing.assert_close(pending.to_dense(stop - start), grad[start:stop], rtol=1e-5, atol=1e-7,
                                       msg=name)
        with torch.no_grad():  # an evaluation forward (no autograd graph) gathers the same rows
            torch.testing.assert_close(model(mine).logits, sharded_out.logits, rtol=0, atol=0)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("shape", [(2,), (4,), (2, 2)], ids=["fsdp2", "fsdp4", "hsdp2x2"])
def test_row_sharded_lookup_matches_one_process(tmp_path, shape):
    world_size = 1
    for size in shape:
        world_size *= size
    context = torch.multiprocessing.spawn(lookup_rank, args=(world_size, str(tmp_path / "init"), shape),
                                          nprocs=world_size, join=False)
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} ranks did not finish in {RANKS_TIMEOUT_S} s")


def test_row_ranges_cover_the_table():
    for rows, shards in ((10, 3), (7, 4), (2, 4), (4099, 8)):
        ranges = [row_range(rows, shards, r) for r in range(shards)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_table_sharding_is_validated_and_opt_in():
    from embscale.training.config import RunConfig

    base = {"steps": 1, "seq_len": 32}
    plain = RunConfig.from_dict({"model": NGRAM, "training": {**base, "parallel": "fsdp", "table_optimizer": "dense"}})
    assert "table_sharding" not in plain.identity()["training"]  # existing run ids unchanged
    rows = RunConfig.from_dict({"model": NGRAM, "training": {**base, "parallel": "fsdp", "table_optimizer": "dense",
                                                             "table_sharding": "rows"}})
    assert rows.identity()["training"]["table_sharding"] == "rows" and rows.run_id != plain.run_id
    for fields in ({"table_sharding": "cols"}, {"table_sharding": "rows", "table_optimizer": "dense"},
                   {"table_sharding": "rows", "parallel": "fsdp"}):
        with pytest.raises(ConfigError) as info:
            TrainingConfig(**base, **fields)
        assert info.value.field == "table_sharding"


@pytest.mark.parametrize("optimizer, moments", [("dense", "full"), ("sparse", "full"), ("dense", "compact")])
def test_ne_with_row_sharded_tables_trains_as_one_process(tmp_path, optimizer, moments):
    """NE, fsdp on two ranks, the tables row-sharded and trained by the table optimizer; clipping takes part."""
    data = run_data(tmp_path, NGRAM, parallel="fsdp", table_optimizer=optimizer, table_optimizer_moments=moments,
                    table_sharding="rows")
    reference = train_here(tmp_path, data)
    assert_same_run(train_on_ranks(tmp_path, data, "rows"), reference, steps=6, parameter_atol=PARAMETER_ATOL)


def test_plne_hsdp_rows_on_four_ranks_resumes_on_two(tmp_path, capfd, monkeypatch):
    """NE + PLNE, hsdp on four ranks (two shard groups of two, the rows' gradients averaged over the replicas),
    dense table optimizer; the newest checkpoint dropped, the run resumes on two ranks from the four ranks'
    step-3 DCP checkpoint (every table and per-row state saved as two row ranges, once each, loaded into the two
    ranks' rows) and ends where one process does."""
    data = run_data(tmp_path, PLNE, parallel="hsdp", shard_degree=2, batch_tokens=1024, table_optimizer="dense",
                    table_sharding="rows")
    reference = train_here(tmp_path, data)
    run_dir = train_on_ranks(tmp_path, data, "hsdp", world_size=4)
    assert_same_run(run_dir, reference, steps=6, parameter_atol=PARAMETER_ATOL)

    final = rundir.list_checkpoints(run_dir)[-1][1]
    saved = json.loads((final / "dcp_metadata.json").read_text())["tensors"]
    tables = [key for key in saved if key.endswith("tables.weight")]
    row_states = [key for key in saved if key.startswith("table_optimizer/state/") and key.endswith("/exp_avg")]
    assert tables and len(row_states) == len(tables)
    for key in tables + row_states:  # each rank pair's rows once, by their owners
        rows = saved[key]["size"][0]
        assert [c["offsets"][0] for c in saved[key]["chunks"]] == [0, -(-rows // 2)], key
    shutil.rmtree(final)
    assert last_checkpoint(run_dir)["step"] == 3
    rundir.write_status(run_dir, "interrupted", step=3, total_steps=6)
    monkeypatch.setenv("EMBSCALE_PROGRESS", "plain")
    capfd.readouterr()
    train_on_ranks(tmp_path, data, "hsdp", world_size=2)
    assert f"resuming run {run_dir.name} from step 3" in capfd.readouterr().err
    assert_same_run(run_dir, reference, steps=6, parameter_atol=PARAMETER_ATOL)
