"""The MoE layer's fast path: dispatch to experts, the grouped expert products, the weighted SwiGLU, combine.

:mod:`embscale.models.moe` states the layer's math and calls these. Each piece has its plain PyTorch meaning here
(``_sum_slots``, the segment loop of :func:`grouped_linear`, :mod:`embscale.kernels.swiglu`'s twins); what is fast:

- :class:`Dispatch` / :class:`Combine` gather token rows into expert-sorted order and sum each token's ``k`` slot
  rows back (deterministic, no atomics); their elementwise and gather-reduce steps are compiled into single
  kernels on CUDA (``EMBSCALE_MOE_COMPILE=0`` runs them eagerly), eagerly elsewhere.
- :func:`grouped_linear`: ``torch.nn.functional.grouped_mm`` (bf16, CUDA) for all experts at once; elsewhere (CPU,
  or CUDA in float32) a loop over the contiguous segments, which reads the offsets on the host. Traced by
  ``torch.compile`` off CUDA it takes forms with no host read, so the layer stays one graph: bf16 the same
  ``grouped_mm``, other dtypes a masked per-expert product (``E`` times the FLOPs).
- :class:`SwiGLUWeighted`: ``silu(g) * u * w`` as one fused Triton kernel each way on CUDA
  (:mod:`embscale.kernels.swiglu`), and the expert choice as one more (:func:`use_triton_routing`,
  :mod:`embscale.kernels.routing`); ``EMBSCALE_MOE_TRITON=0`` or torch.compile tracing keep the torch functions.
- :func:`sort_key_dtype`: the dispatch sort runs on the narrowest integer keys that hold the expert ids (a radix
  sort makes one pass per key byte).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from embscale.kernels import swiglu
from embscale.kernels.runtime import cast, triton_usable
from embscale.kernels.swiglu import reference_backward as _swiglu_weighted_bwd  # the weighted SwiGLU's math
from embscale.kernels.swiglu import reference_forward as _swiglu_weighted_fwd

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# Elementwise and gather-reduce steps are compiled into single kernels on CUDA (set EMBSCALE_MOE_COMPILE=0 to
# run them eagerly). On CPU they always run eagerly.
_USE_COMPILE = os.environ.get("EMBSCALE_MOE_COMPILE", "1") != "0"
# The weighted SwiGLU and the expert choice run as Triton kernels (kernels/swiglu.py, kernels/routing.py) on
# CUDA outside torch.compile tracing (set EMBSCALE_MOE_TRITON=0 for the torch functions instead).
_USE_TRITON = os.environ.get("EMBSCALE_MOE_TRITON", "1") != "0"


def sort_key_dtype(n_ids: int) -> torch.dtype:
    """The narrowest integer dtype that holds the expert ids ``0 .. n_ids-1`` (the dispatch sort's keys)."""
    return torch.uint8 if n_ids <= 256 else torch.int16 if n_ids <= 2**15 else torch.int64


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 data, float64 for float64 data."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Elementwise / gather steps. Plain functions define the meaning; on CUDA they are compiled (fused), except the
# weighted SwiGLU, which runs as Triton kernels there (kernels/swiglu.py) unless traced or switched off.
# ----------------------------------------------------------------------------------------------------------
def _sum_slots(rows: torch.Tensor, slot_pos: torch.Tensor, slot_real: torch.Tensor | None) -> torch.Tensor:
    """``out[t] = sum_j rows[slot_pos[t, j]]`` over real slots, accumulated in fp32. (M, D) -> (T, D).

    Written as ``k`` row gathers added up (``k`` is static) rather than a gather to ``(T, k, D)`` and a
    reduction: compiled, this is one pointwise kernel, which measured faster (BENCHMARKS.md).
    """
    dtype = accumulation_dtype(rows.dtype)
    out = None
    for j in range(slot_pos.shape[1]):
        picked = rows[slot_pos[:, j]].to(dtype)  # (T, D)
        if slot_real is not None:
            picked = torch.where(slot_real[:, j:j + 1], picked, 0.0)
        out = picked if out is None else out + picked
    return cast(out, rows.dtype)


_COMPILED: dict[str, object] = {}


def _kernel(name: str, fn, device: torch.device):
    """``fn`` compiled for CUDA (once per process), or ``fn`` itself elsewhere."""
    if device.type != "cuda" or not _USE_COMPILE:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True)
    return _COMPILED[name]


class Dispatch(torch.autograd.Function):
    """Gather token rows into expert-sorted order; backward sums each token's ``k`` slot gradients."""

    @staticmethod
    def forward(ctx, x, token_of_row, slot_pos, slot_real):  # (T, D) -> (M, D), M = T*k
        ctx.save_for_backward(slot_pos, slot_real)
        ctx.has_mask = slot_real is not None
        return x.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad):
        slot_pos, slot_real = ctx.saved_tensors
        slot_real = slot_real if ctx.has_mask else None
        return _kernel("sum_slots", _sum_slots, grad.device)(grad, slot_pos, slot_real), None, None, None


class Combine(torch.autograd.Function):
    """Sum each token's ``k`` expert rows (zero-expert slots excluded); backward gathers the token
    gradient."""

    @staticmethod
    def forward(ctx, rows, token_of_row, slot_pos, slot_real):  # (M, D) -> (T, D)
        ctx.save_for_backward(token_of_row)
        return _kernel("sum_slots", _sum_slots, rows.device)(rows, slot_pos, slot_real)

    @staticmethod
    def backward(ctx, grad):
        (token_of_row,) = ctx.saved_tensors
        return grad.index_select(0, token_of_row), None, None, None


