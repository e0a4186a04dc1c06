"""AdamW for lookup tables whose gradients arrive as touched rows (``weight.sparse_grads``).

The N-gram Embedding's sparse-gradient path (``kernels.ngram``, ``NgramEmbedding(sparse_grad=True)``) leaves
``tables.weight.grad`` None and appends one ``SparseRowGrad(rows (U,) int64 sorted unique, values (U, d)
fp32)`` per backward to ``tables.weight.sparse_grads``. :class:`TableAdamW` consumes that list (merged with
:func:`kernels.ngram.merge_sparse_grads`), never builds a dense ``(R, d)`` gradient, and clears the list in
``zero_grad``. A plain dense ``.grad`` is accepted too (see :func:`collect_row_grad`).

Two modes (``mode=``):

``dense``: exactly ``torch.optim.AdamW`` (``amsgrad=False``) as if the gradient were the dense ``(R, d)``
tensor with zeros in the untouched rows: every row's moments decay every step (``m = b1 m``, ``v = b2 v`` where
``g = 0``), bias correction uses the global step ``t``, decoupled weight decay shrinks every row::

    p = p * (1 - lr wd);  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The cost is one pass over the whole table per step. Triton scheme: one program per block of ``BLOCK_R``
consecutive table rows. The touched rows that fall in the block are a contiguous range of the sorted
``rows`` (``block_lo[b] .. block_lo[b+1]``, from one ``searchsorted`` of the block starts: ``R / BLOCK_R``
entries); each row of the block finds its gradient slot by a vectorised binary search in that range
(``log2(BLOCK_R) + 1`` probes), and reads ``g = values[slot]`` or ``g = 0`` when absent. Nothing
table-sized beyond the parameter and its two moments is read or written: no dense gradient, no row->slot
map. The PyTorch twin does the same with whole-table ops for ``g = 0`` and index ops for the touched rows.

``sparse``: lazy Adam. Only touched rows change: their moments, their parameter, and their own step count
``row_step[r]`` (the number of steps that touched row ``r``), which drives their bias correction::

    t_r = row_step[r] += 1
    p_r = p_r * (1 - lr wd);  m_r = lerp(m_r, g_r, 1 - b1);  v_r = b2 v_r + (1 - b2) g_r^2
    p_r = p_r - lr / (1 - b1^t_r) * m_r / (sqrt(v_r) / sqrt(1 - b2^t_r) + eps)

Differences from ``dense`` (and from AdamW): an untouched row's moments do not decay, so when it is touched
again it resumes from stale moments (as if no steps had passed); its bias correction counts only its own
steps; weight decay is applied only at the steps that touch it (a rarely used row is decayed rarely); ``lr``
is the learning rate of the step that touches the row. The step costs O(U d) (touched rows), not O(R d).
Triton scheme: one program per block of touched rows (rows are unique, so no two programs write one row);
the per-row step counts and bias corrections are O(U) torch ops in float64 before the launch.

State per parameter: ``exp_avg``, ``exp_avg_sq`` (fp32, table-sized), ``step`` (int, optimizer steps that
updated the parameter) and, in ``sparse`` mode, ``row_step`` (int64, (R,)). ``state_dict`` /
``load_state_dict`` round-trip through ``torch.save`` / ``torch.load(weights_only=True)`` and keep those
dtypes (the base class would cast every non-``step`` tensor to the parameter's dtype).

Backends (``backend=``): ``auto`` runs the Triton kernels on CUDA tensors, or anywhere under
``TRITON_INTERPRET=1``, and the PyTorch twin otherwise; ``torch`` and ``triton`` force one.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; keep the twin usable without it
    triton = None
    tl = None

MODES = ("dense", "sparse")
BACKENDS = ("auto", "torch", "triton")


# ------------------------------------------------------------------------------------------------------------
# Gradients: sparse rows (and dense for generality)
# ------------------------------------------------------------------------------------------------------------

class RowGrad:
    """A gradient restricted to rows: ``rows`` (U,) int64 sorted unique, ``values`` (U, d) fp32.
    (The shape of ``kernels.ngram.SparseRowGrad``; any object with ``.rows`` and ``.values`` is accepted.)"""

    __slots__ = ("rows", "values")

    def __init__(self, rows: torch.Tensor, values: torch.Tensor):
        self.rows = rows
        self.values = values


def merge_row_grads(grads: list[Any], use_triton: bool | None = None) -> Any:
    """The sum of ``grads`` (objects with ``.rows`` sorted unique and ``.values``) as one such object.

    Uses :func:`kernels.ngram.merge_sparse_grads` (deterministic re-reduction; ``use_triton`` None lets it
    choose); one gradient is returned as is."""
    if not grads:
        raise ValueError("merge_row_grads: empty list of gradients")
    if len(grads) == 1:
        return grads[0]
    try:
        from kernels.ngram import merge_sparse_grads
    except ImportError:  # pragma: no cover - kernels.ngram ships with this module
        rows = torch.cat([g.rows for g in grads])
        values = torch.cat([g.values.float() for g in grads])
        unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        merged = values.new_zeros(unique.numel(), values.shape[1]).index_add_(0, inverse, values)
        return RowGrad(unique, merged)
    return merge_sparse_grads(list(grads), use_triton=use_triton)


def collect_row_grad(param: torch.Tensor, mode: str, use_triton: bool | None = None) -> Any | None:
    """The parameter's gradient for this step as rows (None when it has none).

    ``param.sparse_grads`` (a list, one entry per backward) is merged. A dense ``param.grad`` counts as
    every row in ``dense`` mode (plain AdamW) and as its rows with any non-zero entry in ``sparse`` mode
    (an ``nn.Embedding``'s untouched rows have exactly zero gradient); both together are summed."""
    grads = list(getattr(param, "sparse_grads", None) or [])
    if param.grad is not None:
        dense = param.grad
        if dense.is_sparse:
            raise ValueError("TableAdamW: torch sparse (COO) gradients are not supported; use sparse_grads")
        if mode == "dense":
            rows = torch.arange(dense.shape[0], device=dense.device)
        else:
            rows = dense.ne(0).any(dim=1).nonzero().squeeze(1)
        grads.append(RowGrad(rows, dense.index_select(0, rows).float()))
    if not grads:
        return None
    return merge_row_grads(grads, use_triton)


# ------------------------------------------------------------------------------------------------------------
# PyTorch twins (define the meaning)
# ------------------------------------------------------------------------------------------------------------

def dense_step_torch(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rows: torch.Tensor,
                     values: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float) -> None:
    """AdamW over the whole table with gradient ``values`` at ``rows`` and 0 elsewhere (``step`` is the
    global step count after this step). The op sequence is torch's single-tensor AdamW, so the result
    matches it to the last bit or so."""
    p = param if param.dtype == torch.float32 else param.float()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    values = values.to(torch.float32)
    touched_m = exp_avg.index_select(0, rows).lerp_(values, 1 - beta1)
    touched_v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
    exp_avg.lerp_(exp_avg.new_zeros(()), 1 - beta1)  # untouched rows: g = 0
    exp_avg_sq.mul_(beta2)
    exp_avg.index_copy_(0, rows, touched_m)
    exp_avg_sq.index_copy_(0, rows, touched_v)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if p is not param:
        param.copy_(p)


def _row_corrections(row_step: torch.Tensor, rows: torch.Tensor, lr: float, beta1: float, beta2: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the touched rows' step counts; their ``lr / (1 - b1^t)`` and ``sqrt(1 - b2^t)`` (fp32, (U,)),
    computed in float64."""
    steps = row_step.index_select(0, rows) + 1
    row_step.index_copy_(0, rows, steps)
    t = steps.double()
    step_size = (lr / (1 - torch.pow(beta1, t))).float()
    bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt().float()
    return step_size, bias_correction2_sqrt


def sparse_step_torch(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      row_step: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, *, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Lazy AdamW on the touched ``rows`` only (each with its own step count ``row_step``)."""
    step_size, bias_correction2_sqrt = _row_corrections(row_step, rows, lr, beta1, beta2)
    values = values.to(torch.float32)
    p = param.index_select(0, rows).float()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m = exp_avg.index_select(0, rows).lerp_(values, 1 - beta1)
    v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt[:, None]).add_(eps)
    p.sub_(step_size[:, None] * m / denom)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    param.index_copy_(0, rows, p.to(param.dtype))


# ------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------

def _dense_kernel(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, rows_ptr, values_ptr, block_lo_ptr, num_rows, d,
                  lr, beta1, beta2, eps, decay_factor, step_size, bias_correction2_sqrt,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    pid = tl.program_id(0)
    table_rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = table_rows < num_rows
    lo = tl.load(block_lo_ptr + pid)
    hi = tl.load(block_lo_ptr + pid + 1)
    # Binary search of each table row in rows[lo:hi] (sorted): first position whose row is >= table_row.
    # tl.full, not tl.zeros: builtins only (the interpreter cannot call triton.language.standard's jitted
    # helpers when triton was imported before TRITON_INTERPRET was set).
    left = tl.full([BLOCK_R], 0, tl.int64) + lo
    right = tl.full([BLOCK_R], 0, tl.int64) + hi
    for _ in tl.static_range(SEARCH_STEPS):
        active = left < right
        mid = (left + right) // 2
        probe = tl.load(rows_ptr + mid, mask=active, other=0)
        below = probe < table_rows
        left = tl.where(active & below, mid + 1, left)
        right = tl.where(active & (~below), mid, right)
    found = tl.load(rows_ptr + left, mask=left < hi, other=-1)
    touched = (left < hi) & (found == table_rows)
    slot = tl.where(touched, left, 0)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < d)[None, :]
        offs = table_rows.to(tl.int64)[:, None] * d + cols[None, :]
        g = tl.load(values_ptr + slot[:, None] * d + cols[None, :], mask=mask & touched[:, None], other=0.0)
        g = g.to(tl.float32)
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
        pf = p.to(tl.float32) * decay_factor
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        pf = pf - step_size * (m / (tl.sqrt(v) / bias_correction2_sqrt + eps))
        tl.store(param_ptr + offs, pf.to(p.dtype), mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)


def _sparse_kernel(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, rows_ptr, values_ptr, step_size_ptr,
                   bias_correction2_sqrt_ptr, num_touched, d, beta1, beta2, eps, decay_factor,
                   BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    slots = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    slot_ok = slots < num_touched
    table_rows = tl.load(rows_ptr + slots, mask=slot_ok, other=0)
    step_size = tl.load(step_size_ptr + slots, mask=slot_ok, other=0.0)
    bias_correction2_sqrt = tl.load(bias_correction2_sqrt_ptr + slots, mask=slot_ok, other=1.0)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = slot_ok[:, None] & (cols < d)[None, :]
        offs = table_rows[:, None] * d + cols[None, :]
        g = tl.load(values_ptr + slots.to(tl.int64)[:, None] * d + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
        pf = p.to(tl.float32) * decay_factor
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        pf = pf - step_size[:, None] * (m / (tl.sqrt(v) / bias_correction2_sqrt[:, None] + eps))
        tl.store(param_ptr + offs, pf.to(p.dtype), mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=2)
def _jitted(interpret: bool) -> dict:
    # triton.jit chooses interpreter or compiler when it decorates: decorate at first launch, keyed by the
    # switch, so a test that sets TRITON_INTERPRET before launching gets the interpreter.
    del interpret
    return {"dense": triton.jit(_dense_kernel), "sparse": triton.jit(_sparse_kernel)}


def _kernels() -> dict:
    if triton is None:
        raise RuntimeError("kernels.table_optim: Triton is not installed")
    return _jitted(interpreting())


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _column_block(d: int) -> int:
    return min(_next_pow2(d), 128)


def dense_step_triton(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rows: torch.Tensor,
                      values: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, block_rows: int | None = None) -> None:
    """:func:`dense_step_torch` as one Triton pass over the table (see the module docstring)."""
    num_rows, d = param.shape
    block_d = _column_block(d)
    block_r = block_rows or max(1, min(64, 2048 // block_d))
    n_blocks = triton.cdiv(num_rows, block_r)
    starts = torch.arange(0, (n_blocks + 1) * block_r, block_r, device=param.device)
    block_lo = torch.searchsorted(rows, starts).to(torch.int64)  # (n_blocks + 1,)
    rows = rows.contiguous()
    values = values.to(torch.float32).contiguous()
    if rows.numel() == 0:  # keep valid pointers (never read: every block's range is empty)
        rows = torch.zeros(1, dtype=torch.int64, device=param.device)
        values = torch.zeros(1, d, dtype=torch.float32, device=param.device)
    _kernels()["dense"][(n_blocks,)](
        param, exp_avg, exp_avg_sq, rows, values, block_lo, num_rows, d,
        lr, beta1, beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5,
        BLOCK_R=block_r, BLOCK_D=block_d, SEARCH_STEPS=block_r.bit_length(), num_warps=4)


def sparse_step_triton(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       row_step: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, *, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float,
                       block_touched: int | None = None) -> None:
    """:func:`sparse_step_torch` as one Triton launch over the touched rows."""
    num_touched = rows.numel()
    if num_touched == 0:
        return
    d = param.shape[1]
    step_size, bias_correction2_sqrt = _row_corrections(row_step, rows, lr, beta1, beta2)
    block_d = _column_block(d)
    block_u = block_touched or max(1, min(64, 2048 // block_d))
    _kernels()["sparse"][(triton.cdiv(num_touched, block_u),)](
        param, exp_avg, exp_avg_sq, rows.contiguous(), values.to(torch.float32).contiguous(), step_size,
        bias_correction2_sqrt, num_touched, d, beta1, beta2, eps, 1 - lr * weight_decay,
        BLOCK_U=block_u, BLOCK_D=block_d, num_warps=4)


# ------------------------------------------------------------------------------------------------------------
# The optimizer
# ------------------------------------------------------------------------------------------------------------

class TableAdamW(torch.optim.Optimizer):
    """AdamW for 2-D lookup tables with row-sparse gradients (``param.sparse_grads``) or dense ones.

    ``mode``: ``dense`` (exactly AdamW) or ``sparse`` (lazy, touched rows only); see the module docstring for
    both semantics. ``backend``: ``auto`` | ``torch`` | ``triton``. ``lr`` and the other hyperparameters live
    in ``param_groups`` (schedules set ``group["lr"]``). ``zero_grad`` also empties ``sparse_grads``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, mode: str = "dense", backend: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"TableAdamW: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if backend not in BACKENDS:
            raise ValueError(f"TableAdamW: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"TableAdamW: lr must be non-negative, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"TableAdamW: betas must be in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"TableAdamW: eps must be positive and weight_decay non-negative, got {eps}, "
                             f"{weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "mode": mode,
                    "backend": backend}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"TableAdamW: parameters must be 2-D tables, got shape {tuple(p.shape)}")

    def _use_triton(self, group: dict[str, Any], param: torch.Tensor) -> bool:
        if group["backend"] == "torch":
            return False
        if group["backend"] == "triton":
            if triton is None:
                raise RuntimeError("TableAdamW: backend 'triton' asked for but Triton is not installed")
            return True
        return triton is not None and (param.is_cuda or interpreting())

    def _state(self, param: torch.Tensor, mode: str) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32,
                                                   memory_format=torch.contiguous_format)
            if mode == "sparse":
                state["row_step"] = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mode = group["mode"]
            beta1, beta2 = group["betas"]
            hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                     "weight_decay": group["weight_decay"]}
            for param in group["params"]:
                triton_path = self._use_triton(group, param)
                grad = collect_row_grad(param, mode, use_triton=triton_path)
                if grad is None:
                    continue
                if not param.is_contiguous():
                    raise ValueError("TableAdamW: tables must be contiguous")
                state = self._state(param, mode)
                state["step"] += 1
                rows, values = grad.rows, grad.values
                if mode == "dense":
                    fn = dense_step_triton if triton_path else dense_step_torch
                    fn(param, state["exp_avg"], state["exp_avg_sq"], rows, values, step=state["step"], **hyper)
                else:
                    fn = sparse_step_triton if triton_path else sparse_step_torch
                    fn(param, state["exp_avg"], state["exp_avg_sq"], state["row_step"], rows, values, **hyper)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for param in group["params"]:
                pending = getattr(param, "sparse_grads", None)
                if pending:
                    pending.clear()  # in place: the producer appends to this same list

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the modes must agree, the current ``backend`` is kept, and the state
        keeps its dtypes (fp32 moments, int64 row steps) on the parameters' devices."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("TableAdamW: the saved state has a different number of parameter groups")
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            if saved.get("mode") != group["mode"]:
                raise ValueError(f"TableAdamW: the saved state is of mode {saved.get('mode')!r}, this optimizer"
                                 f" runs mode {group['mode']!r}")
        backends = [group["backend"] for group in self.param_groups]
        saved_state = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            if index not in saved_state:
                continue
            entry = saved_state[index]
            state: dict[str, Any] = {"step": int(entry["step"])}
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = entry[key].to(device=param.device, dtype=torch.float32).contiguous()
                if state[key].shape != param.shape:
                    raise ValueError(f"TableAdamW: saved {key} has shape {tuple(state[key].shape)}, the table "
                                     f"{tuple(param.shape)}")
            if "row_step" in entry:
                state["row_step"] = entry["row_step"].to(device=param.device, dtype=torch.int64)
            self.state[param] = state
        for group, backend in zip(self.param_groups, backends, strict=True):
            group["backend"] = backend


__all__ = ["BACKENDS", "MODES", "RowGrad", "TableAdamW", "collect_row_grad", "dense_step_torch",
           "dense_step_triton", "merge_row_grads", "sparse_step_torch", "sparse_step_triton"]
