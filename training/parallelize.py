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

A sharded run's checkpoints are written shard by shard by every rank with ``torch.distributed.checkpoint``
(:mod:`embscale.training.sharded_checkpoint`). :func:`load_full_state` puts a single-file checkpoint (one
process's, written by an earlier attempt at one rank) back into a sharded model and optimizer (each rank keeps its
own shard of the full tensors, with no communication).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
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


__all__ = ["SHARDED", "build_mesh", "checkpoint_activations", "clip_sharded_gradients", "is_sharded",
           "load_full_state", "mesh_shape", "parallelize"]
