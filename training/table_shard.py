"""N-gram tables sharded by rows over the data-parallel ranks (``training.table_sharding: rows``).

Under ``training.parallel`` ``fsdp`` / ``hsdp`` with a table optimizer (``training.table_optimizer`` dense /
sparse), :func:`shard_table_rows` (called by :func:`embscale.training.parallelize.parallelize`) replaces the
``tables`` module of every :class:`~embscale.models.ngram.NgramEmbedding` of a built model (the N-gram
Embedding's and each PLNE slot's) by a :class:`RowShardedTable`: rank ``r`` of a shard group of ``W`` ranks keeps
rows ``[r * ceil(R / W), (r + 1) * ceil(R / W))`` of the concatenated table (``R`` rows; the last range may be
shorter or empty) as its ``weight``, and nothing else of the table. The model's math (the hash, the sum of the
sub-tables through the projection, the token row, the amplification) stays in the model code: only the gather
of rows is replaced, so the parameters of a sharded run are those of one process.

A lookup (:class:`_ShardedLookup`, an autograd function), on every rank of the shard group at once:

1. the rank's row ids ``(..., S)`` are made distinct (``torch.unique``, sorted, so each owner's rows are one
   contiguous run), counted per owner, and the counts exchanged (``all_to_all_single`` of ``W`` int64);
2. the distinct rows go to their owners (``all_to_all_single``, uneven splits), each owner reads its rows from
   its shard and sends them back the same way; the rank expands them to its lookups.

Its backward does the reverse: each rank sums its lookups' output gradients per distinct row (deterministic,
:func:`embscale.kernels.ngram.sparse_row_grad`), sends the sums to the rows' owners (the same splits,
reversed), and each owner reduces what it received into a :class:`~embscale.kernels.ngram.SparseRowGrad` over its
own rows (local row numbers), appended to ``weight.sparse_grads`` as the model's fused kernel does for a whole
table. No rank ever holds a whole table or a table-sized gradient: bytes sent per rank and lookup call are
``W * 8`` (counts) plus ``U_r * 8`` (row ids) plus ``U_r * d * 4`` forward and the same backward (``U_r`` the
rank's distinct rows that live on other ranks; its own rows are exchanged with itself, no wire).

Per optimizer step, :func:`reduce_row_grads` merges each shard's pending gradients (one per micro-batch),
divides them by the shard group's size (the mean over the ranks that FSDP's reduce-scatter takes of the dense
gradients) and, under ``hsdp``, averages the owned rows over the replicas of the shard
(:func:`embscale.training.table_ddp.all_reduce_table_grads` on the replicate group). ``TableAdamW`` then steps
only the local rows: its ``dense`` mode decays every local row (the whole table, shard by shard), ``sparse`` the
touched local rows, ``compact`` keeps its per-row second moment per local row. The clipping norm adds the
shards' squares over the shard group (:func:`embscale.training.parallelize.clip_sharded_gradients`).

Checkpoints: a sharded run's (:mod:`embscale.training.sharded_checkpoint`) holds each table and its per-row
optimizer states as a DTensor of the whole, rows sharded over the mesh's shard dimension (:func:`as_row_dtensor`),
so every owner writes its own rows and a resumed rank loads the rows it owns, whatever number of ranks saved them.
A single-file checkpoint (one process's) goes back in through :func:`local_table_state` /
:func:`local_table_optimizer_state`, which cut each rank's rows out of the full tensors.

The collectives use process groups of their own (one per shard group and per replicate group), so they never
interleave with FSDP's on the mesh's groups. A sharded run builds its model on the ``meta`` device on every rank
(:func:`embscale.training.parallelize.build_sharded_model`), so :func:`shard_table_rows` cuts meta rows; once
they are materialised, :func:`scatter_table_rows` fills them from the whole table, which only global rank 0 holds
(its initialisation), in rounds of at most :data:`SCATTER_ROUND_BYTES` per rank. A table cut from a real (not meta)
one keeps its rows' values and the whole table is freed once the shard is cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from embscale.kernels.ngram import SparseRowGrad, sparse_row_grad
from embscale.kernels.table_optim import merge_row_grads
from embscale.training.table_ddp import all_reduce_table_grads

ROW_STATE_KEYS = ("exp_avg", "exp_avg_sq", "row_step")  # TableAdamW's per-row states (dim 0 = table rows)
SCATTER_ROUND_BYTES = 16 * 2**20  # rows rank 0 sends each rank per round of scatter_table_rows


@dataclass(frozen=True)
class ShardGroups:
    """The process groups of row-sharded tables: this rank's shard group (``shard_ranks``, global ranks in
    mesh order, this rank at ``shard_rank``) and its replicate group (None under ``fsdp``)."""

    shard_group: dist.ProcessGroup
    shard_ranks: tuple[int, ...]
    shard_rank: int
    replicate_group: dist.ProcessGroup | None

    @property
    def shard_size(self) -> int:
        return len(self.shard_ranks)


def row_range(total_rows: int, shard_size: int, shard_rank: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a table of ``total_rows`` rows that shard ``shard_rank`` of
    ``shard_size`` owns, ``ceil(total_rows / shard_size)`` per shard, the last ones shorter or empty."""
    per = math.ceil(total_rows / shard_size)
    start = min(total_rows, shard_rank * per)
    return start, min(total_rows, start + per)


