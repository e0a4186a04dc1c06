"""Sharded data parallelism (``training.parallel`` ``fsdp`` / ``hsdp``) with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``) over a :class:`~torch.distributed.device_mesh.DeviceMesh`, applied to a
built model by :func:`parallelize`, as torchtitan does: the model code (``embscale.models``) knows nothing of it.

- ``fsdp``: every parameter is sharded over all ranks (a 1-D mesh ``("dp_shard",)``).
- ``hsdp``: sharded within groups of ``training.shard_degree`` ranks (a node, by default) and replicated across
  the groups (a 2-D mesh ``("dp_replicate", "dp_shard")``): gradients are reduce-scattered within a group and
  all-reduced across groups.

Each transformer block is its own FSDP unit (its parameters all-gathered just before its forward and freed after
it, ``reshard_after_forward``), then the root takes the rest (token or N-gram embedding, per-layer embeddings,
final norm, head; kept gathered after the forward, as the backward needs them at once). On CUDA the gathered
parameters and the compute are bf16 and gradients are reduced in fp32 (``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``); the sharded parameters and the optimizer state stay fp32. On CPU everything is fp32.
``training.compile`` compiles each block in place (``nn.Module.compile``, so parameter names do not change)
before it is sharded; ``training.activation_checkpointing`` recomputes each block's activations in the backward.

N-gram tables trained by a table optimizer (``training.table_optimizer`` ``dense`` / ``sparse``) stay outside the
FSDP units (``ignored_params``). With ``training.table_sharding: replicate`` they are replicated on every rank as
under DDP, their row-sparse gradients averaged by :func:`embscale.training.table_ddp.all_reduce_table_grads`;
with ``rows`` :func:`parallelize` first shards them by rows over each shard group
(:func:`embscale.training.table_shard.shard_table_rows`): each rank keeps and steps only its rows.

A sharded run's model is never built whole on every rank (:func:`build_sharded_model`, as torchtitan and
torchtune do). Global rank 0 builds it with its initialisation in host memory (on the CPU, with every CPU it may
use: the values do not depend on the thread count), so its parameters are bit for bit those of one process with
the same seed on the CPU; every rank, rank 0 included, builds it again on the ``meta`` device (no memory) and
:func:`parallelize` shards that. Each rank then materialises only its shards (:func:`materialise`, ``to_empty``)
and :func:`load_from_rank0` fills them from rank 0's copy: the row-sharded N-gram tables first, each rank's rows
scattered (:func:`embscale.training.table_shard.scatter_table_rows`; rank 0 lets go of each whole table once it
is sent), then every other parameter and persistent buffer with ``set_model_state_dict(full_state_dict=True,
broadcast_from_rank0=True)``, one tensor at a time (each rank keeps its shard of it), then the buffers outside the
state dict (the MoE load counters, whose ``to_empty`` memory is garbage) broadcast whole. Rotary angles are no
buffer (recomputed each forward), so nothing needs recomputing. Rank 0's whole copy is freed when the shards are
placed (its own shards are copies, not views of it), and every rank's torch RNG is set to rank 0's after its
initialisation. Host memory while building: rank 0 the whole model plus its shards; every other rank its shards
plus, briefly, one whole dense tensor (the largest: a token table or LM head; an N-gram table trained by AdamW
under FSDP, ``table_optimizer: adamw``, is one such tensor) and one scatter round. On CUDA the initial values
are drawn by the CPU generator, not the GPU's: the same distribution as a one-GPU run with the same seed, other
draws (building on the GPU would need the whole model to fit in one GPU).

A sharded run's checkpoints are written shard by shard by every rank with ``torch.distributed.checkpoint``
(:mod:`embscale.training.sharded_checkpoint`). :func:`load_full_state` puts a single-file checkpoint (one
process's, written by an earlier attempt at one rank) back into a sharded model and optimizer (each rank keeps its
own shard of the full tensors, with no communication).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from embscale.base.errors import ConfigError
from embscale.kernels.table_optim import merge_pending_row_grads
from embscale.training.config import TrainingConfig

SHARDED = ("fsdp", "hsdp")


def is_sharded(cfg: TrainingConfig, world_size: int) -> bool:
    """Whether this run's model is sharded with FSDP2: ``fsdp`` / ``hsdp`` on more than one rank (one process
    trains the whole model as it always did)."""
    return cfg.parallel in SHARDED and world_size > 1


def mesh_shape(cfg: TrainingConfig, world_size: int, ranks_per_node: int) -> tuple[int, int]:
    """``(replicate degree, shard degree)`` of the mesh; ConfigError naming ``training.shard_degree`` when it
    does not divide the ranks. ``fsdp`` shards over every rank; ``hsdp`` over ``shard_degree`` ranks (0: the
    ranks of a node, ``ranks_per_node``)."""
    if cfg.parallel == "fsdp":
        if cfg.shard_degree not in (0, world_size):
            raise ConfigError("training.shard_degree",
                              f"fsdp shards over all {world_size} ranks; got {cfg.shard_degree} (use parallel: hsdp "
                              "to shard over fewer and replicate across the groups)")
        return 1, world_size
    shard = cfg.shard_degree or ranks_per_node
    if shard > world_size or world_size % shard:
        raise ConfigError("training.shard_degree",
                          f"{shard} ranks per shard group do not divide the {world_size} ranks of this run")
    return world_size // shard, shard


def build_mesh(cfg: TrainingConfig, world_size: int, ranks_per_node: int, device: torch.device
               ) -> torch.distributed.device_mesh.DeviceMesh:
    """The device mesh of a sharded run (the default process group must be initialised): 1-D ``("dp_shard",)``
    for ``fsdp``, 2-D ``("dp_replicate", "dp_shard")`` for ``hsdp``."""
    from torch.distributed.device_mesh import init_device_mesh

    replicate, shard = mesh_shape(cfg, world_size, ranks_per_node)
    if cfg.parallel == "fsdp":
        return init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def _recompute_keeps_counts(block: torch.nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    """``forward`` of a checkpointed block. When the backward recomputes it, the MoE layers' load counters
    (incremented in place by every forward) are put back afterwards, so the router biases balance on each
    token once, as without checkpointing."""
    from embscale.models.moe import MoE

    recomputing = torch._C._current_graph_task_id() != -1  # inside a backward: the recomputation
    moes = [m for m in block.modules() if isinstance(m, MoE)] if recomputing else []
    saved = [m.pending_counts.clone() for m in moes]
    try:
        return forward(*args, **kwargs)
    finally:  # also when the recomputation stops early (as it does once it has what the backward needs)
        for moe, counts in zip(moes, saved, strict=True):
            moe.pending_counts.copy_(counts)


def checkpoint_activations(block: torch.nn.Module) -> None:
    """Recompute ``block``'s activations in the backward instead of keeping them (non-reentrant
    ``torch.utils.checkpoint``). The block's ``forward`` is replaced on the instance, so parameter names,
    state dicts and FSDP's hooks (which wrap ``__call__``) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    original = block.forward
    run = functools.partial(_recompute_keeps_counts, block, original)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def parallelize(model: torch.nn.Module, mesh: torch.distributed.device_mesh.DeviceMesh | None,
                cfg: TrainingConfig, ignored: Sequence[torch.nn.Parameter] = ()) -> torch.nn.Module:
    """Apply the run's activation checkpointing and, with a ``mesh``, per-block compilation and FSDP2 sharding
    to ``model`` in place (returns it). Call before the optimizers are built: sharding replaces the parameters.
    ``model`` may be on the ``meta`` device (:func:`build_sharded_model` shards it so, then materialises the
    shards), or real: each rank then keeps its shards of the values it holds.
    ``ignored``: parameters left outside the FSDP units (the N-gram tables of a table optimizer). With
    ``training.table_sharding: rows`` the N-gram tables are first sharded by rows
    (:func:`embscale.training.table_shard.shard_table_rows`) and their local shards left out instead of
    ``ignored``; ``model.ngram_tables()`` then returns the shards, for the table optimizer."""
    blocks = list(model.layers)
    if cfg.activation_checkpointing:
        for block in blocks:
            checkpoint_activations(block)
    if mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.device_type == "cuda":
        # a block's float inputs (the residual stream, the rotary cos / sin, per-layer embeddings) are not cast
        # to bf16 on the way in: autocast runs the products in bf16 as under DDP, and the rotary tables stay fp32
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                            cast_forward_inputs=False)
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        block_policy = root_policy = MixedPrecisionPolicy()
    if cfg.table_sharding == "rows":
        from embscale.training.table_shard import shard_table_rows

        ignored = [table.weight for table in shard_table_rows(model, mesh)]
    ignored_params = set(ignored) or None
    for index, block in enumerate(blocks):
        if cfg.compile:
            block.compile()
        # the last block's parameters would be gathered again at once by the backward: keep them
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=index < len(blocks) - 1,
                    ignored_params=ignored_params)
    fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False,
                ignored_params=ignored_params)
    return model


