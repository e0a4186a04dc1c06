"""The MoE layer's gather-sum (Triton): each token's ``k`` expert-sorted slot rows added up, one kernel.

After the experts, the layer combines (:class:`embscale.kernels.moe_dispatch.Combine`), and the dispatch's
backward (:class:`embscale.kernels.moe_dispatch.Dispatch`) sums gradients, with the same operation::

    out[t] = sum_j rows[slot_pos[t, j]]      over the slots j < k with slot_real[t, j] (all when None)

``rows`` ``(M, D)``, ``slot_pos`` ``(T, k)`` int64 row indices, ``slot_real`` ``(T, k)`` bool (False: a zero
expert's slot, whose row is not read); ``out`` ``(T, D)`` in ``rows``' dtype, accumulated in fp32.

:func:`reference_sum_slots` is the twin that defines it (``k`` gathers added in slot order). :func:`sum_slots`
does it in one pass: each program takes ``BLOCK_T`` tokens and walks ``D`` in ``BLOCK_D`` column chunks; per
chunk it loads the ``k`` slot rows (a masked-out slot loads nothing and adds 0) and adds them in slot order into
an fp32 tile, then stores it once. The additions are the twin's, in the twin's order, so the result is equal to
the twin's bit for bit (tested). It reads ``k`` rows and writes one per token: ``(k + 1) * D`` elements, the
least any form of the sum moves, so it should run at the copy rate.

This kernel replaces the ``torch.compile`` of the twin on CUDA (the dispatch's compiled steps, which cost a run
Inductor's import and a compilation in its first step). It runs on CUDA tensors of bf16, fp16 or fp32, outside
``torch.compile`` tracing, or anywhere under ``TRITON_INTERPRET=1`` (the tests); float64 keeps the twin.
"""

from __future__ import annotations

import torch

try:  # a CPU-only install may lack Triton: the twin still works
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None
    tl = None

from embscale.kernels.runtime import cast, lazy_kernels, next_pow2

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def reference_sum_slots(rows: torch.Tensor, slot_pos: torch.Tensor, slot_real: torch.Tensor | None) -> torch.Tensor:
    """``out[t] = sum_j rows[slot_pos[t, j]]`` over real slots, accumulated in fp32 (fp64 for fp64 rows).
    (M, D) -> (T, D).

    Written as ``k`` row gathers added up (``k`` is static) rather than a gather to ``(T, k, D)`` and a
    reduction: compiled, this is one pointwise kernel, which measured faster (BENCHMARKS.md).
    """
    dtype = torch.promote_types(rows.dtype, torch.float32)
    out = None
    for j in range(slot_pos.shape[1]):
        picked = rows[slot_pos[:, j]].to(dtype)  # (T, D)
        if slot_real is not None:
            picked = torch.where(slot_real[:, j:j + 1], picked, 0.0)
        out = picked if out is None else out + picked
    return cast(out, rows.dtype)


def _sum_slots_kernel(rows_ptr, pos_ptr, real_ptr, out_ptr, n_tokens, width, stride_rows, stride_out,
                      K: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tmask = tokens < n_tokens
    for chunk in range(0, tl.cdiv(width, BLOCK_D)):
        cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = tmask[:, None] & (cols < width)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            pos = tl.load(pos_ptr + tokens * K + j, mask=tmask, other=0)
            slot_mask = mask
            if HAS_MASK:
                real = tl.load(real_ptr + tokens * K + j, mask=tmask, other=0)
                slot_mask = mask & (real != 0)[:, None]
            acc += tl.load(rows_ptr + pos[:, None] * stride_rows + cols[None, :], mask=slot_mask,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


def sum_slots(rows: torch.Tensor, slot_pos: torch.Tensor, slot_real: torch.Tensor | None = None, *,
              block_t: int | None = None, block_d: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Kernel form of :func:`reference_sum_slots`: ``(M, D)``, ``(T, k)``, ``(T, k)`` -> ``(T, D)``. Default tile
    ``BLOCK_D = min(next_pow2(D), 1024)``, ``BLOCK_T = max(1, 4096 // BLOCK_D)``."""
    if rows.dtype not in KERNEL_DTYPES:
        raise ValueError(f"rows: the kernel takes {', '.join(map(str, KERNEL_DTYPES))}, got {rows.dtype}")
    if rows.dim() != 2 or slot_pos.dim() != 2:
        raise ValueError(f"rows must be (M, D) and slot_pos (T, k), got {tuple(rows.shape)} and "
                         f"{tuple(slot_pos.shape)}")
    if slot_real is not None and slot_real.shape != slot_pos.shape:
        raise ValueError(f"slot_real must be (T, k) = {tuple(slot_pos.shape)}, got {tuple(slot_real.shape)}")
    n_tokens, k = slot_pos.shape
    width = rows.shape[1]
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty(n_tokens, width, dtype=rows.dtype, device=rows.device)
    if n_tokens == 0 or width == 0:
        return out
    if k == 0:
        return out.zero_()
    pos = slot_pos.contiguous()
    real = slot_real.contiguous().view(torch.uint8) if slot_real is not None else pos  # bool as its bytes
    block_d = block_d or min(next_pow2(width), 1024)
    block_t = block_t or max(1, 4096 // block_d)
    grid = (triton.cdiv(n_tokens, block_t),)
    _kernels()["sum_slots"][grid](rows, pos, real, out, n_tokens, width, rows.stride(0), out.stride(0), K=k,
                                  HAS_MASK=slot_real is not None, BLOCK_T=block_t, BLOCK_D=block_d,
                                  num_warps=num_warps)
    return out


def _kernels() -> dict:
    return lazy_kernels(__name__, lambda: {"sum_slots": triton.jit(_sum_slots_kernel)})


__all__ = ["KERNEL_DTYPES", "reference_sum_slots", "sum_slots"]
