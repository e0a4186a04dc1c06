"""AdamW for lookup tables whose gradients arrive as touched rows (``weight.sparse_grads``).

The N-gram Embedding's sparse-gradient path (:mod:`embscale.kernels.ngram`,
``NgramEmbedding(sparse_grad=True)``) leaves ``tables.weight.grad`` None and appends one ``SparseRowGrad`` per
backward to ``tables.weight.sparse_grads``. :class:`TableAdamW` consumes that list (merged with
:func:`embscale.kernels.ngram.merge_sparse_grads`), never builds a dense ``(R, d)`` gradient, and clears the list
in ``zero_grad``. A plain dense ``.grad`` is accepted too (see :func:`collect_row_grad`).

Gradient contract (padded, no host sync). A row gradient is ``rows`` (P,) int64 sorted ascending and
``values`` (P, d) fp32: the first U entries are the distinct touched rows, the remaining P - U entries are
:data:`PAD_ROW` (``2**63 - 1``, equal to ``embscale.kernels.ngram.PAD_ROW``; it sorts after every real row) and
their ``values`` rows are exactly zero. P is static (the number of lookups); U is known only on the device, and no
consumer here needs it on the host on the Triton path: the dense kernel's binary search only looks at rows
below the table size (``PAD_ROW`` never matches a table row), and the sparse kernel runs over all P slots and
skips those whose row is not a table row. The PyTorch twins drop the padding with a boolean mask (a host sync,
acceptable in a reference). P = 0 and all-padding gradients are valid (no row is touched).

Two modes (``mode=``):

``dense``: exactly ``torch.optim.AdamW`` (``amsgrad=False``) as if the gradient were the dense ``(R, d)``
tensor with zeros in the untouched rows: every row's moments decay every step (``m = b1 m``, ``v = b2 v`` where
``g = 0``), bias correction uses the global step ``t``, decoupled weight decay shrinks every row::

    p = p * (1 - lr wd);  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The cost is one pass over the whole table per step. Triton scheme: one program per block of ``BLOCK_R``
consecutive table rows. The touched rows that fall in the block are a contiguous range of the sorted
``rows`` (``block_lo[b] .. block_lo[b+1]``, from one ``searchsorted`` of the block starts: ``R / BLOCK_R``
entries; padding sorts after the last block start, so it is in no block's range); each row of the block finds
its gradient slot by a vectorised binary search in that range (``log2(BLOCK_R) + 1`` probes), and reads
``g = values[slot]`` or ``g = 0`` when absent. Nothing table-sized beyond the parameter and its moments is
read or written: no dense gradient, no row->slot map. The PyTorch twin does the same with whole-table ops for
``g = 0`` and index ops for the touched rows.

``sparse``: lazy Adam. Only touched rows change: their moments, their parameter, and their own step count
``row_step[r]`` (the number of steps that touched row ``r``), which drives their bias correction::

    t_r = row_step[r] += 1
    p_r = p_r * (1 - lr wd);  m_r = lerp(m_r, g_r, 1 - b1);  v_r = b2 v_r + (1 - b2) g_r^2
    p_r = p_r - lr / (1 - b1^t_r) * m_r / (sqrt(v_r) / sqrt(1 - b2^t_r) + eps)

Differences from ``dense`` (and from AdamW): an untouched row's moments do not decay, so when it is touched
again it resumes from stale moments (as if no steps had passed); its bias correction counts only its own
steps; weight decay is applied only at the steps that touch it (a rarely used row is decayed rarely); ``lr``
is the learning rate of the step that touches the row. The step costs O(P d) (gradient slots), not O(R d).
Triton scheme: one program per block of ``BLOCK_U`` gradient slots (the real rows are unique, so no two
programs write one row); padding slots are masked off. Everything per row happens in the kernel, with no
torch index op over the rows and no host sync: it loads ``row_step[r]``, adds one and stores it, and computes
``lr / (1 - b1^t_r)`` and ``sqrt(1 - b2^t_r)`` in float64 as ``exp(t_r log b)`` before using them in fp32.
(``lr`` and ``log b`` reach the kernel as fp32 scalars, Triton's float arguments; that perturbs
``1 - b^t`` by at most 2^-24 relative, since ``y / (e^y - 1) <= 1``, so kernel and twin agree to an fp32 ulp
or two.) The twin computes the same corrections with ``torch.pow`` in float64 (:func:`_row_corrections`).

Two kinds of optimizer state (``moments=``):

``full`` (default): ``exp_avg`` and ``exp_avg_sq`` in fp32, one per table element: the formulas above.

``compact``: for tables too large for two fp32 moments (at 8x the benchmark rows the tables hold 16.3B
parameters, 30 GiB in bf16, and fp32 moments would take 130 GB, more than an 80 GB GPU). ``exp_avg`` is kept
per element in bf16 (all arithmetic in fp32, rounded to nearest even on store; DeepSeek-V3 keeps its AdamW
moments in BF16), ``exp_avg_sq`` per row in fp32, shape ``(R,)``: the row's mean over its ``d`` features of
``g^2`` enters the average and one denominator scales every feature of the row::

    m_r = lerp(m_r, g_r, 1 - b1)                    (per element, stored in bf16)
    v_r = b2 v_r + (1 - b2) mean_j(g_rj^2)          (one fp32 number per row)
    p_r = p_r - lr / (1 - b1^t) * m_r / (sqrt(v_r) / sqrt(1 - b2^t) + eps)

This is FBGEMM's ``PARTIAL_ROWWISE_ADAM`` (``EmbOptimType.PARTIAL_ROWWISE_ADAM`` of ``fbgemm_gpu``'s split
table-batched embeddings, ``fbgemm_gpu/codegen/genscript/optimizers.py``) with AdamW's decoupled weight decay.
It is a different optimizer from AdamW, not an approximation of it: the second moment is shared by a row's
features, so per-feature scale differences within a row are not normalised away, and ``m`` carries bf16
rounding. Both modes support it (``dense``: every row's ``m`` and ``v`` decay each step, global ``t``;
``sparse``: lazily on touched rows, per-row ``t_r``). Memory at 8x rows: table 32.6 GB bf16 + ``m`` 32.6 GB
bf16 + ``v`` 0.8 GB + ``row_step`` 1.5 GB (sparse mode), instead of 130 GB for ``full``'s moments. The
kernels take it as a constexpr switch (``COMPACT``): a row's ``sum_j g^2`` is reduced over its column blocks
first, then the row is updated (the gradient row is read twice); ``full`` keeps its single pass, unchanged.

State per parameter: ``exp_avg`` ((R, d), fp32 or bf16), ``exp_avg_sq`` (fp32, (R, d) or (R,)), ``step``
(int, optimizer steps that updated the parameter) and, in ``sparse`` mode, ``row_step`` (int64, (R,)).
``state_dict`` / ``load_state_dict`` round-trip through ``torch.save`` / ``torch.load(weights_only=True)`` and
keep those dtypes and shapes (the base class would cast every non-``step`` tensor to the parameter's dtype);
loading a state saved with the other ``mode`` or ``moments`` raises ``ValueError`` naming both.

Backends (``backend=``): ``auto`` runs the Triton kernels on CUDA tensors, or anywhere under
``TRITON_INTERPRET=1``, and the PyTorch twin otherwise; ``torch`` and ``triton`` force one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; keep the twin usable without it
    triton = None
    tl = None

from embscale.kernels.runtime import interpreting, lazy_kernels
from embscale.kernels.runtime import next_pow2 as _next_pow2

MODES = ("dense", "sparse")
MOMENTS = ("full", "compact")
BACKENDS = ("auto", "torch", "triton")
# The row id of a gradient's padding slots. Must equal embscale.kernels.ngram.PAD_ROW (tests assert it); defined
# here too so that this module does not import embscale.kernels.ngram to read a constant.
PAD_ROW = 2**63 - 1


# ------------------------------------------------------------------------------------------------------------
# Gradients: sparse rows (and dense for generality)
# ------------------------------------------------------------------------------------------------------------

class RowGrad:
    """A gradient restricted to rows, padded: ``rows`` (P,) int64 sorted ascending, the first U the distinct
    touched rows and the rest :data:`PAD_ROW`; ``values`` (P, d) fp32, zero in the padding rows. (The shape
    of ``embscale.kernels.ngram.SparseRowGrad``; any object with ``.rows`` and ``.values`` is accepted.)"""

    __slots__ = ("rows", "values")

    def __init__(self, rows: torch.Tensor, values: torch.Tensor):
        self.rows = rows
        self.values = values


def _drop_padding(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real rows of a padded gradient (a boolean mask: a host sync, for the PyTorch twins only)."""
    real = rows != PAD_ROW
    return rows[real], values[real]


