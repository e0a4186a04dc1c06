"""Fused weighted SwiGLU of the MoE layer (Triton): ``silu(g) * u * w`` and its backward, one kernel each.

The MoE layer (:mod:`embscale.models.moe`, through :class:`embscale.kernels.moe_dispatch.SwiGLUWeighted`)
applies, per expert-sorted row, ``h = silu(g) * u * w`` to the grouped gate/up product ``gate_up = [g | u]``
``(M, 2H)`` (bf16 in training) with per-row routing weights ``w`` ``(M,)`` fp32, and its backward needs
``grad_gate_up = [grad_g | grad_u]`` ``(M, 2H)`` and ``grad_w`` ``(M,)``::

    sig    = sigmoid(g);  silu = g * sig
    grad_w = sum_j grad * silu * u        (fp32 row sum over the H columns; 0 on rows with row_real False)
    grad_h = grad * w
    grad_g = grad_h * u * sig * (1 + g * (1 - sig))
    grad_u = grad_h * silu

Compiled by ``torch.compile``, the twin's backward is two kernels (a reduction for ``grad_w`` and a pointwise
kernel for ``grad_gate_up``), each reading ``grad`` and ``gate_up``. Here each is one kernel:

- forward (:func:`swiglu_weighted_forward`): each program takes ``BLOCK_M`` rows and walks the ``H`` columns
  in ``BLOCK_H`` chunks (columns masked, so ``H`` need not be a power of two; rows masked, so ``M`` is ragged),
  loading ``g`` and ``u`` of the chunk, computing in fp32, storing ``h`` in the input dtype.
- backward (:func:`swiglu_weighted_backward`): the same walk; per chunk it loads ``grad``, ``g``, ``u`` once,
  stores ``grad_g`` and ``grad_u`` and adds the chunk's ``grad * silu * u`` into an fp32 ``(BLOCK_M,)`` row
  accumulator, stored (masked by ``row_real``) as ``grad_w`` after the last chunk. ``grad_gate_up`` does not
  depend on ``grad_w``, so a single pass suffices for any ``H``: no second read of the inputs, from L2 or
  HBM. With the defaults one chunk covers the whole row up to ``H = 1024`` (``BLOCK_H = min(next_pow2(H),
  1024)``), so for the model's sizes the loop runs once.

All math is fp32; outputs take the input dtypes (``grad_gate_up`` that of ``gate_up``, ``grad_w`` that of
``w``). Rows with ``row_real`` False hold garbage (uncomputed rows of the grouped product): their ``grad_w`` is
0, their ``grad_gate_up`` is computed like any other row and never used. Block sizes and warps are keyword
arguments (``block_m``, ``block_h``, ``num_warps``) for the benchmark to tune; the defaults give each program
about 4096 (forward) / 2048 (backward, three inputs live) elements with 4 warps, i.e. 32 / 16 per thread per
tensor, which should give 16-byte vector accesses of bf16 (when ``H`` is a multiple of 8) without register
spills (the defaults come from this reasoning, not from a sweep: tune with the keywords).

Every kernel has a plain-PyTorch twin (``reference_*``) that defines its meaning; the MoE layer runs the twins
where the kernels do not apply (off CUDA, float64, under ``torch.compile`` tracing, ``EMBSCALE_MOE_TRITON=0``).
The Triton versions run on CUDA tensors, or anywhere with ``TRITON_INTERPRET=1`` (the tests). Kernels are
jitted at first launch, not at import, so the interpreter switch is read then, and this module imports without
a GPU or without Triton.

Both kernels are bandwidth-bound: the backward reads ``grad`` (H) + ``gate_up`` (2H) bf16 + ``w`` (4 B) and
writes ``grad_gate_up`` (2H) bf16 + ``grad_w`` (4 B), 10H + 8 bytes a row; the forward reads 2H and writes H
bf16 (+ ``w``), 6H + 4 bytes a row. The math (one sigmoid, a dozen flops an element) is far below the GPU's
compute, so both should run near the copy rate; the row reduction of the backward is a per-program ``tl.sum``
over each ``BLOCK_H``-wide tile, cheap next to the loads. Predicted and measured times are in BENCHMARKS.md.
"""

from __future__ import annotations

