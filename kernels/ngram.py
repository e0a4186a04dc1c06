"""Fused N-gram Embedding gather (Triton) and its sparse, deterministic table gradient.

Forward (:func:`ngram_gather`): token ids ``(B, T)`` and a :class:`models.ngram.HashPlan` -> the gathered
rows of the concatenated table, ``(B*T, S*d)``, and the row ids ``(B*T, S)`` int64 (kept for the backward).
One kernel hashes and gathers: each program takes ``BLOCK_T`` tokens, loads their ``N`` context ids, walks
the look-back in-kernel (``alive_j = alive_{j-1} and i-j >= 0 and t_{i-j} != EOS``: a token never sees an EOS
behind it nor anything before one, while an EOS as the current token hashes with its full look-back; context
beyond the sequence start is id 0), accumulates all ``S`` hashes at once as a ``(BLOCK_T, BLOCK_S)`` int64 tile
(``acc = (acc + t_{i-j} * (V0^j mod M_s)) mod M_s``, exact as in :mod:`models.ngram`), adds the row offsets,
writes the row ids and copies each sub-table's row (``d`` features, masked to a power-of-two ``BLOCK_D``)
straight into its slot of the output. Scanning back ``N-1`` positions in-kernel replaces the torch cummax of
:func:`models.ngram.lookback_lengths`, so the forward is one launch. The projection stays one torch GEMM.

Backward (:func:`sparse_row_grad`): the ``B*T*S`` gathered-row gradients are reduced into the ``U`` distinct
rows touched, in fp32, in a fixed order: a stable sort of the row ids (int32 keys while the table has fewer
than 2^31 rows: half the radix passes), ``unique_consecutive`` for the segment bounds, then a Triton segment
sum that adds each row's gradients in sorted (row, position) order. Nothing table-sized is ever allocated, and
two backwards give bit-identical values. The result is a :class:`SparseRowGrad` (``rows`` sorted unique int64,
``values`` fp32 ``(U, d)``). :func:`merge_sparse_grads` re-reduces a list of them (micro-batches) the same way.

Autograd (:func:`gather_rows`): a ``torch.autograd.Function`` whose forward takes the table weight and returns
the gathered rows. With ``sparse_grad=True`` its backward appends the :class:`SparseRowGrad` to
``weight.sparse_grads`` (a list; one entry per backward) and returns no gradient, so ``weight.grad`` stays
None; with ``sparse_grad=False`` it scatters the sparse result into a dense gradient (deterministic too).

Every kernel has a plain-PyTorch twin (``reference_*``) that defines its meaning; the Triton versions run on
CUDA tensors, or anywhere with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests). Kernels
are jitted on first use, not at import, so the interpreter switch is read at the first launch and this module
imports without a GPU (or without Triton).

Prediction for ``kernels/bench_ngram.py`` on an H100 (T=16384, D=1024, N=4, K=4, S=12, d=85, 2,000,003 rows per
sub-table, bf16; 196,608 gathered rows, 33 MB read + 33 MB written):

- fused gather ~0.02-0.03 ms (bandwidth-bound, random 170-byte rows; int64 modulo on 12x4 lanes is cheap);
- projection GEMMs: forward 34 GFLOP ~0.06 ms, backward (input and weight gradients) ~0.12 ms;
- sparse backward: int32 radix sort of 196,608 keys with int64 values ~0.03-0.05 ms, unique_consecutive
  (one host sync for U) + cumsum ~0.02-0.03 ms, segment sum (reads 33 MB bf16, writes U x 85 fp32) ~0.02 ms;
- the token table (131072 x 1024 bf16, a dense parameter) stays dense: its gather + dense gradient (256 MB
  zero-fill + embedding backward) ~0.12-0.15 ms, and the elementwise sum/scale ~0.02 ms.

So forward ~0.12 ms and forward+backward ~0.40-0.50 ms (target <= 0.58 ms; floor 0.163 ms, within 3x). What
dominates after this change is not the n-gram tables any more but the GEMMs and the token table's dense
gradient; the sort + sync are the largest n-gram-specific cost. With 8x the rows the sparse path should be
unchanged (it touches the same number of rows), unlike the dense paths whose zero-fill grows 8x.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Protocol

import torch

try:  # a CPU-only install may lack Triton: the reference twins still work
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None
    tl = None


class Plan(Protocol):
    """The fields of :class:`models.ngram.HashPlan` used here (duck-typed: kernels never import models)."""

    max_order: int
    moduli: tuple[int, ...]
    powers: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    total_rows: int


@dataclass
class SparseRowGrad:
    """The gradient of a table restricted to the rows it touched: ``rows`` (U,) int64, sorted and unique;
    ``values`` (U, d) fp32, row ``i`` the gradient of table row ``rows[i]``."""

    rows: torch.Tensor
    values: torch.Tensor

    def to_dense(self, num_rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The equivalent dense ``(num_rows, d)`` gradient (tests and small tables only)."""
        dense = torch.zeros(num_rows, self.values.shape[1], dtype=dtype or self.values.dtype,
                            device=self.values.device)
        return dense.index_copy_(0, self.rows, self.values.to(dense.dtype))


