"""MoE layer: the sorted dispatch equals the per-expert reference; routing, zero experts, balancing, aux
loss."""

from __future__ import annotations

import pytest
import torch

from embscale.kernels.moe_dispatch import grouped_linear
from embscale.models.config import ModelConfig
from embscale.models.moe import MoE, count_ids


def make_moe(dtype=torch.float64, seed=0, **changes) -> MoE:
    base = dict(vocab_size=2, d_model=32, n_layers=2, n_heads=4, layer_type="standard", n_experts=6,
                n_zero_experts=3, top_k=3, expert_hidden=16, routed_scaling_factor=2.5)
    torch.manual_seed(seed)
    moe = MoE(ModelConfig(**{**base, **changes})).to(dtype)
    with torch.no_grad():  # a router with some spread, so the scores are far from uniform
        moe.router.weight.normal_(0.0, 0.5)
    return moe


def force_routing(moe: MoE, experts: list[int]) -> None:
    """Make every token choose exactly ``experts`` (the bias dominates scores in [0, 1])."""
    with torch.no_grad():
        moe.correction_bias.zero_()
        moe.correction_bias[experts] = 10.0


def outputs_and_grads(moe: MoE, x: torch.Tensor, grad_out: torch.Tensor, reference: bool):
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y, aux = (moe.forward_reference if reference else moe.forward)(x)
    loss = (y * grad_out).sum() + (aux if aux is not None else 0.0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


CASES = {
    "zero_experts": {},
    "no_zero_experts": dict(n_zero_experts=0),
    "shared_and_aux": dict(n_shared_experts=2, aux_loss_coef=0.1),
    "top_k_above_real": dict(n_experts=2, n_zero_experts=4, top_k=3),
    "many_experts": dict(n_experts=16, n_zero_experts=8, top_k=4),
}


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_dispatch_matches_reference_forward_and_backward(changes):
    moe = make_moe(**changes)
    x = torch.randn(3, 17, 32, dtype=torch.float64)
    grad_out = torch.randn(3, 17, 32, dtype=torch.float64)
    y, gx, grads = outputs_and_grads(moe, x, grad_out, reference=False)
    y_ref, gx_ref, grads_ref = outputs_and_grads(moe, x, grad_out, reference=True)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_ref.keys() and "router.weight" in grads and "w_gate_up" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-10, msg=name)


def test_dispatch_float32_and_empty_experts(kernel_device):
    """On CUDA the layer's own fast path: the routing and weighted-SwiGLU kernels, compiled."""
    moe = make_moe(dtype=torch.float32, n_experts=8, n_zero_experts=2, top_k=2).to(kernel_device)
    force_routing(moe, [1, 8])  # expert 1 and zero expert 8; all other experts receive nothing
    x, grad_out = torch.randn(40, 32).to(kernel_device), torch.randn(40, 32).to(kernel_device)
    y, gx, grads = outputs_and_grads(moe, x, grad_out, reference=False)
    y_ref, gx_ref, grads_ref = outputs_and_grads(moe, x, grad_out, reference=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6)
    assert grads["w_down"][[0, 2, 3, 4, 5, 6, 7]].abs().sum() == 0 and grads["w_down"][1].abs().sum() > 0


def test_zero_experts_pass_input_times_weight():
    moe = make_moe(n_experts=4, n_zero_experts=3, top_k=2)
    force_routing(moe, [4, 6])
    x = torch.randn(10, 32, dtype=torch.float64)
    y, _ = moe(x)
    scores = torch.softmax(moe.router(x).float(), dim=-1).double()
    expected = x * (scores[:, 4] + scores[:, 6]).unsqueeze(-1) * moe.routed_scaling_factor
    torch.testing.assert_close(y, expected)
    stats = moe.load_stats()
    assert stats["zero_expert_fraction"] == 1.0 and stats["distinct_experts"] == 0.0


def test_weights_are_unrenormalised_scores_times_scale():
    moe = make_moe(n_zero_experts=0, top_k=2)
    x = torch.randn(5, 32, dtype=torch.float64)
    scores, chosen, weights = moe.route(x)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(-1), torch.ones(5))
    torch.testing.assert_close(weights, scores.gather(1, chosen) * 2.5)
    assert (weights.sum(-1) < 2.5).all()  # not renormalised over the chosen experts


def test_bias_picks_but_does_not_weight():
    moe = make_moe()
    x = torch.randn(8, 32, dtype=torch.float64)
    force_routing(moe, [0, 2, 7])
    scores, chosen, weights = moe.route(x)
    assert sorted(chosen[0].tolist()) == [0, 2, 7]
    torch.testing.assert_close(weights, scores.gather(1, chosen) * moe.routed_scaling_factor)


