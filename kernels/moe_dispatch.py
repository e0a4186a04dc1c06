"""The MoE layer's fast path: dispatch to experts, the grouped expert products, the weighted SwiGLU, combine.

:mod:`embscale.models.moe` states the layer's math and calls these. Each piece has its plain PyTorch meaning
(:func:`~embscale.kernels.slot_sum.reference_sum_slots`, the segment loop of :func:`grouped_linear`,
:mod:`embscale.kernels.swiglu`'s twins); what is fast:

- :class:`Dispatch` / :class:`Combine` gather token rows into expert-sorted order and sum each token's ``k`` slot
  rows back (deterministic, no atomics). The sum is one Triton kernel on CUDA (:mod:`embscale.kernels.slot_sum`,
  bit for bit the twin); with ``EMBSCALE_MOE_TRITON=0`` it and the other elementwise steps are compiled into
  single kernels on CUDA (``EMBSCALE_MOE_COMPILE=0`` runs them eagerly), eagerly elsewhere.
- :func:`grouped_linear`: ``torch.nn.functional.grouped_mm`` (bf16, CUDA) for all experts at once; elsewhere (CPU,
  or CUDA in float32) a loop over the contiguous segments, which reads the offsets on the host. Traced by
  ``torch.compile`` off CUDA it takes forms with no host read, so the layer stays one graph: bf16 the same
  ``grouped_mm``, other dtypes a masked per-expert product (``E`` times the FLOPs, a block of experts per step).
  One ``grouped_mm`` call takes at most :data:`MAX_GROUPS_PER_CALL` groups (PyTorch's CUDA kernel refuses 1024 or
  more); more experts go through :func:`chunked_grouped_mm`, still with no host read.
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

from embscale.kernels import slot_sum, swiglu
from embscale.kernels.runtime import triton_usable
from embscale.kernels.swiglu import reference_backward as _swiglu_weighted_bwd  # the weighted SwiGLU's math
from embscale.kernels.swiglu import reference_forward as _swiglu_weighted_fwd

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# Where the Triton kernels are off (EMBSCALE_MOE_TRITON=0, float64), the elementwise and gather-reduce steps are
# compiled into single kernels on CUDA (set EMBSCALE_MOE_COMPILE=0 to run them eagerly). On CPU they run eagerly.
_USE_COMPILE = os.environ.get("EMBSCALE_MOE_COMPILE", "1") != "0"
# The weighted SwiGLU, the expert choice and the gather-sum run as Triton kernels (kernels/swiglu.py,
# kernels/routing.py, kernels/slot_sum.py) on CUDA outside torch.compile tracing (set EMBSCALE_MOE_TRITON=0 for the
# torch functions instead).
_USE_TRITON = os.environ.get("EMBSCALE_MOE_TRITON", "1") != "0"


def sort_key_dtype(n_ids: int) -> torch.dtype:
    """The narrowest integer dtype that holds the expert ids ``0 .. n_ids-1`` (the dispatch sort's keys)."""
    return torch.uint8 if n_ids <= 256 else torch.int16 if n_ids <= 2**15 else torch.int64


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 data, float64 for float64 data."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Elementwise / gather steps. Plain functions define the meaning; on CUDA the gather-sum and the weighted SwiGLU run
# as Triton kernels (kernels/slot_sum.py, kernels/swiglu.py) unless traced or switched off, compiled (fused) then.
# ----------------------------------------------------------------------------------------------------------
_sum_slots = slot_sum.reference_sum_slots  # the gather-sum's meaning (Combine forward, Dispatch backward)


_COMPILED: dict[str, object] = {}


def _kernel(name: str, fn, device: torch.device):
    """``fn`` compiled for CUDA (once per process), or ``fn`` itself elsewhere."""
    if device.type != "cuda" or not _USE_COMPILE:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True)
    return _COMPILED[name]


def sum_slots(rows: torch.Tensor, slot_pos: torch.Tensor, slot_real: torch.Tensor | None) -> torch.Tensor:
    """Each token's ``k`` slot rows summed (:func:`embscale.kernels.slot_sum.reference_sum_slots`): the Triton
    kernel on CUDA outside ``torch.compile`` tracing (bf16, fp16, fp32; ``EMBSCALE_MOE_TRITON=0`` turns it off),
    else the twin, compiled on CUDA and eager elsewhere."""
    if (_USE_TRITON and rows.is_cuda and triton_usable(rows.device) and rows.dtype in slot_sum.KERNEL_DTYPES
            and not torch.compiler.is_compiling()):
        return slot_sum.sum_slots(rows, slot_pos, slot_real)
    return _kernel("sum_slots", _sum_slots, rows.device)(rows, slot_pos, slot_real)


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
        return sum_slots(grad, slot_pos, slot_real), None, None, None


