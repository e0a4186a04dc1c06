"""Fused cross-entropy of the LM head (Triton): the loss from bf16 logits without an fp32 copy of them.

``F.cross_entropy(logits.float(), targets)`` is expensive at LM-head sizes: at 16 sequences of 1024 tokens and a
32,768 vocabulary the logits are 537M values, so the upcast writes a 2.1 GB fp32 copy, the log-softmax reads it
and writes another, and the backward writes an fp32 gradient before casting it back to bf16. In the compiled
benchmark models the softmax kernels were the largest item that is not a matrix product.

Here, per row ``i`` with target ``t_i`` (rows whose target is ``ignore_index`` contribute nothing)::

    lse_i  = log sum_j exp(x_ij)          # online: running max and rescaled sum, one pass over the row
    loss_i = lse_i - x_{i, t_i}           # fp32; the mean over counted rows is taken in PyTorch
    d loss_i / d x_ij = exp(x_ij - lse_i) - [j == t_i]

- forward (:func:`triton_cross_entropy_rows`): one program per row walks the vocabulary in chunks,
  reading the logits once in their own dtype and computing in fp32; writes ``loss_i`` and ``lse_i``.
- backward: one program per (row, chunk of columns) recomputes ``exp(x - lse)``, subtracts the
  one-hot and scales by the row's incoming gradient, writing the gradient in the logits' dtype.

Bytes: the forward reads the logits once (1.07 GB in bf16 at the size above), the backward reads them once and
writes their gradient once (2.15 GB), so the floor is three passes over the bf16 logits, against the fp32 path's
upcast, fp32 softmax and fp32 gradient. The measured times (forward, backward, against ``F.cross_entropy`` on the
fp32 copy, and the effect on whole compiled steps and their peak memory) are in BENCHMARKS.md.

:func:`cross_entropy` is what the model calls: on CUDA the kernels, as the custom operator
``embscale::cross_entropy_rows`` (opaque to ``torch.compile``, so the compiled model has no graph break and
keeps the kernels); elsewhere ``F.cross_entropy`` on the fp32 logits.
:func:`reference_cross_entropy_rows` and :func:`reference_cross_entropy_rows_backward` are the PyTorch twins
that define the meaning (the tests run the kernels in Triton's CPU interpreter against them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # a CPU-only install may lack Triton: the reference twins still work
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None
    tl = None

from embscale.kernels.runtime import lazy_kernels, triton_usable
from embscale.kernels.runtime import next_pow2 as _next_pow2

# Launch shapes chosen by a sweep at 16384 x 32768 bf16 logits (numbers in BENCHMARKS.md): the forward's walk is
# fastest at 1024 columns x 4 warps; the backward is flat from 1024 to 8192 columns, 4096 x 8 warps kept.
FORWARD_BLOCK_V = 1024  # vocabulary columns per step of the forward's walk
FORWARD_WARPS = 4
BACKWARD_BLOCK_V = 4096  # vocabulary columns per program of the backward
BACKWARD_WARPS = 8


# ------------------------------------------------------------------------------------------------------------
# Twins
# ------------------------------------------------------------------------------------------------------------

def reference_cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (N,), lse (N,))`` fp32 for ``logits`` ``(N, V)`` and ``targets`` ``(N,)``; ignored rows have
    loss 0."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != ignore_index
    picked = x.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, lse - picked, 0.0), lse


def reference_cross_entropy_rows_backward(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                                          lse: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Gradient of ``sum_i grad_loss_i * loss_i`` with respect to ``logits``, in the logits' dtype."""
    valid = targets != ignore_index
    probs = torch.exp(logits.float() - lse.unsqueeze(1))
    probs[torch.arange(logits.shape[0], device=logits.device)[valid], targets[valid]] -= 1.0
    scale = torch.where(valid, grad_loss.float(), 0.0)
    return (probs * scale.unsqueeze(1)).to(logits.dtype)


# ------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------

def _forward_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, n_cols, stride, ignore_index,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    # running maximum and sum of exp(x - maximum), per lane; combined across lanes at the end
    run_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        # lanes still at -inf (no value seen yet) add nothing; avoid exp(-inf - -inf) = nan
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.exp(x - safe_max)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lane_max = tl.where(run_max == float("-inf"), row_max, run_max)
    total = tl.sum(run_sum * tl.exp(lane_max - row_max), axis=0)
    lse = row_max + tl.log(total)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    tl.store(lse_ptr + row, lse)


