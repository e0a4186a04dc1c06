"""Distributed setup of a run: rank, world size and process group (under ``torchrun`` or a multi-task submitit
job), the device each rank uses, and data parallelism around the model.

Under DDP every rank holds the whole model (NCCL on GPU, gloo on CPU). N-gram tables trained by a table optimizer
stay out of DDP's reducer; their row-sparse gradients are averaged over the ranks by
:func:`embscale.training.table_ddp.all_reduce_table_grads` instead. MoE load counts are summed over the ranks before
each router-bias update, so every rank balances alike. Only rank 0 writes the run folder.

``training.parallel`` ``fsdp`` / ``hsdp`` shard the model with FSDP2 instead of DDP
(:mod:`embscale.training.parallelize`); the tables, load counts and writing stay as above.
"""

from __future__ import annotations

import os

import torch

from embscale.base.errors import ConfigError


class Distributed:
    """Rank, world size and the process group (initialised here under torchrun, if not already)."""

    def __init__(self, device_kind: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # ranks on this node (torchrun sets it): the default shard group of training.parallel hsdp
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        self.owns_group = False
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device_kind == "cuda" else "gloo"
            if device_kind == "cuda":
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend=backend)
            self.owns_group = True

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum_(self, value: torch.Tensor) -> torch.Tensor:
        """Sum ``value`` over the ranks, in place (a no-op in one process)."""
        if self.enabled:
            torch.distributed.all_reduce(value)
        return value

    def sum_each_(self, tensors: list[torch.Tensor]) -> None:
        """:meth:`sum_` of several tensors of one dtype, in one collective."""
        if not self.enabled or not tensors:
            return
        flat = self.sum_(torch.cat([t.reshape(-1) for t in tensors]))
        for tensor, summed in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(summed.view_as(tensor))

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def wants_cuda(device: str) -> bool:
    """Whether ``training.device`` asks for CUDA (``auto`` does when a GPU is there)."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """The device of rank ``local_rank`` for ``training.device`` ``kind``."""
    if wants_cuda(kind):
        if not torch.cuda.is_available():
            raise ConfigError("training.device", "cuda was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def wrap_data_parallel(model: torch.nn.Module, dist: Distributed, device: torch.device,
                       tables: list[torch.nn.Parameter]) -> torch.nn.Module:
    """``model`` in DDP when there are several ranks (``tables``, trained row-sparse, left out of its reducer:
    else DDP all-reduces a table-sized zero gradient for each every step); ``model`` itself otherwise."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if tables:
        from embscale.training.table_ddp import exclude_from_ddp

        exclude_from_ddp(model, tables)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


__all__ = ["Distributed", "resolve_device", "wants_cuda", "wrap_data_parallel"]
