"""Fused weighted SwiGLU kernels (kernels/swiglu.py) against their PyTorch twins and models.moe's torch
functions: forward and backward on ragged row counts, non-power-of-two hidden sizes, with and without the
``row_real`` mask, bf16 and fp32; and ``kernels.moe_dispatch.SwiGLUWeighted`` routed through the kernels. The
kernels run compiled on CUDA tensors when a GPU is there, otherwise in Triton's CPU interpreter (conftest.py
decides; the ``kernel_device`` fixture), so the shapes are small."""

from __future__ import annotations

import pytest
import torch

from embscale.kernels import moe_dispatch
from embscale.kernels import swiglu as ks

pytestmark = [pytest.mark.skipif(ks.triton is None, reason="Triton is not installed"),
              pytest.mark.usefixtures("one_thread")]

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def inputs(m: int, h: int, dtype: torch.dtype, seed: int = 0, mask: bool = False,
           device: torch.device | str = "cpu"):
    """Random non-zero ``grad (M, H)``, ``gate_up (M, 2H)`` in ``dtype``, weights ``(M,)`` fp32 in (0.1, 1.1),
    and (``mask``) a ``row_real`` with a trailing block of False rows holding large garbage; on ``device``
    (drawn on the CPU generator first: the same values on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = (2 * torch.randn(m, 2 * h, generator=gen)).to(dtype)
    grad = torch.randn(m, h, generator=gen).to(dtype)
    weight = torch.rand(m, generator=gen) + 0.1
    row_real = None
    if mask:
        row_real = torch.arange(m) < (2 * m) // 3
        gate_up[~row_real] = 50.0  # uncomputed rows of the grouped product: anything
        row_real = row_real.to(device)
    return grad.to(device), gate_up.to(device), weight.to(device), row_real


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


SHAPES = [(1, 24), (37, 96), (130, 160), (16, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "h"), SHAPES)
def test_forward_matches_twin(m, h, dtype, kernel_device):
    _, gate_up, weight, _ = inputs(m, h, dtype, seed=m + h, device=kernel_device)
    out = ks.swiglu_weighted_forward(gate_up, weight)
    expected = ks.reference_forward(gate_up, weight)
    close(out, expected, dtype)


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "h"), SHAPES)
def test_backward_matches_twin(m, h, dtype, mask, kernel_device):
    grad, gate_up, weight, row_real = inputs(m, h, dtype, seed=m * h, mask=mask, device=kernel_device)
    grad_gate_up, grad_weight = ks.swiglu_weighted_backward(grad, gate_up, weight, row_real)
    expected_gu, expected_w = ks.reference_backward(grad, gate_up, weight, row_real)
    real = slice(None) if row_real is None else row_real
    close(grad_gate_up[real], expected_gu[real], dtype)  # rows with row_real False are never used
    close(grad_weight, expected_w, torch.float32)  # fp32 row sums, fp32 weights
    if row_real is not None:
        assert torch.all(grad_weight[~row_real] == 0)


def test_twin_backward_is_the_gradient_of_the_twin_forward():
    """The twins (also the MoE's torch path, models.moe) agree with autograd in float64."""
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(11, 2 * 24, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.rand(11, dtype=torch.float64, generator=generator, requires_grad=True)
    grad = torch.randn(11, 24, dtype=torch.float64, generator=generator)
    ks.reference_forward(gate_up, weight).backward(grad)
    grad_gate_up, grad_weight = ks.reference_backward(grad, gate_up.detach(), weight.detach(), None)
    torch.testing.assert_close(grad_gate_up, gate_up.grad)
    torch.testing.assert_close(grad_weight, weight.grad)
    assert moe_dispatch._swiglu_weighted_fwd is ks.reference_forward


@pytest.mark.parametrize(("block_m", "block_h"), [(1, 16), (4, 32), (8, 256)])
def test_chunked_tiles_match_twin(block_m, block_h, kernel_device):
    """Tiles narrower than H (the loop over column chunks, with a ragged last chunk) and ragged row blocks."""
    m, h, dtype = 37, 96 if block_h < 96 else 160, torch.bfloat16
    grad, gate_up, weight, row_real = inputs(m, h, dtype, seed=block_h, mask=True, device=kernel_device)
    out = ks.swiglu_weighted_forward(gate_up, weight, block_m=block_m, block_h=block_h)
    close(out, ks.reference_forward(gate_up, weight), dtype)
    grad_gate_up, grad_weight = ks.swiglu_weighted_backward(grad, gate_up, weight, row_real,
                                                            block_m=block_m, block_h=block_h)
    expected_gu, expected_w = ks.reference_backward(grad, gate_up, weight, row_real)
    close(grad_gate_up[row_real], expected_gu[row_real], dtype)
    close(grad_weight, expected_w, torch.float32)


def test_strided_rows_and_empty(kernel_device):
    """Row-strided inputs (a column slice of a wider buffer) and zero rows."""
    grad, gate_up, weight, _ = inputs(20, 24, torch.float32, seed=3, device=kernel_device)
    wide = torch.randn(20, 64).to(kernel_device)
    wide[:, :48] = gate_up
    close(ks.swiglu_weighted_forward(wide[:, :48], weight), ks.reference_forward(gate_up, weight), torch.float32)
    grad_gate_up, grad_weight = ks.swiglu_weighted_backward(grad, wide[:, :48], weight)
    expected_gu, expected_w = ks.reference_backward(grad, gate_up, weight, None)
    close(grad_gate_up, expected_gu, torch.float32)
    close(grad_weight, expected_w, torch.float32)
    empty, no_weight = torch.empty(0, 48, device=kernel_device), torch.empty(0, device=kernel_device)
    assert ks.swiglu_weighted_forward(empty, no_weight).shape == (0, 24)
    grad_gate_up, grad_weight = ks.swiglu_weighted_backward(torch.empty(0, 24, device=kernel_device), empty,
                                                            no_weight)
    assert grad_gate_up.shape == (0, 48) and grad_weight.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_function_through_kernels(monkeypatch, dtype, kernel_device):
    """kernels.moe_dispatch.SwiGLUWeighted routed to the kernels (by itself on CUDA, as the MoE layer runs
    there) gives the twin's output and gradients; by default on CPU it keeps the torch path."""
    assert not moe_dispatch.use_triton_swiglu(torch.empty(1, 2))  # CPU: never the kernels, even interpreted
    calls = []
    forward, backward = ks.swiglu_weighted_forward, ks.swiglu_weighted_backward
    monkeypatch.setattr(ks, "swiglu_weighted_forward", lambda *a: calls.append("fwd") or forward(*a))
    monkeypatch.setattr(ks, "swiglu_weighted_backward", lambda *a: calls.append("bwd") or backward(*a))
    grad, gate_up, weight, row_real = inputs(45, 40, dtype, seed=7, mask=True, device=kernel_device)
    if kernel_device.type == "cuda":
        assert moe_dispatch.use_triton_swiglu(gate_up)  # the default on CUDA
    else:  # route the CPU call through the (interpreted) kernels here
        monkeypatch.setattr(moe_dispatch, "use_triton_swiglu", lambda gate_up: True)
    gu, w = gate_up.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = moe_dispatch.SwiGLUWeighted.apply(gu, w, row_real)
    out.backward(grad)
    assert calls == ["fwd", "bwd"]
    close(out.detach(), ks.reference_forward(gate_up, weight), dtype)
    expected_gu, expected_w = ks.reference_backward(grad, gate_up, weight, row_real)
    close(gu.grad[row_real], expected_gu[row_real], dtype)
    close(w.grad, expected_w, torch.float32)
