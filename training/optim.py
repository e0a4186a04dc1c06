"""Optimizers of a run: AdamW for the dense parameters, the table optimizer for row-sparse N-gram tables, the
learning-rate schedule, and gradient clipping over both kinds of gradient.

AdamW decays weight matrices only: no weight decay on norms, biases and lookup tables (token embedding, N-gram
and per-layer tables) unless ``training.table_weight_decay``. With ``training.table_optimizer`` ``dense`` or
``sparse`` the N-gram tables get row-sparse gradients and leave the AdamW groups for
:class:`embscale.kernels.table_optim.TableAdamW` in that mode, on the same schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from embscale.base.errors import ConfigError
from embscale.kernels.table_optim import merge_pending_row_grads
from embscale.training.config import TrainingConfig


def learning_rate(step: int, cfg: TrainingConfig) -> float:
    """Learning rate of the optimizer step that follows ``step`` completed steps."""
    total = cfg.total_steps
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = round(cfg.warmup_fraction * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    decay = round(cfg.decay_fraction * total)
    decay_start = total - decay
    if step < decay_start:
        return peak
    return peak + (floor - peak) * (step - decay_start + 1) / decay


def parameter_groups(model: torch.nn.Module, weight_decay: float, table_weight_decay: bool,
                     exclude: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()
                     ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """AdamW groups: decay on weight matrices; none on norms, biases and (unless asked) lookup tables.
    ``exclude``: parameters trained by another optimizer (left out of the groups and the counts)."""
    from embscale.models.accounting import LOOKUP_GROUPS, parameter_group

    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    excluded = {id(p) for p in exclude}
    decay, no_decay = [], []
    counts = {"decay": 0, "no_decay": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in excluded:
            continue
        try:
            group = parameter_group(name)
        except KeyError:
            group = "embedding" if id(param) in embedding_params else "other"
        table = group in LOOKUP_GROUPS
        if param.ndim < 2 or group == "norms" or (table and not table_weight_decay):
            no_decay.append(param)
            counts["no_decay"] += param.numel()
        else:
            decay.append(param)
            counts["decay"] += param.numel()
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]], counts


def build_optimizers(model: Any, cfg: TrainingConfig, device: torch.device
                     ) -> tuple[list[torch.optim.Optimizer], list[torch.nn.Parameter], dict[str, int]]:
    """``([AdamW] or [AdamW, TableAdamW], the tables TableAdamW trains, parameter counts per group)``.

    Sets the model's N-gram backend (``training.ngram_backend``) and, for a table optimizer, the tables'
    row-sparse gradients."""
    sparse_tables = cfg.table_optimizer != "adamw"
    model.set_ngram_backend(cfg.ngram_backend, sparse_grad=sparse_tables)
    tables = model.ngram_tables() if sparse_tables else []
    if sparse_tables and not tables:
        raise ConfigError("training.table_optimizer",
                          f"{cfg.table_optimizer!r} trains N-gram tables, and this model has none (no model.ngram"
                          " or n-gram per-layer embeddings); use adamw")
    groups, counts = parameter_groups(model, cfg.weight_decay, cfg.table_weight_decay, exclude=tables)
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda")]
    if tables:
        from embscale.kernels.table_optim import TableAdamW

        optimizers.append(TableAdamW(tables, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay if cfg.table_weight_decay else 0.0,
                                     mode=cfg.table_optimizer, moments=cfg.table_optimizer_moments))
        counts["table_optimizer"] = sum(t.numel() for t in tables)
    return optimizers, tables, counts


def clip_gradients(params: list[torch.Tensor], tables: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over the dense gradients of ``params`` and the row-sparse ones of ``tables``.

    Each table's ``sparse_grads`` (one per micro-batch) is merged in place into one entry first. The total norm is
    the 2-norm over every dense gradient and every merged ``values`` (the merged rows are unique and the padding
    slots' values are exactly zero, so ``||values||`` is the norm of the equivalent dense gradient; nothing here
    reads the number of touched rows, so there is no host sync for it); both kinds are scaled by
    ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does (scaling keeps the padding
    at zero)."""
    dense = [p for p in params if p.grad is not None]
    sparse_values = merge_pending_row_grads(tables)
    grads = [p.grad for p in dense] + sparse_values
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    if sparse_values:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(sparse_values, coef.to(sparse_values[0].device))
    return total


__all__ = ["build_optimizers", "clip_gradients", "learning_rate", "parameter_groups"]