def build_shard_groups(mesh: Any) -> ShardGroups:
    """New process groups, one per shard group (a row of the mesh's ``dp_shard`` dimension) and, under ``hsdp``,
    one per replicate group (a column); every rank creates every group, in the same order (the collective
    ``new_group`` requires it)."""
    ranks = mesh.mesh.reshape(-1, mesh.mesh.shape[-1]).tolist()  # (replicate, shard)
    me = dist.get_rank()
    shard_group = replicate_group = None
    shard_ranks: tuple[int, ...] = ()
    for row in ranks:
        group = dist.new_group(row)
        if me in row:
            shard_group, shard_ranks = group, tuple(row)
    if len(ranks) > 1:
        for column in zip(*ranks, strict=True):
            group = dist.new_group(list(column))
            if me in column:
                replicate_group = group
    return ShardGroups(shard_group=shard_group, shard_ranks=shard_ranks, shard_rank=shard_ranks.index(me),
                       replicate_group=replicate_group)


class _ShardedLookup(torch.autograd.Function):
    """Rows of a row-sharded table for this rank's row ids; see the module docstring."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, table: RowShardedTable) -> torch.Tensor:
        groups, width = table.groups, weight.shape[1]
        flat = rows.reshape(-1).long()
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        owners = torch.div(unique, table.rows_per_shard, rounding_mode="floor")
        send = torch.bincount(owners, minlength=groups.shard_size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=groups.shard_group)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        requested = torch.empty(sum(recv_counts), dtype=torch.int64, device=weight.device)
        dist.all_to_all_single(requested, unique, recv_counts, send_counts, group=groups.shard_group)
        local = requested - table.row_start
        served = weight.detach().index_select(0, local)
        found = torch.empty(unique.numel(), width, dtype=weight.dtype, device=weight.device)
        dist.all_to_all_single(found, served, send_counts, recv_counts, group=groups.shard_group)
        ctx.save_for_backward(inverse, local)
        ctx.table, ctx.counts, ctx.distinct = table, (send_counts, recv_counts), unique.numel()
        return found.index_select(0, inverse).view(*rows.shape, width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        inverse, local = ctx.saved_tensors
        table, (send_counts, recv_counts), distinct = ctx.table, ctx.counts, ctx.distinct
        width = grad.shape[-1]
        grad = grad.reshape(-1, width).float()
        # per distinct row of this rank: inverse holds every index 0..distinct-1, so the sums come in that order
        sums = sparse_row_grad(inverse, grad).values[:distinct].contiguous() if distinct else grad[:0]
        received = torch.empty(local.numel(), width, dtype=torch.float32, device=grad.device)
        dist.all_to_all_single(received, sums, recv_counts, send_counts, group=table.groups.shard_group)
        if local.numel():
            owned = sparse_row_grad(local, received)
        else:
            owned = SparseRowGrad(rows=local.new_empty(0), values=received)
        pending = getattr(table.weight, "sparse_grads", None)
        if pending is None:
            table.weight.sparse_grads = [owned]
        else:
            pending.append(owned)
        return None, None, None


class RowShardedTable(nn.Module):
    """The rows ``[row_start, row_stop)`` of an N-gram table of ``num_rows`` rows (``weight``, a parameter of
    that many rows trained by the table optimizer), looked up for every rank of ``groups.shard_group`` together:
    called like ``nn.Embedding`` (row ids ``(..., S)`` into the whole table -> ``(..., S, d)``), on every rank of
    the shard group the same number of times. Its gradient goes to ``weight.sparse_grads`` (local row
    numbers)."""

    def __init__(self, full_weight: torch.Tensor, groups: ShardGroups, mesh: Any = None):
        super().__init__()
        self.groups = groups
        self.mesh = mesh  # the run's device mesh: its last dimension is the shard group (for checkpoints)
        self.num_rows, self.width = full_weight.shape
        self.rows_per_shard = math.ceil(self.num_rows / groups.shard_size)
        self.row_start, self.row_stop = row_range(self.num_rows, groups.shard_size, groups.shard_rank)
        self.weight = nn.Parameter(full_weight.detach()[self.row_start:self.row_stop].clone(),
                                   requires_grad=full_weight.requires_grad)
        self.weight.sparse_grads = []

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return _ShardedLookup.apply(self.weight, rows, self)

    def extra_repr(self) -> str:
        return (f"rows {self.row_start}:{self.row_stop} of {self.num_rows}, d={self.width}, shard "
                f"{self.groups.shard_rank} of {self.groups.shard_size}")


def shard_table_rows(model: nn.Module, mesh: Any) -> list[RowShardedTable]:
    """Replace the ``tables`` of every N-gram Embedding of ``model`` (built, not yet FSDP-sharded) by a
    :class:`RowShardedTable` over the shard groups of ``mesh``; a table shared by several modules stays shared.
    Returns the sharded tables."""
    from embscale.models.ngram import NgramEmbedding

    groups = build_shard_groups(mesh)
    sharded: dict[int, RowShardedTable] = {}
    for module in model.modules():
        if isinstance(module, NgramEmbedding) and isinstance(module.tables, nn.Embedding):
            whole = module.tables
            if id(whole) not in sharded:
                sharded[id(whole)] = RowShardedTable(whole.weight, groups, mesh)
            module.tables = sharded[id(whole)]
    return list(sharded.values())


def shard_rank_of_each_rank(mesh: Any) -> list[int]:
    """Each global rank's position in its shard group (the mesh's last dimension), indexed by global rank."""
    rows = mesh.mesh.reshape(-1, mesh.mesh.shape[-1]).tolist()
    positions = {rank: position for row in rows for position, rank in enumerate(row)}
    return [positions[rank] for rank in range(len(positions))]


@torch.no_grad()
def scatter_table_rows(table: RowShardedTable, full: torch.Tensor | None, round_bytes: int | None = None) -> None:
    """Fill this rank's rows of ``table`` (materialised, e.g. by ``to_empty``) from ``full``, the whole table,
    which global rank 0 passes and every other rank passes as None; call on every rank of the default group at
    once. Rank 0 scatters (``dist.scatter``) each rank its rows ``row_range(num_rows, W, shard rank)``, the same
    rows to every replica under ``hsdp``, in rounds of at most ``round_bytes`` per rank (None:
    :data:`SCATTER_ROUND_BYTES`). Each rank receives straight into its rows (a round past the end of a shorter
    range goes through a buffer of one round); rank 0 sends views of ``full`` where it can (the same device, a
    whole round) and zero-padded copies of one round otherwise (on CUDA every piece is copied to the device the
    collective runs on: one round per rank). So no rank other than 0 ever holds more than its own rows plus one
    round."""
    is_source = dist.get_rank() == 0
    if (full is not None) != is_source:
        raise ValueError("the whole table is passed on global rank 0 and only there")
    weight, width = table.weight.detach(), table.width
    if full is not None and tuple(full.shape) != (table.num_rows, width):
        raise ValueError(f"the whole table is {tuple(full.shape)}, the sharded one {(table.num_rows, width)}")
    shard_ranks = shard_rank_of_each_rank(table.mesh)
    per = table.rows_per_shard
    round_bytes = SCATTER_ROUND_BYTES if round_bytes is None else round_bytes
    step = max(1, min(per, round_bytes // max(1, width * weight.element_size())))
    own_rows = table.row_stop - table.row_start
    for offset in range(0, per, step):
        rows = min(step, per - offset)
        keep = max(0, min(rows, own_rows - offset))
        whole_round = keep == rows
        received = (weight[offset:offset + rows] if whole_round
                    else torch.empty(rows, width, dtype=weight.dtype, device=weight.device))
        pieces = None
        if full is not None:
            pieces = []
            for shard_rank in shard_ranks:
                start, stop = row_range(table.num_rows, table.groups.shard_size, shard_rank)
                first, last = min(stop, start + offset), min(stop, start + offset + rows)
                if (last - first == rows and full.device == weight.device and full.dtype == weight.dtype
                        and full.is_contiguous()):
                    pieces.append(full[first:last])
                else:
                    piece = torch.zeros(rows, width, dtype=weight.dtype, device=weight.device)
                    piece[: last - first].copy_(full[first:last])
                    pieces.append(piece)
        dist.scatter(received, pieces, src=0)
        if not whole_round:
            weight[offset:offset + keep].copy_(received[:keep])


def row_sharded_tables(model: nn.Module) -> dict[str, RowShardedTable]:
    """Every :class:`RowShardedTable` of ``model`` by each of its qualified names (a shared table under all of
    them)."""
    return {name: module for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, RowShardedTable)}


def shard_groups_of(model: nn.Module) -> ShardGroups | None:
    """The shard groups of ``model``'s row-sharded tables (None when it has none)."""
    tables = row_sharded_tables(model)
    return next(iter(tables.values())).groups if tables else None


