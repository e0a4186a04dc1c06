"""A sharded run builds its model without a whole copy on every rank (training/parallelize.py
``build_sharded_model``), on CPU with gloo ranks started by ``torch.multiprocessing``: each rank runs the trainer's
own :meth:`Trainer.build` and then checks, against the single-process trainer's model built in this process with
the same config, that

- only global rank 0 held a whole initialised model (``Trainer.sharded_build.whole_copy_bytes``, the bytes of its
  copy's tensors, equal to the single-process model's), and that no rank had any of the sharded model's tensors
  materialised before it was sharded (``unsharded_bytes``: measured on the model's tensors right before
  ``parallelize``; 0 means every one was on ``meta``);
- every parameter equals, bit for bit, the single-process initialisation: FSDP shards gathered whole, row-sharded
  N-gram tables as their own row range of the whole table (and never the whole of it), replicated tables whole;
- every buffer (the MoE router biases, persistent, and load counters, not) equals the single-process one, the
  tables keep their ``sparse_grads`` list, and the torch RNG is where the single-process build left it.

Models: MoE with shortcut layers and PLE under ``fsdp`` on two ranks; NE + PLNE with the tables in the table
optimizer sharded by rows under ``hsdp`` on four ranks (two shard groups of two: each rank's rows scattered to both
replicas), in scatter rounds of a few rows so a table takes several; NE with replicated tables (``sparse``) under
``fsdp`` on two ranks. The scatter of a table's rows alone on uneven row counts (shorter and empty ranges).
Training after such a build is tests/test_fsdp.py's and tests/test_table_shard.py's."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from test_fsdp import (
    MOE,
    NGRAM,
    RANKS_TIMEOUT_S,
    environment,  # noqa: F401  (autouse: a corpus, a shared cache, one thread)
    run_data,
)
from test_table_shard import PLNE

from embscale.training import table_shard
from embscale.training.config import RunConfig
from embscale.training.distributed import Distributed
from embscale.training.parallelize import materialised_bytes
from embscale.training.trainer import Trainer


def single_process_reference(tmp_path: Path, data: dict) -> Path:
    """The single-process trainer's model right after :meth:`Trainer.build` (parameters, buffers, RNG), saved
    for the ranks to compare with."""
    run_cfg = RunConfig.from_dict(data)
    trainer = Trainer.build(run_cfg, tmp_path / "single", True, Distributed("cpu"))
    reference = {"parameters": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
                 "buffers": {k: v.clone() for k, v in trainer.model.named_buffers()},
                 "rng": torch.get_rng_state(), "bytes": materialised_bytes(trainer.model)}
    path = tmp_path / "reference.pt"
    torch.save(reference, path)
    return path


def build_rank(rank: int, world_size: int, init_file: str, data: dict, reference_path: str,
               round_bytes: int) -> None:
    """One rank: the trainer's build, then the comparisons of the module docstring."""
    from torch.distributed.tensor import DTensor

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    table_shard.SCATTER_ROUND_BYTES = round_bytes  # several scatter rounds per table
    try:
        reference = torch.load(reference_path, weights_only=True)
        run_cfg = RunConfig.from_dict(data)
        trainer = Trainer.build(run_cfg, Path(data["output"]["root"]) / "run", True, Distributed("cpu"))
        built = trainer.sharded_build
        assert trainer.sharded and built is not None
        assert built.unsharded_bytes == 0, built  # every tensor of the model being sharded was on meta
        assert built.whole_copy_bytes == (reference["bytes"] if rank == 0 else 0), built
        assert 0 < built.local_bytes < reference["bytes"], built
        model = trainer.model
        tables = {f"{name}.weight": table for name, table in table_shard.row_sharded_tables(model).items()}
        for name, param in model.named_parameters():
            want = reference["parameters"][name]
            if isinstance(param, DTensor):
                assert not param.to_local().is_meta
                assert torch.equal(param.full_tensor(), want), name
            elif name in tables:
                table = tables[name]
                assert param.shape[0] == table.row_stop - table.row_start < want.shape[0], name
                assert torch.equal(param, want[table.row_start:table.row_stop]), name
                assert param.sparse_grads == [], name
            else:
                assert torch.equal(param, want), name
        if run_cfg.training.table_sharding == "rows":
            assert tables and all(t.rows_per_shard * t.width * 4 > 2 * round_bytes for t in tables.values())
        buffers = dict(model.named_buffers())
        assert buffers.keys() == reference["buffers"].keys()
        for name, want in reference["buffers"].items():
            assert torch.equal(buffers[name], want), name
        assert torch.equal(torch.get_rng_state(), reference["rng"])
        del trainer, model, tables, buffers
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


CASES = {
    "moe_fsdp2": ({**MOE, "layer_type": "shortcut", "dense_hidden": 64, "per_layer": {"kind": "ple"}},
                  {"parallel": "fsdp"}, 2),
    "plne_rows_hsdp2x2": (PLNE, {"parallel": "hsdp", "shard_degree": 2, "batch_tokens": 1024,
                                 "table_optimizer": "dense", "table_sharding": "rows"}, 4),
    "ne_replicated_fsdp2": (NGRAM, {"parallel": "fsdp", "table_optimizer": "sparse"}, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_build_holds_one_whole_model_and_its_init(tmp_path, case):
    model, training, world_size = CASES[case]
    data = run_data(tmp_path, model, **training)
    reference = single_process_reference(tmp_path, data)
    data = {**data, "output": {"sweep": "f", "root": str(tmp_path / "ranks")}}
    round_bytes = 4096  # 32 to 128 rows of the tables: several rounds per table
    context = torch.multiprocessing.spawn(build_rank, args=(world_size, str(tmp_path / "init"), data, str(reference),
                                                            round_bytes), nprocs=world_size, join=False)
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} ranks did not finish in {RANKS_TIMEOUT_S} s")


def scatter_rank(rank: int, world_size: int, init_file: str) -> None:
    """One rank: tables of uneven row counts (a shorter last range, empty ranges) cut on ``meta`` over shard groups
    of four ranks (fsdp) and of two (hsdp, 2 x 2), materialised and filled by :func:`scatter_table_rows` in rounds
    of two rows."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        for shape, names in (((4,), ("dp_shard",)), ((2, 2), ("dp_replicate", "dp_shard"))):
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
            groups = table_shard.build_shard_groups(mesh)
            for rows in (13, 10, 7, 2):
                whole = torch.arange(rows * 3, dtype=torch.float32).view(rows, 3)
                table = table_shard.RowShardedTable(torch.empty(rows, 3, device="meta"), groups, mesh)
                assert table.weight.is_meta
                table.to_empty(device="cpu")
                table_shard.scatter_table_rows(table, whole.clone() if rank == 0 else None, round_bytes=2 * 3 * 4)
                start, stop = table_shard.row_range(rows, shape[-1], rank % shape[-1])
                assert (table.row_start, table.row_stop) == (start, stop)
                assert torch.equal(table.weight, whole[start:stop]), (shape, rows, rank)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_scatter_fills_uneven_row_ranges(tmp_path):
    """13, 10, 7 and 2 rows over shard groups of 4 and 2 ranks: shorter last ranges and empty ones (2 rows over
    4), several rounds each; every rank ends with exactly its rows of the whole table."""
    world_size = 4
    context = torch.multiprocessing.spawn(scatter_rank, args=(world_size, str(tmp_path / "init")),
                                          nprocs=world_size, join=False)
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} ranks did not finish in {RANKS_TIMEOUT_S} s")
