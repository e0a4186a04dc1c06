"""Expert-selection kernel (kernels/routing.py) against its PyTorch twin: the top-k of the biased router scores
and each expert's load, on ragged token counts, non-power-of-two expert counts, k from 1 to all, with the bias
changing the choice; and the MoE layer routed through the kernel equal to the layer routed through the twin.
The kernel runs compiled on CUDA tensors when a GPU is there, otherwise in Triton's CPU interpreter (conftest.py
decides; the ``kernel_device`` fixture)."""

from __future__ import annotations

import pytest
import torch

from embscale.kernels import routing as kr

pytestmark = pytest.mark.skipif(kr.triton is None, reason="Triton is not installed")


def router_scores(tokens: int, experts: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores of random logits (no exact ties) and a random correction bias of the same scale, on
    ``device`` (computed on the CPU first: the same values on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    scores = (2 * torch.randn(tokens, experts, generator=gen)).softmax(-1)
    bias = 0.05 * torch.randn(experts, generator=gen)
    return scores.to(device), bias.to(device)


@pytest.mark.parametrize(("tokens", "experts", "k"), [(200, 64, 8), (37, 96, 6), (5, 3, 1), (64, 24, 24),
                                                      (129, 40, 2)])
def test_kernel_matches_twin(tokens, experts, k, kernel_device):
    scores, bias = router_scores(tokens, experts, seed=tokens + experts + k, device=kernel_device)
    chosen, counts = kr.triton_select_experts(scores, bias, k)
    want_chosen, want_counts = kr.reference_select_experts(scores, bias, k)
    assert chosen.dtype == torch.int64 and counts.dtype == torch.int64
    assert torch.equal(chosen, want_chosen)  # same experts, same (descending) order
    assert torch.equal(counts, want_counts)
    assert int(counts.sum()) == tokens * k


def test_bias_changes_the_choice_but_not_the_scores(kernel_device):
    scores, _ = router_scores(50, 16, seed=3, device=kernel_device)
    bias = torch.zeros(16, device=kernel_device)
    bias[5] = 1.0  # larger than any softmax gap: expert 5 is always picked first
    chosen, counts = kr.triton_select_experts(scores, bias, 2)
    assert (chosen[:, 0] == 5).all()
    assert int(counts[5]) == 50
    assert torch.equal(chosen, kr.reference_select_experts(scores, bias, 2)[0])


def test_equal_scores_pick_the_lower_index_first(kernel_device):
    scores = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]], device=kernel_device)
    chosen, counts = kr.triton_select_experts(scores, torch.zeros(4, device=kernel_device), 2)
    assert chosen.tolist() == [[0, 1], [1, 2]]
    assert counts.tolist() == [1, 2, 1, 0]


def test_no_tokens_and_bad_input(kernel_device):
    bias = torch.zeros(8, device=kernel_device)
    chosen, counts = kr.triton_select_experts(torch.rand(0, 8, device=kernel_device), bias, 3)
    assert chosen.shape == (0, 3) and counts.tolist() == [0] * 8
    with pytest.raises(ValueError, match="k must be"):
        kr.triton_select_experts(torch.rand(4, 8, device=kernel_device), bias, 9)
    with pytest.raises(ValueError, match="float32"):
        kr.triton_select_experts(torch.rand(4, 8, dtype=torch.float64, device=kernel_device), bias, 2)


def test_moe_layer_routed_through_the_kernel_matches_the_twin(monkeypatch, kernel_device):
    from embscale.models import moe as moe_module
    from embscale.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=2, d_model=32, n_layers=1, n_heads=2, n_experts=6, n_zero_experts=2, top_k=3,
                      expert_hidden=16, n_shared_experts=0)
    torch.manual_seed(0)
    layer = moe_module.MoE(cfg)
    layer.correction_bias.copy_(0.01 * torch.randn_like(layer.correction_bias))
    x = torch.randn(45, 32)
    layer, x = layer.to(kernel_device), x.to(kernel_device).requires_grad_(True)
    results = []
    for use_kernel in (False, True):
        # the layer takes the kernel on CUDA by itself, the twin on CPU: route each call explicitly (on CUDA
        # both calls also run the SwiGLU kernels, so only the expert choice differs between them)
        real = kr.select_experts
        monkeypatch.setattr(moe_module, "select_experts",
                            lambda s, b, k, use_triton=None, real=real, on=use_kernel: real(s, b, k, use_triton=on))
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), layer.router.weight.grad.clone(), layer.last_counts.clone()))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