def reduce_row_grads(tables: Sequence[torch.Tensor], groups: ShardGroups) -> None:
    """Each local shard's pending row gradients merged into one, divided by the shard group's size and, under
    ``hsdp``, averaged over the replicate group: the owned rows' gradient of the global batch's mean loss, as
    one process computes it. Call once per optimizer step, after the last backward, before clipping."""
    for table in tables:
        pending = getattr(table, "sparse_grads", None)
        if pending:
            merged = merge_row_grads(list(pending))
            pending[:] = [SparseRowGrad(rows=merged.rows, values=merged.values / groups.shard_size)]
    if groups.replicate_group is not None:
        all_reduce_table_grads(tables, group=groups.replicate_group)


def as_row_dtensor(local: torch.Tensor, table: RowShardedTable) -> Any:
    """``local`` (this rank's rows of ``table``, or of a per-row state of it) as a DTensor of the whole: rows
    sharded over the mesh's shard dimension (``Shard(0)``, the same ``ceil(R / W)`` ranges as
    :func:`row_range`) and replicated over its replicate dimension, sharing ``local``'s storage. So
    ``torch.distributed.checkpoint`` saves every row range once and, on load, fills each rank's own rows
    whatever number of ranks saved them."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if table.mesh is None:
        raise ValueError("a row-sharded table made without its device mesh cannot be checkpointed with DCP")
    shape = torch.Size((table.num_rows, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    placements = [Replicate()] * (table.mesh.ndim - 1) + [Shard(0)]
    return DTensor.from_local(local, table.mesh, placements, run_check=False, shape=shape, stride=stride)


def local_rows(table: RowShardedTable, full_shape: Sequence[int], dtype: torch.dtype, device: torch.device
               ) -> Any:
    """An uninitialised row DTensor (:func:`as_row_dtensor`) of this rank's rows of a tensor of ``full_shape``
    whose dim 0 is ``table``'s rows: the target a checkpoint's rows are loaded into."""
    if full_shape[0] != table.num_rows:
        raise ValueError(f"a saved per-row tensor has {full_shape[0]} rows, the table {table.num_rows}")
    local = torch.empty((table.row_stop - table.row_start, *full_shape[1:]), dtype=dtype, device=device)
    return as_row_dtensor(local, table)


def tables_by_optimizer_index(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, RowShardedTable]:
    """The row-sharded tables among ``optimizer``'s parameters, by their index in its state dict."""
    return _tables_by_index(optimizer, model)


