"""Per-Layer Embedding (PLE) and Per-Layer N-gram Embedding (PLNE): slots, shapes, gradients, accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import train_briefly

from embscale.base.errors import ConfigError
from embscale.models.config import ModelConfig, NgramConfig, PerLayerConfig
from embscale.models.ngram import NgramEmbedding, table_moduli
from embscale.models.per_layer import build_per_layer_embeddings, per_layer_parameter_counts, per_layer_slots

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 1
VOCAB = 40
HIDDEN = 48




def make_cfg(kind: str = "ple", targets: str = "first", layer_type: str = "shortcut",
             amplification: str = "none") -> ModelConfig:
    ngram = NgramConfig(n=3, k=2, ratio=2.5, amplification=amplification) if kind == "plne" else None
    moe = {"n_experts": 4, "n_zero_experts": 2, "expert_hidden": 16, "top_k": 2}
    if layer_type != "shortcut":
        moe = {}
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, layer_type=layer_type,
                       dense_hidden=HIDDEN, eos_token_id=EOS, max_seq_len=64,
                       per_layer=PerLayerConfig(kind=kind, targets=targets, ngram=ngram), **moe)


@pytest.mark.parametrize("targets,keys", [
    ("first", ["0_0", "1_0", "2_0"]),
    ("second", ["0_1", "1_1", "2_1"]),
    ("both", ["0_0", "0_1", "1_0", "1_1", "2_0", "2_1"]),
])
def test_slots_follow_targets(targets, keys):
    for kind in ("ple", "plne"):
        modules = build_per_layer_embeddings(make_cfg(kind, targets))
        assert sorted(modules.keys()) == keys
    assert [f"{layer}_{mlp}" for layer, mlp in per_layer_slots(make_cfg("ple", targets))] == keys


def test_standard_dense_layer_has_only_mlp_zero():
    modules = build_per_layer_embeddings(make_cfg("ple", "first", "standard"))
    assert list(modules.keys()) == ["0_0", "1_0", "2_0"]
    for targets in ("second", "both"):
        with pytest.raises(ConfigError, match="per_layer.targets"):
            build_per_layer_embeddings(make_cfg("ple", targets, "standard"))
        with pytest.raises(ConfigError, match="per_layer.targets"):
            per_layer_parameter_counts(make_cfg("ple", targets, "standard"))


def test_no_per_layer_embedding():
    cfg = make_cfg().replace(per_layer=None)
    assert len(build_per_layer_embeddings(cfg)) == 0
    assert per_layer_parameter_counts(cfg) == {"tables": 0, "projections": 0, "norm": 0}


@pytest.mark.parametrize("kind", ["ple", "plne"])
def test_output_shapes_and_gradients_reach_the_touched_rows(kind):
    torch.manual_seed(0)
    modules = build_per_layer_embeddings(make_cfg(kind, "both"))
    ids = torch.tensor([[5, 6, 7, EOS, 8, 9, 10], [11, 12, 13, 14, 15, EOS, 16]])
    loss = 0.0
    for module in modules.values():
        out = module(ids)
        assert out.shape == (2, 7, HIDDEN)
        loss = loss + (out * torch.randn_like(out)).sum()
    loss.backward()
    for key, module in modules.items():
        if kind == "ple":
            assert isinstance(module, nn.Embedding) and module.weight.shape == (VOCAB, HIDDEN)
            lookups = [(module.weight, ids.flatten())]
        else:
            assert isinstance(module, NgramEmbedding) and module.width == HIDDEN
            lookups = [(module.token.weight, ids.flatten()),
                       (module.tables.weight, module.row_ids(ids).flatten())]
            assert module.projection.weight.grad.abs().sum() > 0
        for weight, rows in lookups:
            touched = torch.zeros(weight.shape[0], dtype=torch.bool)
            touched[rows] = True
            row_grad = weight.grad.abs().sum(-1)
            assert bool((row_grad[touched] > 0).all()), key
            assert bool((row_grad[~touched] == 0).all()), key


@pytest.mark.parametrize("kind,targets,amplification", [
    ("ple", "first", "none"), ("ple", "both", "none"),
    ("plne", "second", "none"), ("plne", "both", "layernorm"),
])
def test_counts_match_numel(kind, targets, amplification):
    cfg = make_cfg(kind, targets, amplification=amplification)
    modules = build_per_layer_embeddings(cfg)
    counts = per_layer_parameter_counts(cfg)
    numel = {"tables": 0, "projections": 0, "norm": 0}
    for module in modules.values():
        for name, p in module.named_parameters():
            group = "tables"
            if name.startswith(("projection", "norm")):
                group = "projections" if name.startswith("projection") else "norm"
            numel[group] += p.numel()
    assert counts == numel
    slots = len(per_layer_slots(cfg))
    if kind == "ple":
        assert counts["tables"] == slots * VOCAB * HIDDEN
    else:
        assert counts["projections"] == slots * (HIDDEN // 6) * 6 * HIDDEN
        assert counts["norm"] == (slots * 2 * HIDDEN if amplification == "layernorm" else 0)


def test_meta_device_builds_large_tables_without_memory():
    cfg = ModelConfig(vocab_size=131072, d_model=3072, n_layers=14, n_heads=32, layer_type="shortcut",
                      dense_hidden=6144, n_experts=8, expert_hidden=64, top_k=2,
                      per_layer=PerLayerConfig(kind="plne", targets="both",
                                               ngram=NgramConfig(n=4, k=4, ratio=10)))
    modules = build_per_layer_embeddings(cfg, device="meta")
    counts = per_layer_parameter_counts(cfg)
    assert len(modules) == 28
    assert sum(counts.values()) == sum(p.numel() for p in modules.parameters())
    rows = sum(table_moduli(cfg.per_layer.ngram, 131072))
    assert counts["tables"] == 28 * (131072 * 6144 + rows * 512)


# ----- with the backbone -----

@pytest.mark.parametrize("kind", ["ple", "plne"])
def test_model_with_per_layer_embedding_trains(kind):
    from embscale.models.model import build_model

    cfg = make_cfg(kind, "both")
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(2, VOCAB, (4, 33), generator=torch.Generator().manual_seed(1))
    ids[:, 10] = EOS
    losses = train_briefly(model, ids)
    assert losses[-1] < 0.7 * losses[0], losses
    # one per-layer embedding per slot, and training moved its rows
    if kind == "ple":
        tables = [m.weight for m in model.modules()
                  if isinstance(m, nn.Embedding) and m.weight.shape == (VOCAB, HIDDEN)]
    else:
        tables = [m.tables.weight for m in model.modules()
                  if isinstance(m, NgramEmbedding) and m.width == HIDDEN]
    assert len(tables) == len(per_layer_slots(cfg))
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables)