def _merge_row_grads_torch(grads: list[Any]) -> RowGrad:
    """The sum of padded row gradients as one padded row gradient of P = sum of the P's (PyTorch, host
    syncs): the distinct real rows first, sorted, then padding."""
    rows = torch.cat([g.rows for g in grads])
    values = torch.cat([g.values.float() for g in grads])
    real_rows, real_values = _drop_padding(rows, values)
    unique, inverse = torch.unique(real_rows, sorted=True, return_inverse=True)
    merged = values.new_zeros(rows.numel(), values.shape[1])
    merged[:unique.numel()].index_add_(0, inverse, real_values)
    out_rows = torch.full_like(rows, PAD_ROW)
    out_rows[:unique.numel()] = unique
    return RowGrad(out_rows, merged)


def merge_row_grads(grads: list[Any], use_triton: bool | None = None) -> Any:
    """The sum of ``grads`` (padded row gradients, see :class:`RowGrad`) as one such object.

    Uses :func:`embscale.kernels.ngram.merge_sparse_grads` (deterministic re-reduction; ``use_triton`` None lets
    it choose); one gradient is returned as is."""
    if not grads:
        raise ValueError("merge_row_grads: empty list of gradients")
    if len(grads) == 1:
        return grads[0]
    try:
        from embscale.kernels.ngram import merge_sparse_grads
    except ImportError:  # pragma: no cover - embscale.kernels.ngram ships with this module
        return _merge_row_grads_torch(list(grads))
    return merge_sparse_grads(list(grads), use_triton=use_triton)


