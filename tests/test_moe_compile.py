"""torch.compile sees the MoE layer, and a whole shortcut-layer MoE model, as single graphs (no graph breaks).

Which expert-product path dynamo traces here (CPU, no GPU): in float32, ``kernels.moe_dispatch._grouped_linear_masked``
(static shapes; the CPU-only traced form); under bf16 autocast, ``grouped_mm``, the op the CUDA bf16 training
path runs. Eager CPU runs neither (it loops over segments, reading the offsets on the host); the compiled
results are compared with eager ones with the ``aot_eager`` backend (no C++ toolchain needed). Not covered:
CUDA in float32, which still takes the host-reading loop and breaks the graph there.

``torch._dynamo`` imports Triton; it is imported inside the tests, not at collection. On a machine without a GPU,
conftest.py sets ``TRITON_INTERPRET=1`` before any test module is imported, so Triton is first imported under the
interpreter (which cannot call the jitted helpers of ``triton.language`` otherwise). These tests run on the CPU on
every machine.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from embscale.models.config import ModelConfig
from embscale.models.model import build_model
from embscale.models.moe import MoE

MOE = {"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 4, "n_zero_experts": 2,
       "top_k": 2, "expert_hidden": 32, "n_shared_experts": 1, "aux_loss_coef": 0.01, "max_seq_len": 64}
SHORTCUT = {**MOE, "layer_type": "shortcut", "dense_hidden": 64}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def precision(name: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()


def explain(fn, *args):
    import torch._dynamo

    result = torch._dynamo.explain(fn)(*args)
    reasons = [f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in result.break_reasons]
    return result, reasons


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_moe_forward_has_no_graph_breaks(dtype):
    torch.manual_seed(0)
    moe = MoE(ModelConfig.from_dict(MOE)).train()
    x = torch.randn(2, 16, 32)
    with precision(dtype):
        result, reasons = explain(moe, x)
    assert result.graph_break_count == 0 and result.graph_count == 1, reasons


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_shortcut_moe_model_forward_has_no_graph_breaks(dtype):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(SHORTCUT)).train()
    ids = torch.randint(0, 300, (2, 16))
    with precision(dtype):
        result, reasons = explain(model, ids, ids)
    assert result.graph_break_count == 0 and result.graph_count == 1, reasons


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_moe_matches_eager_forward_and_backward(dtype):
    torch.manual_seed(1)
    moe = MoE(ModelConfig.from_dict(MOE)).train()
    x = torch.randn(2, 16, 32)
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    outputs = {}
    for name, fn in (("eager", moe), ("compiled", compiled)):
        moe.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        with precision(dtype):
            y, aux = fn(xg)
            loss = (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum() + aux
        loss.backward()
        outputs[name] = [y.float(), aux.float(), xg.grad, moe.w_gate_up.grad, moe.w_down.grad,
                         moe.router.weight.grad]
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == "bf16" else {"rtol": 1e-5, "atol": 1e-5}
    for got, want in zip(outputs["compiled"], outputs["eager"], strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **tolerance)