def test_bias_balancing_reduces_imbalance():
    moe = make_moe(dtype=torch.float32, n_experts=8, n_zero_experts=4, top_k=2, router_bias_update_rate=0.01)
    with torch.no_grad():  # a router skewed toward experts 0 and 1
        moe.router.weight.normal_(0.0, 0.05)
        moe.router.weight[:2] += 0.05
    x = torch.randn(512, 32) + 1.0
    moe(x)
    before = moe.load_stats()["moe_imbalance"]
    zero_bias = moe.correction_bias[8:].clone()
    after = []
    for _ in range(50):
        moe(x)
        after.append(moe.load_stats()["moe_imbalance"])
        moe.update_bias()
    after = max(after[-10:])  # the bias oscillates around balance by one rate step
    assert before > 3.0 and after < 0.5 * before, (before, after)
    assert torch.equal(moe.correction_bias[8:], zero_bias)  # zero-expert biases stay fixed
    assert moe.pending_counts.sum() == 0


def test_update_bias_moves_by_rate_times_sign():
    moe = make_moe(dtype=torch.float32, n_experts=4, n_zero_experts=2, top_k=1, router_bias_update_rate=0.5)
    force_routing(moe, [1])
    moe(torch.randn(6, 32))
    moe.update_bias()
    # load (0, 6, 0, 0), mean 1.5: expert 1 down by the rate, the others up; zero experts untouched
    torch.testing.assert_close(moe.correction_bias, torch.tensor([0.5, 9.5, 0.5, 0.5, 0.0, 0.0]))


def test_loads_are_counted_only_in_training():
    moe = make_moe(dtype=torch.float32)
    moe.eval()
    moe(torch.randn(7, 32))
    assert moe.pending_counts.sum() == 0 and moe.last_counts.sum() == 7 * 3
    moe.train()
    moe(torch.randn(7, 32))
    moe(torch.randn(5, 32))
    assert moe.pending_counts.sum() == 12 * 3


def test_aux_loss_nonnegative_with_router_gradient():
    moe = make_moe(dtype=torch.float32, aux_loss_coef=0.01)
    y, aux = moe(torch.randn(64, 32))
    assert aux is not None and aux.ndim == 0 and aux.item() >= 0.0
    aux.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert make_moe(dtype=torch.float32)(torch.randn(4, 32))[1] is None  # coefficient 0: no aux loss


def test_bias_stays_float32_when_cast():
    moe = make_moe(dtype=torch.float32)
    with torch.no_grad():
        moe.correction_bias[0] = 0.1234567
    moe = moe.to(torch.bfloat16)
    assert moe.w_gate_up.dtype == torch.bfloat16
    assert moe.correction_bias.dtype == torch.float32
    assert moe.correction_bias[0].item() == pytest.approx(0.1234567)
    y, _ = moe(torch.randn(4, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_grouped_linear_fallback_and_count_ids():
    a = torch.randn(10, 6, dtype=torch.float64)
    w = torch.randn(3, 4, 6, dtype=torch.float64)
    offsets = torch.tensor([3, 3, 8], dtype=torch.int32)  # expert 1 empty, rows 8.. not computed
    out = grouped_linear(a, w, offsets)
    torch.testing.assert_close(out[:3], a[:3] @ w[0].T)
    torch.testing.assert_close(out[3:8], a[3:8] @ w[2].T)
    assert count_ids(torch.tensor([2, 0, 2, 2]), 4).tolist() == [1, 0, 3, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grouped_mm path needs a CUDA device")
@pytest.mark.parametrize("zero_experts", [0, 8])
def test_cuda_grouped_mm_path_matches_reference(zero_experts):
    moe = make_moe(dtype=torch.bfloat16, d_model=64, n_experts=16, n_zero_experts=zero_experts, top_k=4,
                   expert_hidden=32).cuda()
    x, grad_out = torch.randn(256, 64, device="cuda"), torch.randn(256, 64, device="cuda")
    y, gx, grads = outputs_and_grads(moe, x.bfloat16(), grad_out.bfloat16(), reference=False)
    y_ref, gx_ref, grads_ref = outputs_and_grads(moe, x.bfloat16(), grad_out.bfloat16(), reference=True)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(y, y_ref) < 2e-2 and rel(gx, gx_ref) < 2e-2
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < 2e-2, name
