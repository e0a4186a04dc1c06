"""ModelConfig validation: every invalid value raises ConfigError naming its field; YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from embscale.base.errors import ConfigError
from embscale.models.config import MLAConfig, ModelConfig, NgramConfig, PerLayerConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "models" / "configs"

BASE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, layer_type="shortcut", dense_hidden=96,
            n_experts=8, n_zero_experts=4, top_k=2, expert_hidden=32)


def make(**changes) -> ModelConfig:
    return ModelConfig(**{**BASE, **changes})


def test_base_is_valid():
    cfg = make()
    assert cfg.n_router_outputs == 12 and cfg.dense_mlps_per_layer == 2 and cfg.attentions_per_layer == 2


@pytest.mark.parametrize("changes, field", [
    (dict(n_heads=5), "n_heads"),                         # heads do not divide the width
    (dict(d_model=60, n_heads=20), "n_heads"),             # odd head dimension (rotary pairs)
    (dict(n_kv_heads=3), "n_kv_heads"),                   # kv heads do not divide heads
    (dict(n_kv_heads=0), "n_kv_heads"),
    (dict(top_k=13), "top_k"),                            # above n_experts + n_zero_experts
    (dict(top_k=0), "top_k"),
    (dict(n_experts=0, n_zero_experts=0, top_k=2), "top_k"),
    (dict(n_experts=0, top_k=0), "n_zero_experts"),
    (dict(vocab_size=1), "vocab_size"),
    (dict(d_model=0), "d_model"),
    (dict(n_layers=0), "n_layers"),
    (dict(n_heads=0), "n_heads"),
    (dict(n_heads=-4), "n_heads"),
    (dict(dense_hidden=0), "dense_hidden"),               # a shortcut layer needs its dense MLPs
    (dict(expert_hidden=0), "expert_hidden"),
    (dict(n_experts=-1), "n_experts"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(router_bias_update_rate=-1e-3), "router_bias_update_rate"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(init_std=0.0), "init_std"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(eos_token_id=256), "eos_token_id"),
    (dict(layer_type="parallel"), "layer_type"),
    (dict(attention="linear"), "attention"),
    (dict(embedding_amplification="loud"), "embedding_amplification"),
    (dict(mla=MLAConfig()), "mla"),                       # mla section with attention: mha
    (dict(attention="mla", n_kv_heads=2), "n_kv_heads"),
    (dict(ngram=NgramConfig(n=3, k=5)), "ngram.k"),       # 64 / 10 sub-table width
    (dict(ngram=NgramConfig(n=3, k=2), embedding_amplification="sqrt_d"), "embedding_amplification"),
    (dict(layer_type="standard", n_experts=0, n_zero_experts=0, top_k=0,
          per_layer=PerLayerConfig(targets="second")), "per_layer.targets"),
    (dict(layer_type="standard", per_layer=PerLayerConfig()), "per_layer"),  # MoE standard: no dense MLP
])
def test_invalid_values_name_their_field(changes, field):
    with pytest.raises(ConfigError) as info:
        make(**changes)
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize("section, field", [
    (dict(mla=dict(kv_lora_rank=0)), "mla.kv_lora_rank"),
    (dict(mla=dict(qk_rope_head_dim=15)), "mla.qk_rope_head_dim"),
    (dict(mla=dict(q_lora_rank=-1)), "mla.q_lora_rank"),
    (dict(mla=dict(v_head_dim=0)), "mla.v_head_dim"),
    (dict(mla=dict(rank=3)), "mla.rank"),
])
def test_nested_errors_use_dotted_paths(section, field):
    data = {**BASE, "attention": "mla", **section}
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    assert info.value.field == field


@pytest.mark.parametrize("data, field", [
    ({**BASE, "d_modle": 64}, "d_modle"),                 # unknown key
    ({**BASE, "d_model": "64"}, "d_model"),              # wrong type
    ({**BASE, "d_model": 64.0}, "d_model"),
    ({**BASE, "tie_embeddings": 1}, "tie_embeddings"),
    ({**BASE, "layer_type": 3}, "layer_type"),
    ({k: v for k, v in BASE.items() if k != "d_model"}, "d_model"),  # required
])
def test_from_dict_rejects_unknown_keys_and_wrong_types(data, field):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    assert info.value.field == field


def test_replace_validates_again():
    with pytest.raises(ConfigError, match="top_k"):
        make().replace(top_k=100)


def test_per_layer_mlp_indices():
    assert make().per_layer_mlp_indices == ()
    assert make(per_layer=PerLayerConfig(targets="second")).per_layer_mlp_indices == (1,)
    assert make(per_layer=PerLayerConfig(targets="both")).per_layer_mlp_indices == (0, 1)


@pytest.mark.parametrize("cfg", [
    make(),
    make(attention="mla", mla=MLAConfig(q_lora_rank=32), tie_embeddings=True, n_shared_experts=1),
    make(ngram=NgramConfig(n=3, k=2, ratio=2.5, sizing="prime", amplification="layernorm"),
         per_layer=PerLayerConfig(kind="plne", targets="both", ngram=NgramConfig(n=2, k=2))),
], ids=["moe", "mla", "ngram"])
def test_yaml_round_trip(cfg, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert ModelConfig.from_yaml(path) == cfg
    wrapped = tmp_path / "run.yaml"
    wrapped.write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    assert ModelConfig.from_yaml(wrapped) == cfg


def test_from_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "top_k": 99}))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_yaml(bad)
    assert "bad.yaml" in info.value.field and "top_k" in info.value.field


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = ModelConfig.from_yaml(path)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
