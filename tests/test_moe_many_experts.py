"""More experts than one grouped_mm call takes (PyTorch's CUDA kernel refuses 1024 groups or more): the chunked
grouped product equals a loop over the groups, and a 1032-expert MoE layer (the 280M ladder's ratio-45 point)
equals its per-expert reference forward and backward, eagerly on the CPU, compiled on the CPU (the masked form in
float32, the chunked ``grouped_mm`` in bf16), and on CUDA through ``grouped_mm`` when a GPU is present."""

from __future__ import annotations

import contextlib

import pytest
import torch

from embscale.kernels import routing
from embscale.kernels.moe_dispatch import (
    MAX_GROUPS_PER_CALL,
    _grouped_linear_masked,
    chunked_grouped_mm,
    grouped_linear,
    grouped_mm_chunks,
)
from embscale.models.config import ModelConfig
from embscale.models.moe import MoE

N_EXPERTS = 1032  # sweeps/paper_280m.yaml, ratio 45


def test_chunk_plan_covers_every_group_within_the_call_limit():
    assert MAX_GROUPS_PER_CALL == 1023
    assert grouped_mm_chunks(1023) == [(0, 1023)]
    assert grouped_mm_chunks(N_EXPERTS) == [(0, 10), (10, 1032)]
    for n_groups, max_groups in [(1024, 1023), (2100, 1023), (2046, 1023), (23, 5), (9, 2), (5, 5), (6, 5)]:
        chunks = grouped_mm_chunks(n_groups, max_groups)
        assert chunks[0][0] == 0 and chunks[-1][1] == n_groups
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
        calls = [end - first + (first > 0) for first, end in chunks]  # a later chunk carries one leading group
        assert all(0 < c <= max_groups for c in calls), (n_groups, max_groups, chunks)
    with pytest.raises(ValueError, match="max_groups"):
        grouped_mm_chunks(10, 1)