def _tables_by_index(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, RowShardedTable]:
    """The row-sharded tables among ``optimizer``'s parameters, by their index in its state dict."""
    by_weight = {id(t.weight): t for t in row_sharded_tables(model).values()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {index: by_weight[id(p)] for index, p in enumerate(params) if id(p) in by_weight}


def local_table_state(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a full model state dict with each row-sharded table's entry cut to this rank's rows."""
    state = dict(state)
    for name, table in row_sharded_tables(model).items():
        key = f"{name}.weight"
        if key in state:
            full = state[key]
            if full.shape[0] != table.num_rows:
                raise ValueError(f"checkpoint entry {key} has {full.shape[0]} rows, the table {table.num_rows}")
            state[key] = full[table.row_start:table.row_stop]
    return state


def local_table_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, Any]
                                ) -> dict[str, Any]:
    """A copy of a full table-optimizer state dict with each row-sharded table's per-row states cut to this
    rank's rows."""
    tables = _tables_by_index(optimizer, model)
    entries = {}
    for index, entry in state["state"].items():
        table = tables.get(index)
        if table is not None:
            entry = {key: value[table.row_start:table.row_stop] if key in ROW_STATE_KEYS else value
                     for key, value in entry.items()}
        entries[index] = entry
    return {**state, "state": entries}


__all__ = ["ROW_STATE_KEYS", "RowShardedTable", "ShardGroups", "as_row_dtensor", "build_shard_groups", "local_rows",
           "tables_by_optimizer_index",
           "local_table_optimizer_state", "local_table_state",
           "reduce_row_grads", "row_range", "row_sharded_tables", "scatter_table_rows", "shard_groups_of",
           "shard_rank_of_each_rank", "shard_table_rows", "SCATTER_ROUND_BYTES"]