@dataclass(frozen=True)
class ShardedBuild:
    """How :func:`build_sharded_model` built one rank's model, measured on its tensors (bytes of parameters and
    buffers): ``whole_copy_bytes`` of the initialised whole model this rank held (rank 0's copy; 0 elsewhere),
    ``unsharded_bytes`` of the model being sharded that were materialised before sharding (0: built on ``meta``),
    ``local_bytes`` of this rank's shards afterwards, and ``seconds`` the build took."""

    whole_copy_bytes: int
    unsharded_bytes: int
    local_bytes: int
    seconds: float


def materialised_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers that hold memory on this rank (each tensor once; a DTensor
    counts its local shard; ``meta`` tensors count nothing)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if not local.is_meta:
            total += local.numel() * local.element_size()
    return total


def build_sharded_model(model_cfg: Any, mesh: torch.distributed.device_mesh.DeviceMesh, cfg: TrainingConfig,
                        device: torch.device) -> tuple[torch.nn.Module, ShardedBuild]:
    """The model of a sharded run, sharded by :func:`parallelize` over ``mesh`` and holding on each rank only its
    shards on ``device``, with the values global rank 0 initialised (see the module docstring). Call on every
    rank at once, right after seeding (rank 0's initialisation is that of ``build_model`` in one process on the
    CPU); afterwards every rank's torch RNG is where rank 0's was after initialising, as if each had built the
    whole model on the CPU."""
    from embscale.models.model import build_model

    started = time.monotonic()
    whole, source_state = 0, None
    if torch.distributed.get_rank() == 0:
        with _all_cpu_threads():  # the other ranks wait in their first collective meanwhile
            source = build_model(model_cfg, device="cpu")
        whole, source_state = materialised_bytes(source), whole_state(source)
        del source  # from here only source_state holds the whole copy, and load_from_rank0 lets it go
    rng = torch.get_rng_state()
    model = build_model(model_cfg, device="meta")
    unsharded = materialised_bytes(model)
    table_params = model.ngram_tables() if cfg.table_optimizer != "adamw" else []
    parallelize(model, mesh, cfg, ignored=table_params)  # training.table_sharding rows: shards the tables
    materialise(model, device)
    load_from_rank0(model, source_state)
    torch.set_rng_state(_broadcast_from_rank0(rng, device))
    return model, ShardedBuild(whole_copy_bytes=whole, unsharded_bytes=unsharded, local_bytes=materialised_bytes(model),
                               seconds=time.monotonic() - started)


