"""Fused cross-entropy (kernels/cross_entropy.py) against its PyTorch twins and ``F.cross_entropy``: forward and
backward on ragged vocabularies (not a multiple of the block), bf16 and fp32 logits, ignored rows; the custom
operator's registration (``torch.library.opcheck``) and its use under ``torch.compile`` without a graph break.
The kernels run compiled on CUDA tensors when a GPU is there, otherwise in Triton's CPU interpreter (conftest.py
decides; the ``kernel_device`` fixture), so the shapes are small."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embscale.kernels import cross_entropy as kce

pytestmark = pytest.mark.skipif(kce.triton is None, reason="Triton is not installed")


def inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int, device: torch.device | str = "cpu"):
    """Logits of scale 3 (a peaked softmax), random targets with two ignored rows, a random row gradient, on
    ``device`` (drawn on the CPU generator first: the same values on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[1] = targets[-1] = -100
    grad_loss = torch.rand(rows, generator=gen) + 0.5
    return logits.to(device), targets.to(device), grad_loss.to(device)


@pytest.mark.parametrize(("rows", "vocab", "dtype"), [(9, 1000, torch.float32), (6, 5003, torch.bfloat16),
                                                      (5, 9000, torch.float32), (3, 7, torch.bfloat16)])
def test_kernels_match_twins(rows, vocab, dtype, kernel_device):
    logits, targets, grad_loss = inputs(rows, vocab, dtype, seed=rows + vocab, device=kernel_device)
    loss, lse = kce.triton_cross_entropy_rows(logits, targets)
    want_loss, want_lse = kce.reference_cross_entropy_rows(logits, targets)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-5)
    assert loss[1] == 0 and loss[-1] == 0
    grad = kce.triton_cross_entropy_rows_backward(grad_loss, logits, targets, lse)
    want = kce.reference_cross_entropy_rows_backward(grad_loss, logits, targets, want_lse)
    assert grad.dtype == dtype
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 4e-3}
    torch.testing.assert_close(grad, want, **tol)
    assert grad[1].abs().sum() == 0  # ignored rows get no gradient


def test_operator_loss_and_gradient_equal_torch_cross_entropy(kernel_device):
    logits, targets, _ = inputs(12, 3001, torch.float32, seed=5, device=kernel_device)
    x = logits.clone().requires_grad_()
    loss_rows, _ = kce.cross_entropy_rows(x, targets, -100)  # the operator (the kernels: compiled or interpreted)
    loss = loss_rows.sum() / (targets != -100).sum()
    loss.backward()
    y = logits.clone().requires_grad_()
    want = F.cross_entropy(y, targets, ignore_index=-100)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)
    # the model's loss: on CUDA the operator above, on CPU F.cross_entropy itself
    torch.testing.assert_close(kce.cross_entropy(logits, targets), want.detach(), rtol=1e-6, atol=1e-6)


def test_operator_registration(kernel_device):
    logits, targets, _ = inputs(4, 300, torch.float32, seed=2, device=kernel_device)
    torch.library.opcheck(kce.cross_entropy_rows, (logits.requires_grad_(), targets, -100))


def test_compiles_without_graph_break(kernel_device):
    import torch._dynamo

    def loss_fn(logits, targets):
        loss, _ = kce.cross_entropy_rows(logits, targets, -100)
        return loss.sum() / (targets != -100).sum()

    logits, targets, _ = inputs(5, 400, torch.float32, seed=3, device=kernel_device)
    explanation = torch._dynamo.explain(loss_fn)(logits, targets)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits, targets), loss_fn(logits, targets))


def test_cpu_loss_is_torch_cross_entropy_and_bad_shapes_fail():
    logits, targets, _ = inputs(6, 50, torch.bfloat16, seed=4)  # CPU tensors: the PyTorch path, on any machine
    want = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    assert torch.equal(kce.cross_entropy(logits, targets), want)
    with pytest.raises(ValueError, match=r"logits must be \(N, V\)"):
        kce.triton_cross_entropy_rows(logits, targets[:3])