def _backward_kernel(grad_loss_ptr, logits_ptr, targets_ptr, lse_ptr, grad_ptr, n_cols, stride, grad_stride,
                     ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    scale = tl.where(valid, tl.load(grad_loss_ptr + row).to(tl.float32), 0.0)
    grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
    tl.store(grad_ptr + row * grad_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, V) and targets (N,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")


def triton_cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel form of :func:`reference_cross_entropy_rows`."""
    _check(logits, targets)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        _kernels()["forward"][(n_rows,)](logits, targets.contiguous(), loss, lse, n_cols, logits.stride(0),
                                         ignore_index, BLOCK=min(FORWARD_BLOCK_V, _next_pow2(n_cols)),
                                         num_warps=FORWARD_WARPS)
    return loss, lse


def triton_cross_entropy_rows_backward(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                                       lse: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Kernel form of :func:`reference_cross_entropy_rows_backward`."""
    _check(logits, targets)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    grad = torch.empty_like(logits)
    if n_rows:
        block = min(BACKWARD_BLOCK_V, _next_pow2(n_cols))
        _kernels()["backward"][(n_rows, triton.cdiv(n_cols, block))](
            grad_loss.contiguous(), logits, targets.contiguous(), lse.contiguous(), grad, n_cols, logits.stride(0),
            grad.stride(0), ignore_index, BLOCK=block, num_warps=BACKWARD_WARPS)
    return grad


# ------------------------------------------------------------------------------------------------------------
# The operator (autograd, torch.compile) and the loss
# ------------------------------------------------------------------------------------------------------------

def _rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    fn = triton_cross_entropy_rows if triton_usable(logits.device) else reference_cross_entropy_rows
    return fn(logits, targets, ignore_index)


def _rows_backward(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   ignore_index: int) -> torch.Tensor:
    fn = (triton_cross_entropy_rows_backward if triton_usable(logits.device)
          else reference_cross_entropy_rows_backward)
    return fn(grad_loss, logits, targets, lse, ignore_index)


@torch.library.custom_op("embscale::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (N,), lse (N,))`` fp32 per row (differentiable in ``loss``; ``lse`` is saved for the
    backward). The kernels where usable, the twins otherwise."""
    return _rows(logits, targets, ignore_index)


@cross_entropy_rows.register_fake
def _(logits, targets, ignore_index):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("embscale::cross_entropy_rows_backward", mutates_args=())
def cross_entropy_rows_backward(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                                lse: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Gradient of the rows' losses with respect to the logits, in the logits' dtype."""
    return _rows_backward(grad_loss, logits, targets, lse, ignore_index)


@cross_entropy_rows_backward.register_fake
def _(grad_loss, logits, targets, lse, ignore_index):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_loss, grad_lse):
    del grad_lse  # lse is an auxiliary output: nothing differentiates it
    logits, targets, lse = ctx.saved_tensors
    return cross_entropy_rows_backward(grad_loss, logits, targets, lse, ctx.ignore_index), None, None


cross_entropy_rows.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not ``ignore_index`` (``F.cross_entropy``'s
    meaning: NaN when every row is ignored). ``logits`` ``(N, V)`` in any float dtype, ``targets`` ``(N,)``.
    On CUDA the fused kernels (no fp32 copy of the logits); elsewhere ``F.cross_entropy`` on fp32 logits."""
    if not logits.is_cuda:
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    loss, _ = cross_entropy_rows(logits, targets, ignore_index)
    return loss.sum() / (targets != ignore_index).sum()


def _kernels() -> dict:
    return lazy_kernels(__name__, lambda: {"forward": triton.jit(_forward_kernel),
                                           "backward": triton.jit(_backward_kernel)})


__all__ = [
    "cross_entropy",
    "cross_entropy_rows",
    "reference_cross_entropy_rows",
    "reference_cross_entropy_rows_backward",
    "triton_cross_entropy_rows",
    "triton_cross_entropy_rows_backward",
    "triton_usable",
]
