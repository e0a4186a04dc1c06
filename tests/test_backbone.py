"""The backbone: shapes, causality, layer wiring, embeddings, norms, and that a tiny model can learn."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from embscale.models.config import MLAConfig, ModelConfig, PerLayerConfig
from embscale.models.layers import ShortcutLayer
from embscale.models.mlp import SwiGLU
from embscale.models.model import LanguageModel, ModelOutput, build_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "models" / "configs"


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, layer_type="shortcut", dense_hidden=48,
                n_experts=4, n_zero_experts=2, top_k=2, expert_hidden=16)
    return ModelConfig(**{**base, **changes})


VARIANTS = {
    "standard-mha-moe": dict(layer_type="standard"),
    "standard-gqa-dense": dict(layer_type="standard", n_kv_heads=2, n_experts=0, n_zero_experts=0, top_k=0),
    "standard-mla-moe": dict(layer_type="standard", attention="mla",
                             mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                           v_head_dim=6)),
    "shortcut-mha-moe": dict(),
    "shortcut-mla-moe": dict(attention="mla", n_shared_experts=1,
                             mla=MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                                           qk_rope_head_dim=4, v_head_dim=10)),
    "shortcut-dense": dict(n_experts=0, n_zero_experts=0, top_k=0, tie_embeddings=True),
}


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_shapes_and_causality(changes):
    torch.manual_seed(0)
    model = build_model(tiny(**changes)).double()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, targets=ids)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 12, 97) and out.loss.ndim == 0 and out.aux_loss.ndim == 0
    assert model(ids).loss is None
    # changing token t never changes the logits before t
    for t in (5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t], out.logits[:, :t], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(logits[:, t], out.logits[:, t])


def test_shortcut_layer_wiring():
    """out = h1 + MLP1(Norm(h1)) + MoE(u), h1 = h0 + MLP0(u) + Attn1(Norm(h0 + MLP0(u))), u = Norm(h0)."""
    torch.manual_seed(0)
    cfg = tiny()
    layer = ShortcutLayer(cfg).double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    rope = LanguageModel(cfg).rope(6)
    rope = (rope[0].double(), rope[1].double())
    h = x + layer.attn0(layer.attn0_norm(x), rope)
    u = layer.ffn0_norm(h)
    moe, _ = layer.moe(u)
    h = h + layer.mlp0(u)
    h = h + layer.attn1(layer.attn1_norm(h), rope)
    expected = h + layer.mlp1(layer.mlp1_norm(h)) + moe
    out, aux = layer(x, rope)
    torch.testing.assert_close(out, expected)
    assert aux is None


def test_mlp_without_up_projection_takes_gate_input():
    mlp = SwiGLU(8, 6, has_up=False)
    assert mlp.w_up is None and sum(p.numel() for p in mlp.parameters()) == 2 * 8 * 6
    x, gate = torch.randn(3, 8), torch.randn(3, 6)
    torch.testing.assert_close(mlp(x, gate), mlp.w_down(torch.nn.functional.silu(mlp.w_gate(x)) * gate))
    with pytest.raises(ValueError, match="gate_input"):
        mlp(x)
    with pytest.raises(ValueError, match="gate_input"):
        SwiGLU(8, 6)(x, gate)


@pytest.mark.parametrize("targets", ["first", "second", "both"])
def test_per_layer_embedding_feeds_the_targeted_mlps(targets):
    torch.manual_seed(0)
    model = build_model(tiny(per_layer=PerLayerConfig(kind="ple", targets=targets)))
    wanted = {"first": (0,), "second": (1,), "both": (0, 1)}[targets]
    for layer in model.layers:
        assert [mlp.has_up for mlp in (layer.mlp0, layer.mlp1)] == [i not in wanted for i in (0, 1)]
    assert sorted(model.per_layer.keys()) == sorted(f"{i}_{m}" for i in range(2) for m in wanted)
    ids = torch.randint(0, 97, (2, 8))
    before = model(ids).logits
    with torch.no_grad():
        model.per_layer[f"1_{wanted[0]}"].weight.mul_(3.0)
    assert not torch.allclose(model(ids).logits, before)


def test_embedding_amplification_and_tied_head():
    ids = torch.randint(0, 97, (2, 5))
    plain = build_model(tiny(n_experts=0, n_zero_experts=0, top_k=0, tie_embeddings=True))
    assert plain.lm_head is None
    torch.manual_seed(0)
    x = plain.embed(ids)
    torch.testing.assert_close(x, plain.embed.token(ids))
    scaled = build_model(tiny(embedding_amplification="sqrt_d"))
    torch.testing.assert_close(scaled.embed(ids), scaled.embed.token(ids) * math.sqrt(32))
    count = build_model(tiny(embedding_amplification="sqrt_count"))
    torch.testing.assert_close(count.embed(ids), count.embed.token(ids))  # S = 0: divide by sqrt(1)
    normed = build_model(tiny(embedding_amplification="layernorm")).embed(ids)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    # the tied head reads the token table
    with torch.no_grad():
        plain.embed.token.weight[3].zero_()
    assert torch.all(plain(ids).logits[..., 3] == 0)


def test_output_norms_load_stats_and_bias_updates():
    torch.manual_seed(0)
    model = build_model(tiny())
    ids = torch.randint(0, 97, (2, 8))
    model(ids)
    assert model.output_norms() == {}
    model.record_norms = True
    model(ids)
    norms = model.output_norms()
    names = ("attn0", "mlp0", "attn1", "mlp1", "moe")
    expected = {"embedding"} | {f"layer{i}.{n}" for i in range(2) for n in names}
    assert set(norms) == expected and all(v > 0 for v in norms.values())
    stats = model.load_stats()
    assert set(stats) == {"moe_imbalance", "zero_expert_fraction", "distinct_experts"}
    assert stats["moe_imbalance"] >= 1.0 and 0.0 <= stats["zero_expert_fraction"] <= 1.0
    model.update_router_biases()
    assert any(m.correction_bias.abs().sum() > 0 for m in model.moe_layers())
    dense = build_model(tiny(n_experts=0, n_zero_experts=0, top_k=0))
    dense(ids)
    assert all(math.isnan(v) for v in dense.load_stats().values())


def test_aux_loss_reaches_the_model_output():
    torch.manual_seed(0)
    model = build_model(tiny(aux_loss_coef=0.01))
    out = model(torch.randint(0, 97, (2, 8)))
    assert out.aux_loss.item() > 0 and out.aux_loss.requires_grad


def test_output_projections_are_scaled_at_init():
    torch.manual_seed(0)
    cfg = tiny(d_model=128, dense_hidden=512, n_layers=4)
    model = build_model(cfg)
    layer = model.layers[0]
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers * cfg.attentions_per_layer)
    assert layer.attn0.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert layer.attn0.wo.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert layer.mlp1.w_down.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert layer.moe.w_down.std().item() == pytest.approx(out_std, rel=0.1)


def test_tiny_moe_overfits_one_batch():
    torch.manual_seed(0)
    # the shipped tiny config with a smaller vocabulary, to keep the test quick
    cfg = ModelConfig.from_yaml(CONFIG_DIR / "tiny_moe.yaml").replace(vocab_size=512)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(50):
        out = model(inputs, targets)
        first = first if first is not None else out.loss.item()
        optimizer.zero_grad(set_to_none=True)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        model.update_router_biases()
    final = model(inputs, targets).loss.item()
    assert first == pytest.approx(math.log(cfg.vocab_size), rel=0.05)
    assert final < 0.1 * first, (first, final)