import torch

try:  # a CPU-only install may lack Triton: the reference twins still work
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None
    tl = None

from embscale.kernels.runtime import cast, interpreting, lazy_kernels, triton_usable
from embscale.kernels.runtime import next_pow2 as _next_pow2

# ------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------

def _blocks(hidden: int, block_m: int | None, block_h: int | None, elements: int) -> tuple[int, int]:
    """Default tile: ``BLOCK_H = min(next_pow2(H), 1024)``, ``BLOCK_M`` so the tile holds ``elements``."""
    if block_h is None:
        block_h = min(_next_pow2(hidden), 1024)
    if block_m is None:
        block_m = max(1, elements // block_h)
    return block_m, block_h


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (rows may have any stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------------------
# Twins
# ------------------------------------------------------------------------------------------------------------

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def reference_forward(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u * w`` for ``gate_up = [g | u]`` (M, 2H) and per-row weights ``w`` (M,): (M, H) in the
    dtype of ``gate_up``, computed in fp32 (fp64 for fp64 data)."""
    g, u = gate_up.to(_accumulation_dtype(gate_up.dtype)).chunk(2, dim=-1)
    return cast(torch.nn.functional.silu(g) * u * weight.unsqueeze(-1), gate_up.dtype)


def reference_backward(grad: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor,
                       row_real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_gate_up (M, 2H) in gate_up's dtype, grad_weight (M,) in weight's dtype)`` of
    :func:`reference_forward`; ``grad_weight`` is 0 on rows where ``row_real`` (bool (M,), optional) is False."""
    dtype = _accumulation_dtype(gate_up.dtype)
    g, u = gate_up.to(dtype).chunk(2, dim=-1)
    grad = grad.to(dtype)
    sig = torch.sigmoid(g)
    silu = g * sig
    grad_weight = (grad * silu * u).sum(-1)  # (M,)
    if row_real is not None:  # rows past the last group offset hold uncomputed values
        grad_weight = torch.where(row_real, grad_weight, 0.0)
    grad_h = grad * weight.unsqueeze(-1)
    grad_g = grad_h * u * sig * (1.0 + g * (1.0 - sig))
    grad_u = grad_h * silu
    return cast(torch.cat((grad_g, grad_u), dim=-1), gate_up.dtype), cast(grad_weight, weight.dtype)


# ------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------

def _forward_kernel(gate_up_ptr, weight_ptr, out_ptr, n_rows, hidden, stride_gu, stride_out,
                    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < n_rows
    w = tl.load(weight_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    gu_row = gate_up_ptr + rows[:, None] * stride_gu
    out_row = out_ptr + rows[:, None] * stride_out
    for chunk in range(0, tl.cdiv(hidden, BLOCK_H)):
        cols = chunk * BLOCK_H + tl.arange(0, BLOCK_H)  # chunk * BLOCK_H: aligned, so accesses vectorize
        mask = rmask[:, None] & (cols < hidden)[None, :]
        g = tl.load(gu_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_row + hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        h = g * sig * u * w[:, None]
        tl.store(out_row + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)


def _backward_kernel(grad_ptr, gate_up_ptr, weight_ptr, real_ptr, grad_gu_ptr, grad_w_ptr,
                     n_rows, hidden, stride_grad, stride_gu, stride_ggu,
                     HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < n_rows
    w = tl.load(weight_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    grad_row = grad_ptr + rows[:, None] * stride_grad
    gu_row = gate_up_ptr + rows[:, None] * stride_gu
    ggu_row = grad_gu_ptr + rows[:, None] * stride_ggu
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)  # grad_w row sums
    for chunk in range(0, tl.cdiv(hidden, BLOCK_H)):  # one pass: grad_gate_up does not need grad_w
        cols = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = rmask[:, None] & (cols < hidden)[None, :]
        dy = tl.load(grad_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gu_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_row + hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        acc += tl.sum(dy * silu * u, axis=1)  # masked lanes load 0: they add 0
        grad_h = dy * w[:, None]
        grad_g = grad_h * u * sig * (1.0 + g * (1.0 - sig))
        grad_u = grad_h * silu
        tl.store(ggu_row + cols[None, :], grad_g.to(grad_gu_ptr.dtype.element_ty), mask=mask)
        tl.store(ggu_row + hidden + cols[None, :], grad_u.to(grad_gu_ptr.dtype.element_ty), mask=mask)
    if HAS_MASK:
        real = tl.load(real_ptr + rows, mask=rmask, other=0)
        acc = tl.where(real != 0, acc, 0.0)
    tl.store(grad_w_ptr + rows, acc.to(grad_w_ptr.dtype.element_ty), mask=rmask)


# ------------------------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------------------------

def _check(gate_up: torch.Tensor, weight: torch.Tensor) -> int:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 != 0:
        raise ValueError(f"gate_up must be (M, 2H), got {tuple(gate_up.shape)}")
    if weight.shape != gate_up.shape[:1]:
        raise ValueError(f"weight must be (M,) = ({gate_up.shape[0]},), got {tuple(weight.shape)}")
    return gate_up.shape[1] // 2


def swiglu_weighted_forward(gate_up: torch.Tensor, weight: torch.Tensor, *, block_m: int | None = None,
                            block_h: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Kernel form of :func:`reference_forward`: ``(M, 2H)``, ``(M,)`` -> ``(M, H)`` in ``gate_up``'s dtype.
    Default tile ``BLOCK_H = min(next_pow2(H), 1024)``, ``BLOCK_M = max(1, 4096 // BLOCK_H)``."""
    hidden = _check(gate_up, weight)
    gate_up, weight = _rows(gate_up), weight.contiguous()
    n_rows = gate_up.shape[0]
    out = torch.empty(n_rows, hidden, dtype=gate_up.dtype, device=gate_up.device)
    if n_rows == 0 or hidden == 0:
        return out
    block_m, block_h = _blocks(hidden, block_m, block_h, 4096)
    grid = (triton.cdiv(n_rows, block_m),)
    _kernels()["forward"][grid](gate_up, weight, out, n_rows, hidden, gate_up.stride(0), out.stride(0),
                                BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps)
    return out


def swiglu_weighted_backward(grad: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor,
                             row_real: torch.Tensor | None = None, *, block_m: int | None = None,
                             block_h: int | None = None, num_warps: int = 4
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel form of :func:`reference_backward`, one launch: ``(grad_gate_up (M, 2H), grad_weight (M,))``.
    Default tile ``BLOCK_H = min(next_pow2(H), 1024)``, ``BLOCK_M = max(1, 2048 // BLOCK_H)``."""
    hidden = _check(gate_up, weight)
    if grad.shape != (gate_up.shape[0], hidden):
        raise ValueError(f"grad must be (M, H) = ({gate_up.shape[0]}, {hidden}), got {tuple(grad.shape)}")
    grad, gate_up, weight = _rows(grad), _rows(gate_up), weight.contiguous()
    n_rows = gate_up.shape[0]
    grad_gate_up = torch.empty(n_rows, 2 * hidden, dtype=gate_up.dtype, device=gate_up.device)
    grad_weight = torch.empty(n_rows, dtype=weight.dtype, device=weight.device)
    if n_rows == 0:
        return grad_gate_up, grad_weight
    if hidden == 0:
        return grad_gate_up, grad_weight.zero_()
    # bool -> uint8 view: the same bytes, loaded as integers
    real = row_real.contiguous().view(torch.uint8) if row_real is not None else weight
    block_m, block_h = _blocks(hidden, block_m, block_h, 2048)
    grid = (triton.cdiv(n_rows, block_m),)
    _kernels()["backward"][grid](grad, gate_up, weight, real, grad_gate_up, grad_weight,
                                 n_rows, hidden, grad.stride(0), gate_up.stride(0), grad_gate_up.stride(0),
                                 HAS_MASK=row_real is not None, BLOCK_M=block_m, BLOCK_H=block_h,
                                 num_warps=num_warps)
    return grad_gate_up, grad_weight


def _kernels() -> dict:
    return lazy_kernels(__name__, lambda: {"forward": triton.jit(_forward_kernel),
                                           "backward": triton.jit(_backward_kernel)})


__all__ = [
    "interpreting",
    "reference_backward",
    "reference_forward",
    "swiglu_weighted_backward",
    "swiglu_weighted_forward",
    "triton_usable",
]