def use_triton_swiglu(gate_up: torch.Tensor) -> bool:
    """Whether the weighted SwiGLU takes the Triton kernels: CUDA, not traced by torch.compile (the traced
    graph keeps the torch functions, with no graph break), fp32 or narrower data, ``EMBSCALE_MOE_TRITON`` on."""
    if not _USE_TRITON or gate_up.device.type != "cuda" or torch.compiler.is_compiling():
        return False
    if gate_up.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False  # the kernels compute in fp32; float64 keeps the torch functions
    return triton_usable(gate_up.device)


class SwiGLUWeighted(torch.autograd.Function):
    """``silu(g) * u * w`` per sorted row, saving only ``gate_up`` (recomputed in backward). On CUDA one fused
    Triton kernel each way (:mod:`embscale.kernels.swiglu`, see :func:`use_triton_swiglu`); else its PyTorch
    twins, compiled."""

    @staticmethod
    def forward(ctx, gate_up, weight, row_real):
        ctx.save_for_backward(gate_up, weight, row_real)
        ctx.has_mask = row_real is not None
        ctx.use_triton = use_triton_swiglu(gate_up)
        if ctx.use_triton:
            return swiglu.swiglu_weighted_forward(gate_up, weight)
        return _kernel("swiglu_fwd", _swiglu_weighted_fwd, gate_up.device)(gate_up, weight)

    @staticmethod
    def backward(ctx, grad):
        gate_up, weight, row_real = ctx.saved_tensors
        row_real = row_real if ctx.has_mask else None
        if ctx.use_triton:
            grad_gate_up, grad_weight = swiglu.swiglu_weighted_backward(grad, gate_up, weight, row_real)
        else:
            grad_gate_up, grad_weight = _kernel("swiglu_bwd", _swiglu_weighted_bwd, grad.device)(
                grad, gate_up, weight, row_real)
        return grad_gate_up, grad_weight, None


def grouped_linear(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1] .. offsets[e]`` of ``a`` (M, K) times ``weight[e].T`` (``weight`` is (E, N, K)).

    Rows past ``offsets[-1]`` are not computed (their values are unspecified). ``offsets`` is int32, (E,).
    """
    weight = weight.to(a.dtype)
    m, k = a.shape
    n = weight.shape[1]
    bf16 = a.dtype == torch.bfloat16
    compiling_off_cuda = not a.is_cuda and torch.compiler.is_compiling()
    # Under torch.compile off CUDA (tests, CPU development) bf16 traces the CUDA op itself (PyTorch has a CPU
    # grouped_mm; its meta function only takes bf16) and other dtypes take the static-shape masked form below,
    # so neither breaks the graph. Eager CPU keeps the segment loop (the numerics tests compare).
    if _GROUPED_MM is not None and bf16 and ((a.is_cuda and k % 8 == 0 and n % 8 == 0) or compiling_off_cuda):
        return _GROUPED_MM(a, weight.transpose(-2, -1), offs=offsets)
    if compiling_off_cuda:
        return _grouped_linear_masked(a, weight, offsets)
    # Fallback (eager CPU, or CUDA outside bf16): a loop over the contiguous segments; reads offsets on the
    # host, which breaks a torch.compile graph (so CUDA in float32 still does).
    # split/unbind rather than slicing and weight[e]: their backward concatenates and stacks, where slicing
    # would zero-fill a full-size gradient for every expert (much slower on CPU; BENCHMARKS.md).
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    segments = a.split(sizes + [m - sum(sizes)])
    pieces = [segment @ w.T for segment, w in zip(segments[:-1], weight.unbind(0), strict=True)]
    pieces.append(a.new_zeros(segments[-1].shape[0], n))
    return torch.cat(pieces, dim=0)


def _grouped_linear_masked(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_linear` with static shapes only (no host read of ``offsets``): every expert's product
    over all ``M`` rows, kept on its own segment. ``E`` times the FLOPs; for tracing off CUDA, not for speed.
    Rows past ``offsets[-1]`` are zero, as in the segment loop."""
    row = torch.arange(a.shape[0], device=a.device)
    starts = torch.cat((offsets.new_zeros(1), offsets[:-1]))
    out = a.new_zeros(a.shape[0], weight.shape[1])
    for e, w in enumerate(weight.unbind(0)):
        inside = ((row >= starts[e]) & (row < offsets[e])).unsqueeze(-1)  # (M, 1)
        out = out + torch.where(inside, a @ w.T, 0.0)  # each row is in one segment: exact sums
    return out


def use_triton_routing(x: torch.Tensor) -> bool:
    """Whether the expert choice (top-k of the biased scores, and the load counts) takes the Triton kernel: CUDA,
    not traced by torch.compile, ``EMBSCALE_MOE_TRITON`` on."""
    return _USE_TRITON and x.is_cuda and not torch.compiler.is_compiling()


__all__ = ["Combine", "Dispatch", "SwiGLUWeighted", "accumulation_dtype", "grouped_linear", "sort_key_dtype",
           "use_triton_routing", "use_triton_swiglu"]
