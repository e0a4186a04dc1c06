"""MoE expert selection (Triton): top-``k`` of the biased router scores and each expert's load, one kernel.

The MoE layer (:mod:`embscale.models.moe`) picks, for each token, the ``k`` largest of ``scores +
correction_bias`` (``scores`` ``(T, E')`` fp32 softmax outputs, ``E'`` = real + zero experts; the bias only picks,
it never weights) and counts how many slots each expert received (``counts`` ``(E',)``, on the device: the group
offsets of the grouped products, the balancing update and the load statistics all come from it). In PyTorch
that is ``topk(scores + bias, k)`` and a ``scatter_add_`` of ones (``T*k`` atomic adds into ``E'`` counters):
four launches, together far slower than the bytes they move would allow.

Here one program takes ``BLOCK_T`` tokens, loads their ``(BLOCK_T, E')`` biased scores once (about 4 MB for a
batch of 16384 tokens and 64 experts), and ``k`` times takes each row's ``argmax`` (the lowest index among equal
values), writes it and masks it out; the experts a block picked are summed per column and added to the global
counts with one atomic add per expert per program (integers: the result is exact and does not depend on the
order). Picks come out in descending score order, as ``torch.topk`` returns them. Predicted and measured times
against the PyTorch form are in BENCHMARKS.md.

:func:`reference_select_experts` is the PyTorch twin that defines the meaning (``torch.topk`` leaves the order
of exactly equal scores unspecified; the kernel takes the lower index first). Kernels are jitted at first
launch, so ``TRITON_INTERPRET=1`` (the tests) is read then and this module imports without a GPU or Triton.
"""

from __future__ import annotations

import torch

try:  # a CPU-only install may lack Triton: the reference twin still works
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None
    tl = None

from embscale.kernels.runtime import lazy_kernels, triton_usable
from embscale.kernels.runtime import next_pow2 as _next_pow2

SELECT_BLOCK_T = 32  # tokens per program; launch shape chosen by measurement (BENCHMARKS.md)
SELECT_WARPS = 4


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of each id in ``0 .. n-1`` as int64, on the device (``bincount`` syncs on CUDA)."""
    counts = torch.zeros(n, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))


def reference_select_experts(scores: torch.Tensor, bias: torch.Tensor, k: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen (T, k) int64, counts (E',) int64)``: the ``k`` largest of ``scores + bias`` per row, in
    descending order, and how often each column was chosen."""
    chosen = torch.topk(scores + bias, k, dim=-1).indices
    return chosen, count_ids(chosen.reshape(-1), scores.shape[-1])


def _select_kernel(scores_ptr, bias_ptr, chosen_ptr, counts_ptr, n_rows, n_cols, stride,
                   K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < n_rows
    cmask = cols < n_cols
    values = tl.load(scores_ptr + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                     other=float("-inf"))
    values += tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    values = tl.where(cmask[None, :], values, float("-inf"))  # padding columns are never picked
    picked = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(values, axis=1, tie_break_left=True)  # (BLOCK_T,)
        tl.store(chosen_ptr + rows * K + j, best.to(tl.int64), mask=rmask)
        hit = cols[None, :] == best[:, None]
        picked += hit.to(tl.int32)
        values = tl.where(hit, float("-inf"), values)
    picked = tl.where(rmask[:, None], picked, 0)
    tl.atomic_add(counts_ptr + cols, tl.sum(picked, axis=0).to(tl.int64), mask=cmask)


def triton_select_experts(scores: torch.Tensor, bias: torch.Tensor, k: int, *, block_t: int | None = None,
                          num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel form of :func:`reference_select_experts` (same outputs; equal scores: lower index first)."""
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be a 2-D float32 tensor, got {tuple(scores.shape)} {scores.dtype}")
    n_rows, n_cols = scores.shape
    if not 0 < k <= n_cols:
        raise ValueError(f"k must be in 1..{n_cols}, got {k}")
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    bias = bias.to(torch.float32).contiguous()
    chosen = torch.empty(n_rows, k, dtype=torch.int64, device=scores.device)
    counts = torch.zeros(n_cols, dtype=torch.int64, device=scores.device)
    if n_rows:
        block_t = block_t or SELECT_BLOCK_T
        grid = (triton.cdiv(n_rows, block_t),)
        _kernels()["select"][grid](scores, bias, chosen, counts, n_rows, n_cols, scores.stride(0), K=k,
                                   BLOCK_T=block_t, BLOCK_E=_next_pow2(n_cols),
                                   num_warps=num_warps or SELECT_WARPS)
    return chosen, counts


def select_experts(scores: torch.Tensor, bias: torch.Tensor, k: int, use_triton: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel where usable (CUDA, or the interpreter) and not traced by ``torch.compile`` (the traced
    graph keeps the twin, with no graph break); the twin otherwise. No autograd: the choice has no gradient."""
    if use_triton is None:
        use_triton = triton_usable(scores.device) and not torch.compiler.is_compiling()
    fn = triton_select_experts if use_triton else reference_select_experts
    return fn(scores, bias, k)


def _kernels() -> dict:
    return lazy_kernels(__name__, lambda: {"select": triton.jit(_select_kernel)})


__all__ = ["count_ids", "reference_select_experts", "select_experts", "triton_select_experts", "triton_usable"]