@contextlib.contextmanager
def _all_cpu_threads() -> Iterator[None]:
    """Every CPU this process may run on for torch's intra-op threads (``torchrun`` starts ranks with one),
    put back afterwards. The CPU generator draws the same values whatever the number of threads."""
    threads = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(threads, usable))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every value a model's initialisation sets: its state dict (parameters, persistent buffers) and its other
    buffers (e.g. the MoE load counters), by qualified name; what :func:`load_from_rank0` takes."""
    state = model.state_dict()
    state.update({name: buffer for name, buffer in model.named_buffers() if name not in state})
    return state


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Give the ``meta`` parameters and buffers of a sharded ``model`` memory on ``device``, uninitialised: each
    FSDP parameter its local shard, each row-sharded table its rows (``nn.Module.to_empty``). Python attributes of
    the plain parameters (e.g. a table's ``sparse_grads`` list) are carried over to the new parameter objects."""
    from torch.distributed.tensor import DTensor

    attributes = {name: {key: value for key, value in vars(param).items() if not key.startswith("_")}
                  for name, param in model.named_parameters(remove_duplicate=False)
                  if not isinstance(param, DTensor)}
    model.to_empty(device=device)
    for name, param in model.named_parameters(remove_duplicate=False):
        for key, value in attributes.get(name, {}).items():
            if not hasattr(param, key):
                setattr(param, key, value)