def _dense_grad_rows(dense: torch.Tensor, mode: str) -> RowGrad:
    """A dense ``(R, d)`` gradient as a row gradient, without a host sync: every row in ``dense`` mode; in
    ``sparse`` mode the rows with any non-zero entry first (sorted), then padding (P = R)."""
    num_rows = dense.shape[0]
    index = torch.arange(num_rows, device=dense.device)
    if mode == "dense":
        return RowGrad(index, dense.float())
    keys = torch.where(dense.ne(0).any(dim=1), index, torch.full_like(index, PAD_ROW))
    rows = keys.sort().values
    real = rows != PAD_ROW
    values = dense.index_select(0, torch.where(real, rows, 0)).float()
    return RowGrad(rows, torch.where(real[:, None], values, 0.0))


def collect_row_grad(param: torch.Tensor, mode: str, use_triton: bool | None = None) -> Any | None:
    """The parameter's gradient for this step as padded rows (None when it has none).

    ``param.sparse_grads`` (a list, one entry per backward) is merged. A dense ``param.grad`` counts as
    every row in ``dense`` mode (plain AdamW) and as its rows with any non-zero entry in ``sparse`` mode
    (an ``nn.Embedding``'s untouched rows have exactly zero gradient); both together are summed."""
    grads = list(getattr(param, "sparse_grads", None) or [])
    if param.grad is not None:
        if param.grad.is_sparse:
            raise ValueError("TableAdamW: torch sparse (COO) gradients are not supported; use sparse_grads")
        grads.append(_dense_grad_rows(param.grad, mode))
    if not grads:
        return None
    return merge_row_grads(grads, use_triton)


