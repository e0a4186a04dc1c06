"""What a checkpoint holds, and putting it back: model, optimizers, data position, step, every RNG.

Two formats, both in the run folder's ``checkpoints/`` (:mod:`embscale.base.rundir`: atomic, checksummed, the
newest intact one loaded, a corrupt newest one set aside for the one before):

- one process, or DDP (every rank holds the whole model): one file per checkpoint, rank 0's. The payload is a plain
  dict of tensors, numbers, strings, lists and dicts, so it loads with ``weights_only=True`` (nothing unpickled).
  Restoring every RNG (python, numpy, torch, CUDA) with the data position makes a resumed CPU run reproduce the
  uninterrupted loss curve bit for bit.
- a sharded run (``training.parallel`` ``fsdp`` / ``hsdp`` on several ranks): a folder that every rank writes its
  own shards into with ``torch.distributed.checkpoint`` (:mod:`embscale.training.sharded_checkpoint`), each rank's
  RNG states in their own file; it resumes on any number of ranks, one process included.

:func:`embscale.training.sharded_checkpoint.restore_latest` resumes from the newest intact checkpoint of either
format (a sharded run whose newest is a single file, written by an earlier attempt at one rank, gives each rank its
shard of it; a sharded checkpoint resumes in one process too).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every RNG state as tensors and plain types (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def checkpoint_payload(step: int, run_id: str, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                       data_state: dict[str, Any], device: torch.device, loss_ema: float | None,
                       wall_s: float) -> dict[str, Any]:
    """The single-file checkpoint of ``step`` (an unsharded model): ``optimizer`` is AdamW's state,
    ``table_optimizer`` the table optimizer's."""
    payload = {"step": step, "run_id": run_id, "model": model.state_dict(), "optimizer": optimizers[0].state_dict(),
               "data": data_state, "rng": capture_rng(device), "loss_ema": loss_ema, "wall_s": wall_s}
    if len(optimizers) > 1:
        payload["table_optimizer"] = optimizers[1].state_dict()
    return payload


def restore_payload(payload: dict[str, Any], model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                    device: torch.device, sharded: bool = False) -> None:
    """Put a checkpoint's model, optimizer and RNG states back (the caller restores the data position);
    ``sharded``: ``model`` is sharded with FSDP2 and each rank keeps its shard of the full states."""
    if sharded:
        from embscale.training.parallelize import load_full_state

        load_full_state(model, optimizers[0], payload["model"], payload["optimizer"])
    else:
        model.load_state_dict(payload["model"])
        optimizers[0].load_state_dict(payload["optimizer"])
    if len(optimizers) > 1:
        table_state = payload["table_optimizer"]
        if sharded:  # row-sharded tables keep this rank's rows of their states
            from embscale.training.table_shard import local_table_optimizer_state

            table_state = local_table_optimizer_state(optimizers[1], model, table_state)
        optimizers[1].load_state_dict(table_state)
    restore_rng(payload["rng"], device)


__all__ = ["capture_rng", "checkpoint_payload", "restore_payload", "restore_rng", "seed_everything"]