def ragged_problem(n_groups: int, device, dtype, seed: int = 0, k: int = 16, n: int = 24):
    """Rows in ``n_groups`` contiguous groups (about a third empty, the first and last groups among them), then 37
    rows past the last offset that hold NaN: they belong to no group and must not leak into anything."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3, (n_groups,), generator=gen)
    sizes[0] = sizes[-1] = 0
    offsets = sizes.cumsum(0).to(torch.int32)
    m_real = int(offsets[-1])
    a = torch.randn(m_real + 37, k, generator=gen)
    a[m_real:] = float("nan")
    weight = torch.randn(n_groups, n, k, generator=gen) / k**0.5
    grad = torch.randn(m_real + 37, n, generator=gen)
    to = dict(device=device, dtype=dtype)
    return a.to(**to), weight.to(**to), offsets.to(device), grad.to(**to), m_real


def loop_reference(a, weight, offsets, grad):
    """Output rows, input gradient and weight gradient of the grouped product, one matmul each per group, in
    float64: ``out_e = a_e @ W_e.T``, ``grad_a_e = grad_e @ W_e``, ``grad_W_e = grad_e.T @ a_e``."""
    a, weight, grad = a.double().cpu(), weight.double().cpu(), grad.double().cpu()
    ends = offsets.tolist()
    out, grad_a = torch.zeros(ends[-1], weight.shape[1], dtype=torch.float64), torch.zeros_like(a)
    grad_w = torch.zeros_like(weight)
    for e, (start, end) in enumerate(zip([0] + ends[:-1], ends, strict=True)):
        out[start:end] = a[start:end] @ weight[e].T
        grad_a[start:end] = grad[start:end] @ weight[e]
        grad_w[e] = grad[start:end].T @ a[start:end]
    return out, grad_a, grad_w


def grads_of(fn, a, weight, offsets, grad, m_real):
    a, weight = a.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    out = fn(a, weight, offsets)
    # Rows past the last offset are unspecified: they get no gradient, as in the layer (masked downstream).
    out[:m_real].backward(grad[:m_real])
    return out.detach(), a.grad, weight.grad


def assert_matches_loop(got, want, m_real, tolerance):
    (out, grad_a, grad_w), (out_ref, grad_a_ref, grad_w_ref) = got, want
    out, grad_a, grad_w = out.double().cpu(), grad_a.double().cpu(), grad_w.double().cpu()
    torch.testing.assert_close(out[:m_real], out_ref, **tolerance)
    torch.testing.assert_close(grad_a[:m_real], grad_a_ref[:m_real], **tolerance)
    torch.testing.assert_close(grad_w, grad_w_ref, **tolerance)
    assert grad_w[0].abs().sum() == 0 and grad_w[-1].abs().sum() == 0  # empty groups get a zero gradient


def test_chunked_grouped_mm_with_2100_groups_matches_loop(kernel_device):
    """fp32 on the CPU (PyTorch's CPU grouped_mm takes it), bf16 on CUDA; three calls of at most 1023 groups."""
    dtype = torch.bfloat16 if kernel_device.type == "cuda" else torch.float32
    a, weight, offsets, grad, m_real = ragged_problem(2100, kernel_device, dtype)
    assert len(grouped_mm_chunks(2100)) == 3
    got = grads_of(chunked_grouped_mm, a, weight, offsets, grad, m_real)
    want = loop_reference(a, weight, offsets, grad)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    assert_matches_loop(got, want, m_real, tolerance)


def test_chunked_grouped_mm_with_many_small_chunks_matches_loop():
    a, weight, offsets, grad, m_real = ragged_problem(23, "cpu", torch.float32, seed=1)
    assert len(grouped_mm_chunks(23, 3)) == 11

    def chunked(a, w, offs):
        return chunked_grouped_mm(a, w, offs, max_groups=3)

    got = grads_of(chunked, a, weight, offsets, grad, m_real)
    assert_matches_loop(got, loop_reference(a, weight, offsets, grad), m_real, {"rtol": 1e-5, "atol": 1e-5})


@pytest.mark.parametrize("form", ["segment_loop", "masked"])
def test_other_forms_with_2100_groups_match_loop(form):
    """The eager CPU segment loop and the static-shape masked form (traced by torch.compile off CUDA)."""
    a, weight, offsets, grad, m_real = ragged_problem(2100, "cpu", torch.float32, seed=2)
    a[m_real:] = 0.0  # these forms multiply every row: the layer keeps rows past the last offset finite for them
    fn = grouped_linear if form == "segment_loop" else _grouped_linear_masked
    got = grads_of(fn, a, weight, offsets, grad, m_real)
    assert (got[0][m_real:] == 0).all()  # rows past the last offset are zero in both forms
    assert_matches_loop(got, loop_reference(a, weight, offsets, grad), m_real, {"rtol": 1e-5, "atol": 1e-5})


# ----------------------------------------------------------------------------------------------- the MoE layer
def make_moe(**changes) -> MoE:
    base = dict(vocab_size=2, d_model=32, n_layers=2, n_heads=4, layer_type="standard", n_experts=N_EXPERTS,
                n_zero_experts=8, top_k=4, expert_hidden=16, routed_scaling_factor=2.5, n_shared_experts=1,
                aux_loss_coef=0.01)
    torch.manual_seed(0)
    moe = MoE(ModelConfig(**{**base, **changes}))
    with torch.no_grad():  # a router with some spread, so the scores are far from uniform
        moe.router.weight.normal_(0.0, 0.5)
    return moe


def layer_outputs_and_grads(moe: MoE, fn, x: torch.Tensor, grad_out: torch.Tensor, autocast_bf16: bool = False):
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with autocast:
        y, aux = fn(x)
        loss = (y.float() * grad_out.float()).sum() + aux
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in moe.named_parameters() if p.grad is not None}
    return y.detach().float(), x.grad.float(), grads