class Combine(torch.autograd.Function):
    """Sum each token's ``k`` expert rows (zero-expert slots excluded); backward gathers the token
    gradient."""

    @staticmethod
    def forward(ctx, rows, token_of_row, slot_pos, slot_real):  # (M, D) -> (T, D)
        ctx.save_for_backward(token_of_row)
        return sum_slots(rows, slot_pos, slot_real)

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

    Rows past ``offsets[-1]`` are not computed (their values are unspecified). ``offsets`` is int32, (E,). Any
    number of experts ``E``: past :data:`MAX_GROUPS_PER_CALL` the ``grouped_mm`` forms go through
    :func:`chunked_grouped_mm`.
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
        if weight.shape[0] > MAX_GROUPS_PER_CALL:
            return chunked_grouped_mm(a, weight, offsets)
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


# PyTorch's CUDA grouped GEMM checks ``group_count < 1024`` (its message says "more than 1024 groups"), so one call
# takes at most 1023 groups.
MAX_GROUPS_PER_CALL = 1023


def grouped_mm_chunks(n_groups: int, max_groups: int = MAX_GROUPS_PER_CALL) -> list[tuple[int, int]]:
    """The expert ranges ``(first, end)`` of :func:`chunked_grouped_mm`'s calls, each call at most ``max_groups``
    groups.

    ``grouped_mm`` starts its first group at row 0, and the rows of a chunk start at a data-dependent offset, so
    every chunk after the first carries one extra leading group: the rows before it, under the weight of expert
    ``first - 1`` (a view, no copy), computed and then discarded. Those wasted rows are smallest when the first
    chunk is the short one: ``n_groups = 1032`` gives ``[(0, 10), (10, 1032)]``, about 1% of the rows computed
    twice.
    """
    if max_groups < 2:
        raise ValueError(f"max_groups must be at least 2, got {max_groups}")
    if n_groups <= max_groups:
        return [(0, n_groups)]
    per_later = max_groups - 1  # experts per later chunk, beside its leading group
    n_later = -(-(n_groups - max_groups) // per_later)
    first_end = n_groups - n_later * per_later
    return [(0, first_end)] + [(first_end + i * per_later, first_end + (i + 1) * per_later) for i in range(n_later)]


def _chunked_rows(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, chunks: list[tuple[int, int]]
                  ) -> torch.Tensor:
    """``grouped_mm(a, b, offs=offsets)`` for ``b`` (E, K, N) with any ``E``, one call per chunk: rows of chunk
    ``(first, end)`` are kept where ``row >= offsets[first - 1]``. Rows past ``offsets[-1]`` are unspecified."""
    out = None
    row = None
    for first, end in chunks:
        if first == 0:
            out = _GROUPED_MM(a, b[:end], offs=offsets[:end])
            continue
        # Leading group: rows 0 .. offsets[first-1] under expert first-1's weight, discarded below.
        part = _GROUPED_MM(a, b[first - 1:end], offs=offsets[first - 1:end])
        if row is None:
            row = torch.arange(a.shape[0], device=a.device).unsqueeze(1)
        out = torch.where(row >= offsets[first - 1], part, out)
    return out


def _chunked_weight_grad(grad: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor,
                         chunks: list[tuple[int, int]]) -> torch.Tensor:
    """``grad_weight[e] = grad[rows of e].T @ a[rows of e]`` (E, N, K), one 2-D x 2-D ``grouped_mm`` per chunk
    (each chunk's leading group dropped)."""
    grad_t = grad.transpose(0, 1)
    pieces = []
    for first, end in chunks:
        lo = max(first - 1, 0)
        part = _GROUPED_MM(grad_t, a, offs=offsets[lo:end])  # (groups, N, K)
        pieces.append(part if first == 0 else part[1:])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


class _ChunkedGroupedMM(torch.autograd.Function):
    """:func:`chunked_grouped_mm` with its own backward: ``grouped_mm`` leaves the rows outside a call's groups
    unwritten (uninitialised memory; on the CPU its backward's input gradient held values like 1e-38 there), so
    the chunks' input gradients from PyTorch's backward could not simply be added up. Here the input gradient is
    put together chunk by chunk like the output, and the weight gradient is one 2-D x 2-D ``grouped_mm`` per chunk
    (its ragged dimension the rows, as PyTorch's own backward), each chunk's leading group dropped."""

    @staticmethod
    def forward(ctx, a, weight, offsets, max_groups):
        chunks = grouped_mm_chunks(weight.shape[0], max_groups)
        ctx.chunks = chunks
        ctx.save_for_backward(a, weight, offsets)
        return _chunked_rows(a, weight.transpose(-2, -1), offsets, chunks)

    @staticmethod
    def backward(ctx, grad):
        a, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_a = _chunked_rows(grad, weight, offsets, ctx.chunks)  # rows @ weight[e]: (M, N) -> (M, K)
        if ctx.needs_input_grad[1]:
            grad_weight = _chunked_weight_grad(grad, a, offsets, ctx.chunks)
        return grad_a, grad_weight, None, None


def chunked_grouped_mm(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                       max_groups: int = MAX_GROUPS_PER_CALL) -> torch.Tensor:
    """``grouped_mm(a, weight.transpose(-2, -1), offs=offsets)`` for any number of groups ``E``, with gradients:
    one call per chunk of at most ``max_groups`` groups (:func:`grouped_mm_chunks`), the chunks' rows put
    together with ``torch.where`` on the device (no host read of ``offsets``, so no graph break and no sync). The
    token matrix is passed whole to every call (no copies); each chunk after the first also computes the rows
    before it once more (about 1% extra for 1032 experts), and the weight gradient's chunks are concatenated (one
    copy of it). ``a`` (M, K) row-major, ``weight`` (E, N, K) in ``a``'s dtype, ``offsets`` int32 (E,) group
    ends on ``a``'s device. Rows past ``offsets[-1]`` are unspecified."""
    if _GROUPED_MM is None:
        raise RuntimeError("this PyTorch has no grouped_mm")
    if weight.shape[0] <= max_groups:
        return _GROUPED_MM(a, weight.transpose(-2, -1), offs=offsets)
    return _ChunkedGroupedMM.apply(a, weight, offsets, max_groups)


# Elements of the (M, experts, N) block the masked form computes per step: bounds its memory whatever E is, and
# takes many experts per step when the rows are few, so tracing a layer of a thousand experts stays quick.
_MASKED_BLOCK_ELEMENTS = 2**22


def _grouped_linear_masked(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_linear` with static shapes only (no host read of ``offsets``): every expert's product
    over all ``M`` rows, each row keeping its own expert's. ``E`` times the FLOPs; for tracing off CUDA, not for
    speed. A block of experts per step (one matmul, a gather of each row's expert), so the traced graph has
    ``E / block`` steps rather than ``E``. Rows past ``offsets[-1]`` are zero, as in the segment loop."""
    m, k = a.shape
    n_experts, n = weight.shape[0], weight.shape[1]
    rows_hint = m if isinstance(m, int) else 4096  # a symbolic M (dynamic shapes) must not pick the block size
    block = max(1, min(n_experts, _MASKED_BLOCK_ELEMENTS // max(1, rows_hint * n)))
    row = torch.arange(m, device=a.device, dtype=offsets.dtype)
    expert_of_row = torch.searchsorted(offsets, row, right=True)  # segment e holds offsets[e-1] <= row < offsets[e]
    out = a.new_zeros(m, n)
    for first in range(0, n_experts, block):
        w = weight[first:first + block]  # (B, N, K)
        products = (a @ w.reshape(-1, k).T).view(m, w.shape[0], n)  # (M, B, N)
        local = expert_of_row - first
        inside = ((local >= 0) & (local < w.shape[0])).unsqueeze(-1)  # (M, 1)
        picked = products.gather(1, local.clamp(0, w.shape[0] - 1).view(m, 1, 1).expand(m, 1, n)).squeeze(1)
        out = out + torch.where(inside, picked, 0.0)  # each row is in one segment: exact sums
    return out


def use_triton_routing(x: torch.Tensor) -> bool:
    """Whether the expert choice (top-k of the biased scores, and the load counts) takes the Triton kernel: CUDA,
    not traced by torch.compile, ``EMBSCALE_MOE_TRITON`` on."""
    return _USE_TRITON and x.is_cuda and not torch.compiler.is_compiling()


__all__ = ["MAX_GROUPS_PER_CALL", "Combine", "Dispatch", "SwiGLUWeighted", "accumulation_dtype",
           "chunked_grouped_mm", "grouped_linear", "grouped_mm_chunks", "sort_key_dtype", "use_triton_routing",
           "use_triton_swiglu"]