def _is_compact(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """Which moments the state tensors are: ``full`` (fp32 (R, d) twice) or ``compact`` (bf16 (R, d) and
    fp32 (R,)); anything else is refused."""
    if exp_avg.shape != param.shape or exp_avg_sq.dtype != torch.float32:
        raise ValueError(f"TableAdamW: moments of shapes {tuple(exp_avg.shape)}, {tuple(exp_avg_sq.shape)} "
                         f"({exp_avg.dtype}, {exp_avg_sq.dtype}) do not fit a table of shape {tuple(param.shape)}")
    if exp_avg.dtype == torch.float32 and exp_avg_sq.shape == param.shape:
        return False
    if exp_avg.dtype == torch.bfloat16 and exp_avg_sq.shape == param.shape[:1]:
        return True
    raise ValueError(f"TableAdamW: moments {exp_avg.dtype} {tuple(exp_avg.shape)} and {exp_avg_sq.dtype} "
                     f"{tuple(exp_avg_sq.shape)} are neither full (fp32, fp32 per element) nor compact (bf16 per "
                     "element, fp32 per row)")


# ------------------------------------------------------------------------------------------------------------
# PyTorch twins (define the meaning)
# ------------------------------------------------------------------------------------------------------------

def dense_step_torch(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rows: torch.Tensor,
                     values: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float) -> None:
    """AdamW over the whole table with gradient ``values`` at ``rows`` (padded) and 0 elsewhere (``step`` is
    the global step count after this step). Full moments: the op sequence is torch's single-tensor AdamW, so
    the result matches it to the last bit or so. Compact moments (bf16 ``exp_avg``, per-row ``exp_avg_sq``):
    the same with the row-wise second moment, through a table-sized fp32 copy of ``exp_avg``."""
    compact = _is_compact(param, exp_avg, exp_avg_sq)
    rows, values = _drop_padding(rows, values)
    p = param if param.dtype == torch.float32 else param.float()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    values = values.to(torch.float32)
    m = exp_avg.float() if compact else exp_avg  # the fp32 copy is rounded back into bf16 at the end
    touched_m = m.index_select(0, rows).lerp_(values, 1 - beta1)
    if compact:
        touched_v = exp_avg_sq.index_select(0, rows).mul_(beta2).add_(values.square().mean(dim=1),
                                                                       alpha=1 - beta2)
    else:
        touched_v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
    m.lerp_(m.new_zeros(()), 1 - beta1)  # untouched rows: g = 0
    exp_avg_sq.mul_(beta2)
    m.index_copy_(0, rows, touched_m)
    exp_avg_sq.index_copy_(0, rows, touched_v)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom[:, None] if compact else denom, value=-step_size)
    if compact:
        exp_avg.copy_(m)
    if p is not param:
        param.copy_(p)