def assert_layer_close(got, want, tolerance):
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = got, want
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(gx, gx_ref, **tolerance)
    assert grads.keys() == grads_ref.keys() and {"router.weight", "w_gate_up", "w_down"} <= grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], **tolerance, msg=name)


def test_1032_expert_layer_matches_reference_on_cpu():
    """Eager float32 on the CPU (the segment loop) against the per-expert reference: rtol 1e-5, atol 1e-6."""
    moe = make_moe()
    x, grad_out = torch.randn(384, 32), torch.randn(384, 32)
    got = layer_outputs_and_grads(moe, moe.forward, x, grad_out)
    want = layer_outputs_and_grads(moe, moe.forward_reference, x, grad_out)
    assert_layer_close(got, want, {"rtol": 1e-5, "atol": 1e-6})
    used = (moe.last_counts[:N_EXPERTS] > 0).sum()
    assert 500 < used < N_EXPERTS  # experts on both sides of the 1023-group boundary, and some empty ones
    assert moe.last_counts[N_EXPERTS:].sum() > 0  # zero experts chosen too
    grads = got[2]
    assert grads["w_down"][moe.last_counts[:N_EXPERTS] == 0].abs().sum() == 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_1032_expert_layer_compiled_matches_eager(dtype):
    """torch.compile (aot_eager, fullgraph: no graph break) traces the masked form in float32 and the chunked
    grouped_mm under bf16 autocast; both equal the eager layer forward and backward (fp32: rtol/atol 1e-5; bf16:
    2e-2, as tests/test_moe_compile.py)."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        moe = make_moe()
        x, grad_out = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
        compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
        bf16 = dtype == "bf16"
        got = layer_outputs_and_grads(moe, compiled, x, grad_out, autocast_bf16=bf16)
        want = layer_outputs_and_grads(moe, moe.forward, x, grad_out, autocast_bf16=bf16)
        tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-5}
        assert_layer_close(got, want, tolerance)
    finally:
        torch._dynamo.reset()


def test_1032_expert_layer_grouped_mm_on_cuda(kernel_device):
    """The CUDA training path: bf16 through the chunked grouped_mm, the routing and SwiGLU kernels; relative
    error of every output and gradient under 2e-2 against the per-expert reference (as tests/test_moe.py)."""
    if kernel_device.type != "cuda":
        pytest.skip("the grouped_mm path needs a CUDA device")
    moe = make_moe().to(kernel_device, torch.bfloat16)
    x = torch.randn(512, 32, device=kernel_device).bfloat16()
    grad_out = torch.randn(512, 32, device=kernel_device).bfloat16()
    y, gx, grads = layer_outputs_and_grads(moe, moe.forward, x, grad_out)
    y_ref, gx_ref, grads_ref = layer_outputs_and_grads(moe, moe.forward_reference, x, grad_out)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert (moe.last_counts[:N_EXPERTS] > 0).sum() > 500
    assert rel(y, y_ref) < 2e-2 and rel(gx, gx_ref) < 2e-2
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < 2e-2, name


def test_expert_choice_kernel_over_1548_router_outputs(kernel_device):
    """The routing kernel at the ladder's ratio-45 width (1032 real + 516 zero experts: a 2048-wide block) picks
    and counts as its PyTorch twin (compiled on CUDA, Triton's interpreter otherwise)."""
    if routing.triton is None:
        pytest.skip("Triton is not installed")
    gen = torch.Generator().manual_seed(3)
    scores = (2 * torch.randn(70, 1548, generator=gen)).softmax(-1).to(kernel_device)
    bias = (0.001 * torch.randn(1548, generator=gen)).to(kernel_device)
    chosen, counts = routing.triton_select_experts(scores, bias, 8)
    want_chosen, want_counts = routing.reference_select_experts(scores, bias, 8)
    assert torch.equal(chosen, want_chosen) and torch.equal(counts, want_counts)
    assert int(counts.sum()) == 70 * 8