# ------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------

def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_usable(device: torch.device) -> bool:
    """The Triton kernels run on CUDA tensors, or on any tensor under the interpreter."""
    return triton is not None and (device.type == "cuda" or interpreting())


@functools.lru_cache(maxsize=8)
def _plan_tensors(plan: Plan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(moduli (S,), powers (N, S), offsets (S,)) int64 on ``device``, cached per plan."""
    moduli = torch.tensor(plan.moduli, dtype=torch.int64, device=device)
    powers = torch.tensor(plan.powers, dtype=torch.int64, device=device)
    offsets = torch.tensor(plan.offsets, dtype=torch.int64, device=device)
    return moduli, powers, offsets


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ------------------------------------------------------------------------------------------------------------
# Forward: hash + gather
# ------------------------------------------------------------------------------------------------------------

def reference_row_ids(ids: torch.Tensor, plan: Plan, eos_token_id: int | None) -> torch.Tensor:
    """Rows into the concatenated table, ``(..., T)`` -> ``(..., T, S)`` int64: the same walk-back as the
    kernel, in plain PyTorch (a second, independent writing of :func:`models.ngram.ngram_row_ids`)."""
    ids = ids.long()
    moduli, powers, offsets = _plan_tensors(plan, ids.device)
    time = ids.shape[-1]
    acc = torch.zeros((*ids.shape, len(plan.moduli)), dtype=torch.int64, device=ids.device)
    alive = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    for j in range(plan.max_order):
        if j == 0:
            context = ids
        else:
            previous = torch.zeros_like(ids)
            if j < time:
                previous[..., j:] = ids[..., :-j]
            alive = alive.clone()
            alive[..., :min(j, time)] = False  # before the sequence start
            if eos_token_id is not None:
                alive &= previous != eos_token_id  # an EOS behind the token ends its look-back
            context = torch.where(alive, previous, torch.zeros_like(previous))
        acc = torch.remainder(acc + context.unsqueeze(-1) * powers[j], moduli)
    return acc + offsets


def reference_gather(ids: torch.Tensor, weight: torch.Tensor, plan: Plan, eos_token_id: int | None,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`triton_gather`: ``(gathered (B*T, S*d), rows (B*T, S) int64)``."""
    if rows is None:
        rows = reference_row_ids(ids, plan, eos_token_id)
    rows = rows.reshape(-1, len(plan.moduli)).long()
    gathered = weight[rows.reshape(-1)].reshape(rows.shape[0], -1)
    return gathered, rows


def _gather_kernel(ids_ptr, rows_in_ptr, weight_ptr, out_ptr, rows_out_ptr, moduli_ptr, powers_ptr, offsets_ptr,
                   n_tokens, seq_len, eos_id, d, stride_w,
                   S: tl.constexpr, N: tl.constexpr, HASH: tl.constexpr, HAS_EOS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # flat position b*T + t
    tmask = tok < n_tokens
    sub = tl.arange(0, BLOCK_S)
    smask = sub < S
    tile_mask = tmask[:, None] & smask[None, :]
    if HASH:
        pos = tok % seq_len
        moduli = tl.load(moduli_ptr + sub, mask=smask, other=1)
        offsets = tl.load(offsets_ptr + sub, mask=smask, other=0)
        acc = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.int64)
        alive = tmask
        for j in tl.static_range(N):
            t = tl.load(ids_ptr + tok - j, mask=alive & (pos >= j), other=0).to(tl.int64)
            if j > 0:
                alive = alive & (pos >= j)
                if HAS_EOS:
                    alive = alive & (t != eos_id)  # an EOS behind the token: its document starts after it
                t = tl.where(alive, t, 0)
            power = tl.load(powers_ptr + j * S + sub, mask=smask, other=0)
            # acc < M <= 2^31, t < 2^21, power < 2^31: below 2^53, exact in int64
            acc = (acc + t[:, None] * power[None, :]) % moduli[None, :]
        rows = acc + offsets[None, :]
        tl.store(rows_out_ptr + tok[:, None] * S + sub[None, :], rows, mask=tile_mask)
    else:
        rows = tl.load(rows_in_ptr + tok[:, None] * S + sub[None, :], mask=tile_mask, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = tmask[:, None] & (cols < d)[None, :]
    for s in tl.static_range(S):
        row = tl.sum(tl.where(sub[None, :] == s, rows, 0), axis=1)  # column s of the tile: (BLOCK_T,)
        values = tl.load(weight_ptr + row[:, None] * stride_w + cols[None, :], mask=mask)
        tl.store(out_ptr + tok[:, None] * (S * d) + s * d + cols[None, :], values, mask=mask)


def triton_gather(ids: torch.Tensor, weight: torch.Tensor, plan: Plan, eos_token_id: int | None,
                  rows: torch.Tensor | None = None, block_t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash (unless ``rows`` is given) and gather in one kernel: ``(gathered (B*T, S*d), rows (B*T, S))``.
    ``ids`` ``(..., T)``; ``weight`` the concatenated table ``(total_rows, d)`` (any row stride)."""
    num_tables, d = len(plan.moduli), weight.shape[1]
    seq_len = ids.shape[-1]
    ids = ids.reshape(-1).contiguous()
    n_tokens = ids.numel()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty(n_tokens, num_tables * d, dtype=weight.dtype, device=weight.device)
    moduli, powers, offsets = _plan_tensors(plan, weight.device)
    if rows is None:
        rows_out = torch.empty(n_tokens, num_tables, dtype=torch.int64, device=weight.device)
        rows_in = rows_out  # unused
    else:
        rows_out = rows_in = rows.reshape(n_tokens, num_tables).contiguous()
    if n_tokens == 0:
        return out, rows_out
    grid = (triton.cdiv(n_tokens, block_t),)
    _kernels()["gather"][grid](
        ids, rows_in, weight, out, rows_out, moduli, powers, offsets,
        n_tokens, seq_len, -1 if eos_token_id is None else eos_token_id, d, weight.stride(0),
        S=num_tables, N=plan.max_order, HASH=rows is None, HAS_EOS=eos_token_id is not None,
        BLOCK_T=block_t, BLOCK_S=_next_pow2(num_tables), BLOCK_D=_next_pow2(d), num_warps=4)
    return out, rows_out


def ngram_gather(ids: torch.Tensor, weight: torch.Tensor, plan: Plan, eos_token_id: int | None,
                 rows: torch.Tensor | None = None, use_triton: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel where usable (CUDA, or the interpreter), the twin otherwise; no autograd."""
    if use_triton is None:
        use_triton = triton_usable(weight.device)
    fn = triton_gather if use_triton else reference_gather
    return fn(ids, weight, plan, eos_token_id, rows=rows)


# ------------------------------------------------------------------------------------------------------------
# Backward: deterministic segment reduce into the touched rows
# ------------------------------------------------------------------------------------------------------------

def _sorted_segments(rows: torch.Tensor, num_rows: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of the flat row ids -> (unique rows (U,), segment starts (U+1,), order (R,) int64)."""
    keys = rows.reshape(-1)
    if num_rows is not None and num_rows < 2**31:
        keys = keys.to(torch.int32)  # half the radix passes of int64
    sorted_keys, order = torch.sort(keys, stable=True)
    unique, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    starts = torch.zeros(unique.numel() + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, dim=0, out=starts[1:])
    return unique.long(), starts, order


def reference_segment_sum(values: torch.Tensor, starts: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Twin of the segment-sum kernel: ``out[u] = sum_{k in [starts[u], starts[u+1])} values[order[k]]`` in
    fp32, added in ``k`` order (``index_add_`` on CPU walks the index sequentially, so the sums match the
    kernel's bit for bit; on CUDA it is atomic and only the kernel is deterministic)."""
    num_unique = starts.numel() - 1
    segment = torch.repeat_interleave(torch.arange(num_unique, device=values.device), starts.diff())
    out = torch.zeros(num_unique, values.shape[1], dtype=torch.float32, device=values.device)
    return out.index_add_(0, segment, values[order].float())


def _segment_sum_kernel(values_ptr, order_ptr, starts_ptr, out_ptr, n_unique, d,
                        BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr):
    unique = (tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)).to(tl.int64)
    umask = unique < n_unique
    start = tl.load(starts_ptr + unique, mask=umask, other=0)
    count = tl.load(starts_ptr + unique + 1, mask=umask, other=0) - start
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    acc = tl.zeros([BLOCK_U, BLOCK_D], dtype=tl.float32)
    for c in range(0, tl.max(count, axis=0)):  # fixed order: each row's entries in sorted (row, position) order
        valid = c < count
        source = tl.load(order_ptr + start + c, mask=valid, other=0)
        acc += tl.load(values_ptr + source[:, None] * d + cols[None, :],
                       mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + unique[:, None] * d + cols[None, :], acc, mask=umask[:, None] & cmask[None, :])


def triton_segment_sum(values: torch.Tensor, starts: torch.Tensor, order: torch.Tensor,
                       block_u: int = 16) -> torch.Tensor:
    """Kernel form of :func:`reference_segment_sum`: ``(U, d)`` fp32."""
    values = values.contiguous()
    num_unique, d = starts.numel() - 1, values.shape[1]
    out = torch.empty(num_unique, d, dtype=torch.float32, device=values.device)
    if num_unique == 0:
        return out
    grid = (triton.cdiv(num_unique, block_u),)
    _kernels()["segment_sum"][grid](values, order, starts, out, num_unique, d,
                                    BLOCK_U=block_u, BLOCK_D=_next_pow2(d), num_warps=4)
    return out


def sparse_row_grad(rows: torch.Tensor, grad_rows: torch.Tensor, num_rows: int | None = None,
                    use_triton: bool | None = None) -> SparseRowGrad:
    """Reduce per-lookup gradients ``grad_rows`` ``(R, d)`` (lookup ``r`` read table row ``rows[r]``) into
    the distinct rows: deterministic, fp32, nothing table-sized. ``num_rows`` (the table's row count) lets
    the sort use int32 keys."""
    if use_triton is None:
        use_triton = triton_usable(grad_rows.device)
    grad_rows = grad_rows.reshape(-1, grad_rows.shape[-1])
    unique, starts, order = _sorted_segments(rows, num_rows)
    reduce = triton_segment_sum if use_triton else reference_segment_sum
    return SparseRowGrad(rows=unique, values=reduce(grad_rows, starts, order))


def merge_sparse_grads(grads: list[SparseRowGrad], use_triton: bool | None = None) -> SparseRowGrad:
    """One :class:`SparseRowGrad` equal to the sum of ``grads`` (e.g. one per micro-batch): concatenated,
    then re-reduced in a fixed order (list order within a row), so the result is deterministic."""
    if not grads:
        raise ValueError("merge_sparse_grads: empty list of sparse gradients")
    if len(grads) == 1:
        return grads[0]
    rows = torch.cat([g.rows for g in grads])
    values = torch.cat([g.values.float() for g in grads])
    return sparse_row_grad(rows, values, use_triton=use_triton)


# ------------------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------------------

class _GatherRows(torch.autograd.Function):
    """weight -> gathered rows; the backward reduces into the touched rows (sparse or scattered dense)."""

    @staticmethod
    def forward(ctx, weight, ids, rows, plan, eos_token_id, use_triton, sparse_grad):
        gathered, row_ids = ngram_gather(ids, weight, plan, eos_token_id, rows=rows, use_triton=use_triton)
        ctx.save_for_backward(row_ids)
        ctx.weight = weight
        ctx.sparse_grad = sparse_grad
        return gathered

    @staticmethod
    def backward(ctx, grad_gathered):
        (row_ids,) = ctx.saved_tensors
        weight = ctx.weight
        d = weight.shape[1]
        grad = sparse_row_grad(row_ids, grad_gathered.reshape(-1, d), num_rows=weight.shape[0])
        if ctx.sparse_grad:
            if getattr(weight, "sparse_grads", None) is None:
                weight.sparse_grads = []
            weight.sparse_grads.append(grad)
            return (None,) * 7
        dense = torch.zeros_like(weight).index_copy_(0, grad.rows, grad.values.to(weight.dtype))
        return (dense,) + (None,) * 6


@torch.compiler.disable  # a graph break under torch.compile: the backward has side effects and a host sync
def gather_rows(weight: torch.Tensor, ids: torch.Tensor, plan: Plan, eos_token_id: int | None, *,
                rows: torch.Tensor | None = None, backend: str = "triton", sparse_grad: bool = False
                ) -> torch.Tensor:
    """Differentiable gather of the hashed rows: ``(..., T)`` ids -> ``(..., T, S*d)``.

    ``backend="triton"`` runs the fused kernel where usable (CUDA, or ``TRITON_INTERPRET=1``) and the twin
    otherwise; ``"torch"`` always the twin. The gradient reduction uses the segment-sum kernel where usable.
    ``sparse_grad=True``: the table gradient is appended to ``weight.sparse_grads`` as a
    :class:`SparseRowGrad` and ``weight.grad`` is left alone; otherwise ``weight.grad`` gets the dense
    gradient (computed through the same deterministic sparse reduction).
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" and triton_usable(weight.device)
    gathered = _GatherRows.apply(weight, ids, rows, plan, eos_token_id, use_triton, sparse_grad)
    return gathered.reshape(*ids.shape, -1)


@functools.lru_cache(maxsize=2)
def _jitted(interpret: bool) -> dict:
    # triton.jit picks the interpreter or the compiler when it decorates, so decorate at first launch
    # (keyed by the switch), not at import.
    del interpret
    return {"gather": triton.jit(_gather_kernel), "segment_sum": triton.jit(_segment_sum_kernel)}


def _kernels() -> dict:
    if triton is None:
        raise RuntimeError("kernels.ngram: Triton is not installed")
    return _jitted(interpreting())


__all__ = [
    "SparseRowGrad",
    "gather_rows",
    "interpreting",
    "merge_sparse_grads",
    "ngram_gather",
    "reference_gather",
    "reference_row_ids",
    "reference_segment_sum",
    "sparse_row_grad",
    "triton_gather",
    "triton_segment_sum",
    "triton_usable",
]