@torch.no_grad()
def load_from_rank0(model: torch.nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Fill a sharded, materialised ``model`` with ``state``, the :func:`whole_state` of the same model whole and
    initialised, which global rank 0 passes and every other rank passes as None; call on every rank at once.
    Row-sharded N-gram tables first: each rank's rows scattered
    (:func:`embscale.training.table_shard.scatter_table_rows`), and rank 0 lets go of each whole table once it is
    sent. Then the parameters and persistent buffers through ``set_model_state_dict(full_state_dict=True,
    broadcast_from_rank0=True)`` (rank 0 broadcasts one tensor at a time, each rank keeps its shard) and the other
    buffers broadcast whole. ``state`` is emptied (rank 0's copy is freed unless the caller keeps references).
    Rank 0 checks that ``state`` has exactly the model's entries, so nothing is left uninitialised."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from embscale.training.table_shard import row_sharded_tables, scatter_table_rows

    is_source = torch.distributed.get_rank() == 0
    if (state is not None) != is_source:
        raise ValueError("the initialised whole model is passed on global rank 0 and only there")
    entries = set(model.state_dict())
    other_buffers = {name: buffer for name, buffer in model.named_buffers() if name not in entries}
    if state is not None and set(state) != entries | set(other_buffers):
        raise RuntimeError(f"the whole model and the sharded one differ in entries: "
                           f"{sorted(set(state) ^ (entries | set(other_buffers)))[:8]}")
    tables = {f"{name}.weight": table for name, table in row_sharded_tables(model).items()}
    done: set[int] = set()
    for key, table in tables.items():  # the same order on every rank; a table shared by several modules once
        full = state.pop(key) if state is not None else None
        if id(table) not in done:
            done.add(id(table))
            scatter_table_rows(table, full)
        del full
    dense = {key: value for key, value in state.items() if key in entries} if state is not None else {}
    buffers = {key: state.pop(key) for key in other_buffers} if state is not None else {}
    if state is not None:
        state.clear()
    # strict=False: the row-sharded tables are left out (each would be broadcast whole): they are filled above
    set_model_state_dict(model, dense, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))
    dense.clear()
    for name, buffer in other_buffers.items():  # not persistent (the MoE load counters): in no state dict
        if is_source:
            buffer.copy_(buffers[name])
        torch.distributed.broadcast(buffer, src=0)


def _broadcast_from_rank0(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Global rank 0's ``tensor`` on every rank (sent through ``device``, the one the collectives run on), on
    the CPU."""
    moved = tensor.to(device)
    torch.distributed.broadcast(moved, src=0)
    return moved.cpu()


def clip_sharded_gradients(params: Sequence[torch.nn.Parameter], tables: Sequence[torch.Tensor],
                           max_norm: float, table_group: torch.distributed.ProcessGroup | None = None
                           ) -> torch.Tensor:
    """``embscale.training.optim.clip_gradients`` for a sharded model: one global 2-norm over the sharded dense
    gradients (DTensors, their norm reduced over the mesh) and the tables' row-sparse gradients (each table's
    ``sparse_grads`` merged into one entry first), every gradient scaled by ``min(1, max_norm / (norm + 1e-6))``.
    ``table_group``: the tables are row shards over this group (``training.table_sharding: rows``), their squares
    summed over it; None: replicated, each rank's norm is the whole one. Returns the norm as a plain tensor,
    equal on every rank."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication

    dense = [p for p in params if p.grad is not None]
    sparse_values = merge_pending_row_grads(tables)
    squares = []
    if dense:
        norm = torch.nn.utils.get_total_norm([p.grad for p in dense], norm_type=2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(norm.float().square())
    if table_group is not None:  # every rank of the group joins the sum, with or without rows of its own
        device = tables[0].device
        table_square = (torch.nn.utils.get_total_norm(sparse_values, norm_type=2.0).float().square()
                        if sparse_values else torch.zeros((), device=device))
        torch.distributed.all_reduce(table_square, group=table_group)
        squares.append(table_square)
    elif sparse_values:
        squares.append(torch.nn.utils.get_total_norm(sparse_values, norm_type=2.0).float().square())
    if not squares:
        return torch.zeros(())
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    with implicit_replication():
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    if sparse_values:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(sparse_values, coef.to(sparse_values[0].device))
    return total


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optimizer_state: dict[str, Any]) -> None:
    """Put full (unsharded) model and optimizer states, present on every rank, into a sharded ``model`` and its
    ``optimizer``: each rank keeps its own shard of them (no communication), whatever number of ranks saved
    them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    from embscale.training.table_shard import local_table_state

    model_state = local_table_state(model, model_state)  # row-sharded tables: this rank's rows
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    optimizer.load_state_dict(optimizer_state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                    state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                                   src_data_rank=None)


__all__ = ["SHARDED", "ShardedBuild", "build_mesh", "build_sharded_model", "checkpoint_activations",
           "clip_sharded_gradients", "is_sharded", "load_from_rank0", "load_full_state", "materialise",
           "materialised_bytes", "mesh_shape", "parallelize", "whole_state"]