def _row_corrections(row_step: torch.Tensor, rows: torch.Tensor, lr: float, beta1: float, beta2: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the touched rows' step counts; their ``lr / (1 - b1^t)`` and ``sqrt(1 - b2^t)`` (fp32, (U,)),
    computed in float64. (The twin's; the sparse kernel does the same in-kernel.)"""
    steps = row_step.index_select(0, rows) + 1
    row_step.index_copy_(0, rows, steps)
    t = steps.double()
    step_size = (lr / (1 - torch.pow(beta1, t))).float()
    bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt().float()
    return step_size, bias_correction2_sqrt


def sparse_step_torch(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      row_step: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, *, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Lazy AdamW on the touched ``rows`` only (padded; each row with its own step count ``row_step``), with
    full or compact moments."""
    compact = _is_compact(param, exp_avg, exp_avg_sq)
    rows, values = _drop_padding(rows, values)
    step_size, bias_correction2_sqrt = _row_corrections(row_step, rows, lr, beta1, beta2)
    values = values.to(torch.float32)
    p = param.index_select(0, rows).float()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m = exp_avg.index_select(0, rows).float().lerp_(values, 1 - beta1)
    if compact:
        v = exp_avg_sq.index_select(0, rows).mul_(beta2).add_(values.square().mean(dim=1), alpha=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)[:, None]
    else:
        v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt[:, None]).add_(eps)
    p.sub_(step_size[:, None] * m / denom)
    exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, rows, v)
    param.index_copy_(0, rows, p.to(param.dtype))


# ------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------
# Conventions shared by both kernels. No triton.language.standard helper (tl.sum, tl.zeros, ...): the
# interpreter cannot call those jitted helpers when triton was imported before TRITON_INTERPRET was set; the
# row sums go through tl.reduce with this module's combine function instead. The bf16 first moment is rounded
# to nearest even by integer ops (as torch's .to(torch.bfloat16)): the interpreter's own fp32 -> bf16 cast
# truncates, and the explicit form gives the same bits there and on the GPU.

def _add(a, b):
    return a + b


_add_combine = triton.jit(_add) if triton is not None else None


_adam_rows = None  # _adam_rows_fn jitted, set by _build_kernels before either kernel is compiled


def _adam_rows_fn(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, values_ptr, table_rows, row_ok, grad_slots, grad_ok, d,
                  step_size, bias_correction2_sqrt, beta1, beta2, eps, decay_factor,
                  BLOCK_D: tl.constexpr, COMPACT: tl.constexpr, PER_ROW: tl.constexpr):
    # One Adam(W) step on rows `table_rows` (where row_ok) of a (rows, d) table, shared by both kernels. Row
    # i's gradient is values[grad_slots[i]] where grad_ok[i], zero elsewhere (its moments still decay).
    # PER_ROW: step_size and bias_correction2_sqrt are per-row vectors (the sparse kernel's row steps), else
    # scalars (the dense kernel: broadcasting them as vectors measurably slowed its step; BENCHMARKS.md).
    rows = table_rows.to(tl.int64)
    if PER_ROW:
        step = step_size[:, None]
        correction = bias_correction2_sqrt[:, None]
    else:
        step = step_size
        correction = bias_correction2_sqrt
    if COMPACT:
        # The row's mean of g^2 (0 without a gradient), then its second moment and denominator.
        sum_sq = tl.full(row_ok.shape, 0.0, tl.float32)
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            gmask = (row_ok & grad_ok)[:, None] & (cols < d)[None, :]
            g = tl.load(values_ptr + grad_slots[:, None] * d + cols[None, :], mask=gmask, other=0.0).to(tl.float32)
            sum_sq += tl.reduce(g * g, 1, _add_combine)
        v = tl.load(exp_avg_sq_ptr + rows, mask=row_ok, other=0.0)
        v = v * beta2 + (1.0 - beta2) * (sum_sq / d)
        tl.store(exp_avg_sq_ptr + rows, v, mask=row_ok)
        if PER_ROW:
            denom = tl.sqrt(v)[:, None] / correction + eps
        else:
            denom = (tl.sqrt(v) / correction + eps)[:, None]
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < d)[None, :]
        offs = rows[:, None] * d + cols[None, :]
        g = tl.load(values_ptr + grad_slots[:, None] * d + cols[None, :], mask=mask & grad_ok[:, None], other=0.0)
        g = g.to(tl.float32)
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pf = p.to(tl.float32) * decay_factor
        m = m + (1.0 - beta1) * (g - m)
        if COMPACT:
            pf = pf - step * (m / denom)
            tl.store(param_ptr + offs, pf.to(p.dtype), mask=mask)
            bits = m.to(tl.int32, bitcast=True)  # round to nearest even into bf16; NaN stays NaN
            bits = tl.where(m != m, 0x7FC00000, bits + (0x7FFF + ((bits >> 16) & 1)))
            tl.store(exp_avg_ptr + offs, (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
            v = v * beta2 + (1.0 - beta2) * g * g
            pf = pf - step * (m / (tl.sqrt(v) / correction + eps))
            tl.store(param_ptr + offs, pf.to(p.dtype), mask=mask)
            tl.store(exp_avg_ptr + offs, m, mask=mask)
            tl.store(exp_avg_sq_ptr + offs, v, mask=mask)


def _dense_kernel(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, rows_ptr, values_ptr, block_lo_ptr, num_rows, d,
                  lr, beta1, beta2, eps, decay_factor, step_size, bias_correction2_sqrt,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                  COMPACT: tl.constexpr):
    pid = tl.program_id(0)
    table_rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = table_rows < num_rows
    lo = tl.load(block_lo_ptr + pid)
    hi = tl.load(block_lo_ptr + pid + 1)
    # Binary search of each table row in rows[lo:hi] (sorted; padding lies beyond the last block's hi):
    # first position whose row is >= table_row. tl.full, not tl.zeros (see above).
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
    # row i's gradient is values[slot[i]] when touched; untouched rows take the step with a zero gradient
    _adam_rows(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, values_ptr, table_rows, row_ok, slot, touched, d,
               step_size, bias_correction2_sqrt, beta1, beta2, eps, decay_factor, BLOCK_D=BLOCK_D,
               COMPACT=COMPACT, PER_ROW=False)


def _sparse_kernel(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, row_step_ptr, rows_ptr, values_ptr, num_slots,
                   num_rows, d, lr, log_beta1, log_beta2, beta1, beta2, eps, decay_factor,
                   BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr, COMPACT: tl.constexpr):
    pid = tl.program_id(0)
    slots = (pid * BLOCK_U + tl.arange(0, BLOCK_U)).to(tl.int64)
    slot_ok = slots < num_slots
    table_rows = tl.load(rows_ptr + slots, mask=slot_ok, other=0)
    # Padding slots (PAD_ROW, beyond every table row) change nothing; the real rows are unique.
    valid = slot_ok & (table_rows >= 0) & (table_rows < num_rows)
    table_rows = tl.where(valid, table_rows, 0)
    t = tl.load(row_step_ptr + table_rows, mask=valid, other=0) + 1
    tl.store(row_step_ptr + table_rows, t, mask=valid)
    # Bias corrections in float64: b^t = exp(t log b), then lr / (1 - b1^t) and sqrt(1 - b2^t) used in fp32.
    t64 = t.to(tl.float64)
    step_size = (lr / (1.0 - tl.exp(t64 * log_beta1))).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(t64 * log_beta2)).to(tl.float32)
    _adam_rows(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, values_ptr, table_rows, valid, slots, valid, d,
               step_size, bias_correction2_sqrt, beta1, beta2, eps, decay_factor, BLOCK_D=BLOCK_D,
               COMPACT=COMPACT, PER_ROW=True)


def _build_kernels() -> dict:
    # the shared row step is called from both kernels by its global name, so it is jitted here too (one mode
    # per process: the interpreter in the tests, the compiler on a GPU)
    globals()["_adam_rows"] = triton.jit(_adam_rows_fn)
    return {"dense": triton.jit(_dense_kernel), "sparse": triton.jit(_sparse_kernel)}


def _kernels() -> dict:
    return lazy_kernels(__name__, _build_kernels)


def _column_block(d: int) -> int:
    return min(_next_pow2(d), 128)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # beta 0: b^t = exp(-inf) = 0


def dense_step_triton(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rows: torch.Tensor,
                      values: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, block_rows: int | None = None) -> None:
    """:func:`dense_step_torch` as one Triton pass over the table (see the module docstring); no host sync."""
    compact = _is_compact(param, exp_avg, exp_avg_sq)
    num_rows, d = param.shape
    block_d = _column_block(d)
    block_r = block_rows or max(1, min(64, 2048 // block_d))
    n_blocks = triton.cdiv(num_rows, block_r)
    rows = rows.contiguous()
    starts = torch.arange(0, (n_blocks + 1) * block_r, block_r, device=param.device)
    # Padding (PAD_ROW) sorts after the last start, so block_lo[n_blocks] = U: it is in no block's range.
    block_lo = torch.searchsorted(rows, starts).to(torch.int64)  # (n_blocks + 1,)
    values = values.to(torch.float32).contiguous()
    if rows.numel() == 0:  # keep valid pointers (never read: every block's range is empty)
        rows = torch.zeros(1, dtype=torch.int64, device=param.device)
        values = torch.zeros(1, d, dtype=torch.float32, device=param.device)
    _kernels()["dense"][(n_blocks,)](
        param, exp_avg, exp_avg_sq, rows, values, block_lo, num_rows, d,
        lr, beta1, beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5,
        BLOCK_R=block_r, BLOCK_D=block_d, SEARCH_STEPS=block_r.bit_length(), COMPACT=compact, num_warps=4)


def sparse_step_triton(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       row_step: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, *, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float,
                       block_touched: int | None = None) -> None:
    """:func:`sparse_step_torch` as one Triton launch over the P gradient slots (padding skipped in-kernel;
    step counts and bias corrections in-kernel; no host sync)."""
    compact = _is_compact(param, exp_avg, exp_avg_sq)
    num_slots = rows.numel()
    if num_slots == 0:
        return
    num_rows, d = param.shape
    block_d = _column_block(d)
    block_u = block_touched or max(1, min(64, 2048 // block_d))
    _kernels()["sparse"][(triton.cdiv(num_slots, block_u),)](
        param, exp_avg, exp_avg_sq, row_step, rows.contiguous(), values.to(torch.float32).contiguous(),
        num_slots, num_rows, d, lr, _log(beta1), _log(beta2), beta1, beta2, eps, 1 - lr * weight_decay,
        BLOCK_U=block_u, BLOCK_D=block_d, COMPACT=compact, num_warps=4)


# ------------------------------------------------------------------------------------------------------------
# The optimizer
# ------------------------------------------------------------------------------------------------------------

class TableAdamW(torch.optim.Optimizer):
    """AdamW for 2-D lookup tables with row-sparse gradients (``param.sparse_grads``) or dense ones.

    ``mode``: ``dense`` (exactly AdamW) or ``sparse`` (lazy, touched rows only); ``moments``: ``full`` (fp32
    per element) or ``compact`` (bf16 first moment per element, fp32 second moment per row: FBGEMM's
    partial row-wise Adam, a different optimizer); see the module docstring for the semantics. ``backend``:
    ``auto`` | ``torch`` | ``triton``. ``lr`` and the other hyperparameters live in ``param_groups``
    (schedules set ``group["lr"]``). ``zero_grad`` also empties ``sparse_grads``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, mode: str = "dense", backend: str = "auto",
                 moments: str = "full"):
        if mode not in MODES:
            raise ValueError(f"TableAdamW: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if moments not in MOMENTS:
            raise ValueError(f"TableAdamW: moments must be one of {', '.join(MOMENTS)}, got {moments!r}")
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
                    "moments": moments, "backend": backend}
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

    def _state(self, param: torch.Tensor, mode: str, moments: str) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["step"] = 0
            if moments == "compact":
                state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16,
                                                    memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
            else:
                state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32,
                                                    memory_format=torch.contiguous_format)
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
                state = self._state(param, mode, group["moments"])
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
        """Load a :meth:`state_dict`; ``mode`` and ``moments`` must agree (a state saved before ``moments``
        existed is ``full``), the current ``backend`` is kept, and the state keeps its dtypes and shapes
        (fp32 or bf16 ``exp_avg``, per-element or per-row fp32 ``exp_avg_sq``, int64 row steps) on the
        parameters' devices."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("TableAdamW: the saved state has a different number of parameter groups")
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            if saved.get("mode") != group["mode"]:
                raise ValueError(f"TableAdamW: the saved state is of mode {saved.get('mode')!r}, this optimizer"
                                 f" runs mode {group['mode']!r}")
            if saved.get("moments", "full") != group["moments"]:
                raise ValueError(f"TableAdamW: the saved state has moments {saved.get('moments', 'full')!r}, "
                                 f"this optimizer keeps moments {group['moments']!r}")
        kept = [(group["backend"], group["moments"]) for group in self.param_groups]
        saved_state = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for group, (backend, moments) in zip(self.param_groups, kept, strict=True):
            group["backend"], group["moments"] = backend, moments
        params = [(p, group["moments"]) for group in self.param_groups for p in group["params"]]
        for index, (param, moments) in enumerate(params):
            if index not in saved_state:
                continue
            entry = saved_state[index]
            compact = moments == "compact"
            expected = {"exp_avg": (torch.bfloat16 if compact else torch.float32, tuple(param.shape)),
                        "exp_avg_sq": (torch.float32, tuple(param.shape[:1]) if compact else tuple(param.shape))}
            state: dict[str, Any] = {"step": int(entry["step"])}
            for key, (dtype, shape) in expected.items():
                if tuple(entry[key].shape) != shape:
                    raise ValueError(f"TableAdamW: saved {key} has shape {tuple(entry[key].shape)}, moments "
                                     f"{moments!r} of a table of shape {tuple(param.shape)} need {shape}")
                state[key] = entry[key].to(device=param.device, dtype=dtype).contiguous()
            if "row_step" in entry:
                state["row_step"] = entry["row_step"].to(device=param.device, dtype=torch.int64)
            self.state[param] = state


def merge_pending_row_grads(tables: Sequence[Any]) -> list[Any]:
    """Each table's pending row gradients (``sparse_grads``, one per micro-batch) merged in place into one entry
    (:func:`merge_row_grads`); returns the merged ``values`` of the tables that have any (what gradient clipping
    measures and scales)."""
    values = []
    for table in tables:
        pending = getattr(table, "sparse_grads", None)
        if pending:
            merged = merge_row_grads(list(pending))
            pending[:] = [merged]
            values.append(merged.values)
    return values


__all__ = ["BACKENDS", "MODES", "MOMENTS", "PAD_ROW", "RowGrad", "TableAdamW", "collect_row_grad",
           "merge_pending_row_grads",
           "dense_step_torch", "dense_step_triton", "merge_row_grads", "sparse_step_torch", "sparse_step_triton"]
