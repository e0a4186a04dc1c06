"""Analytic accounting against instantiated models: totals, groups, activated counts, the CLI."""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embscale import cli
from embscale.models.accounting import GROUPS, count_parameters, parameter_group
from embscale.models.config import MLAConfig, ModelConfig, NgramConfig, PerLayerConfig
from embscale.models.model import build_model
from embscale.models.moe import MoE

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "models" / "configs"


def random_config(rng: random.Random) -> ModelConfig:
    layer_type = rng.choice(["standard", "shortcut"])
    attention = rng.choice(["mha", "mla"])
    n_heads = rng.choice([2, 4, 8])
    d_model = n_heads * rng.choice([8, 16, 32])
    kw: dict = dict(vocab_size=rng.randint(50, 3000), d_model=d_model, n_layers=rng.randint(1, 4),
                    n_heads=n_heads, layer_type=layer_type, attention=attention,
                    tie_embeddings=rng.random() < 0.4,
                    embedding_amplification=rng.choice(["none", "sqrt_d", "layernorm", "sqrt_count"]))
    if attention == "mha":
        kw["n_kv_heads"] = rng.choice([None, n_heads // 2, 1])
    else:
        kw["mla"] = MLAConfig(q_lora_rank=rng.choice([0, 16, 48]), kv_lora_rank=rng.choice([8, 32]),
                              qk_nope_head_dim=rng.choice([8, 16]), qk_rope_head_dim=rng.choice([4, 8]),
                              v_head_dim=rng.choice([8, 12]))
    moe = rng.random() < 0.7
    if moe:
        n_experts = rng.randint(1, 12)
        n_zero = rng.choice([0, 0, 1, 4])
        kw.update(n_experts=n_experts, n_zero_experts=n_zero, top_k=rng.randint(1, n_experts + n_zero),
                  expert_hidden=rng.choice([8, 24]), n_shared_experts=rng.choice([0, 0, 1, 2]))
    if layer_type == "shortcut" or not moe:
        kw["dense_hidden"] = rng.choice([16, 40, 64])
    return ModelConfig(**kw)


def numel_by_group(model: torch.nn.Module) -> collections.Counter:
    groups: collections.Counter = collections.Counter()
    for name, p in model.named_parameters():
        groups[parameter_group(name)] += p.numel()
    return groups


def assert_counts_match(cfg: ModelConfig) -> None:
    acc = count_parameters(cfg)
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == acc.total
    measured = numel_by_group(model)
    assert set(measured) <= set(GROUPS)
    assert {g: measured[g] for g in GROUPS} == acc.groups


@pytest.mark.parametrize("seed", range(24))
def test_random_configs_match_instantiated_counts(seed):
    assert_counts_match(random_config(random.Random(seed)))


@pytest.mark.parametrize("changes", [
    dict(ngram=NgramConfig(n=3, k=2, ratio=1.5)),
    dict(ngram=NgramConfig(n=3, k=4, ratio=2.0, sizing="prime", amplification="layernorm"),
         tie_embeddings=True),
    dict(per_layer=PerLayerConfig(kind="ple", targets="both")),
    dict(per_layer=PerLayerConfig(kind="plne", targets="second", ngram=NgramConfig(n=3, k=2, ratio=1.0,
                                                                                  amplification="layernorm")),
         ngram=NgramConfig(n=2, k=4, ratio=0.5)),
    dict(layer_type="standard", n_experts=0, n_zero_experts=0, top_k=0,
         per_layer=PerLayerConfig(kind="ple", targets="first")),
], ids=["ngram", "ngram-layernorm-tied", "ple-both", "plne-second-with-ngram", "ple-standard-dense"])
def test_embedding_scaling_configs_match_instantiated_counts(changes):
    base = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, layer_type="shortcut", dense_hidden=48,
                n_experts=4, n_zero_experts=2, top_k=2, expert_hidden=16)
    cfg = ModelConfig(**{**base, **changes})
    assert_counts_match(cfg)
    acc = count_parameters(cfg)
    ne = sum(acc.groups[g] for g in ("ngram_tables", "ngram_projections", "per_layer_tables",
                                     "per_layer_projections"))
    assert ne > 0 and acc.ne_share == pytest.approx(ne / acc.total)


# ----- activated parameters: exactly those that receive a gradient under forced routing -----
def force_routing(model, experts_of_layer) -> None:
    for moe in model.moe_layers():
        with torch.no_grad():
            moe.correction_bias.zero_()
            moe.correction_bias[experts_of_layer(moe)] = 10.0


def touched_parameters(model) -> int:
    """Elements with a nonzero gradient after one backward, except the input embedding's looked-up rows."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, 3))
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    touched = 0
    for name, p in model.named_parameters():
        if name == "embed.token.weight" and model.lm_head is not None:
            continue  # a lookup table; when tied it is the LM head and counts in full
        if p.grad is not None:
            touched += int((p.grad != 0).sum())
    return touched


ACTIVATED_CASES = {
    "shortcut-mla-zero-shared": dict(attention="mla", mla=MLAConfig(q_lora_rank=16, kv_lora_rank=16,
                                                                      qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                                      v_head_dim=8),
                                     n_shared_experts=1),
    "standard-mha-zero-tied": dict(layer_type="standard", tie_embeddings=True,
                                   embedding_amplification="layernorm"),
    "shortcut-mha-no-zero": dict(n_zero_experts=0, n_kv_heads=2),
    "shortcut-more-slots-than-zero": dict(n_experts=5, n_zero_experts=1, top_k=3),
}


@pytest.mark.parametrize("changes", ACTIVATED_CASES.values(), ids=ACTIVATED_CASES.keys())
def test_activated_counts_equal_touched_parameters(changes):
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, layer_type="shortcut", dense_hidden=40,
                n_experts=6, n_zero_experts=3, top_k=2, expert_hidden=16, aux_loss_coef=0.0)
    cfg = ModelConfig(**{**base, **changes})
    acc = count_parameters(cfg)
    k, e = cfg.top_k, cfg.n_experts

    torch.manual_seed(0)
    model = build_model(cfg).double()
    force_routing(model, lambda moe: list(range(min(k, e))) + list(range(e, e + k - min(k, e))))
    assert touched_parameters(model) == acc.activated_max

    model.zero_grad(set_to_none=True)
    force_routing(model, lambda moe: list(range(e, e + min(k, cfg.n_zero_experts)))
                  + list(range(k - min(k, cfg.n_zero_experts))))
    assert touched_parameters(model) == acc.activated_min
    assert acc.activated_min <= acc.activated <= acc.activated_max


def test_expected_activated_and_flops():
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=3, n_heads=4, layer_type="standard",
                      n_experts=6, n_zero_experts=2, top_k=4, expert_hidden=16)
    acc = count_parameters(cfg)
    per_expert = 3 * 64 * 16
    # min 4 - 2 = 2 real experts, expected 4 * 6/8 = 3, max 4
    assert acc.activated_max - acc.activated_min == 3 * 2 * per_expert  # 4 real vs 2 real, 3 layers
    assert acc.activated - acc.activated_min == 3 * 1 * per_expert  # 3 real vs 2 real
    # torchtitan: 6 N + 12 L H d T for standard attention
    assert acc.flops_per_token(128) == 6 * (acc.activated - acc.groups["norms"]) + 12 * 3 * 4 * 16 * 128
    odd = count_parameters(cfg.replace(n_zero_experts=1))  # 4 * 6/7 real experts: not whole
    assert isinstance(odd.activated, float)
    assert odd.activated == pytest.approx(odd.activated_min + 3 * (24 / 7 - 3) * per_expert)
    assert acc.ratio == acc.total / acc.activated
    d = acc.to_dict(seq_len=128)
    assert d["groups"] == acc.groups and d["flops_per_token"] == acc.flops_per_token(128)


def test_released_model_numbers():
    """LongCat-Flash-Lite: 68.5B total, 31.4B of it NE, 2.9B-4.5B activated (BRIEF sections 1 and 3)."""
    acc = count_parameters(ModelConfig.from_yaml(CONFIG_DIR / "longcat_flash_lite.yaml"))
    assert round(acc.total / 1e9, 1) == 68.6 or round(acc.total / 1e9, 1) == 68.5
    assert round((acc.groups["ngram_tables"] + acc.groups["ngram_projections"]) / 1e9, 1) == 31.4
    assert round(acc.activated_min / 1e9, 1) == 2.9 and round(acc.activated_max / 1e9, 1) == 4.5
    assert acc.ne_share == pytest.approx(0.46, abs=0.005)


# ----- the CLI -----
def test_params_cli_agrees_with_meta_instantiation(capsys):
    path = CONFIG_DIR / "shortcut_1p3b.yaml"
    assert cli.main(["params", str(path), "--json", "--seq-len", "2048"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = build_model(ModelConfig.from_yaml(path), device="meta")
    assert report["total"] == sum(p.numel() for p in model.parameters())
    measured = numel_by_group(model)
    assert report["groups"] == {g: measured[g] for g in GROUPS}
    assert report["seq_len"] == 2048 and 1.2e9 < report["activated"] < 1.4e9
    assert any(isinstance(m, MoE) for m in model.modules())

    assert cli.main(["params", str(path)]) == 0
    table = capsys.readouterr().out
    assert "5.81B" in table and f"{report['total']:,}" in table and "FLOPs/token" in table


def test_params_cli_errors(tmp_path, capsys):
    assert cli.main(["params", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "tiny_moe.yaml").read_text().replace("top_k: 2", "top_k: 20"))
    assert cli.main(["params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "top_k" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["params", str(CONFIG_DIR / "tiny_moe.yaml"), "--seq-len", "0"])
    assert info.value.code == 2


@pytest.mark.parametrize(("config", "activated"), [("bench_moe_100m.yaml", 112_505_856),
                                                    ("bench_ne_100m.yaml", 113_406_976)])
def test_accounting_does_not_import_torch(config, activated):
    code = ("import sys; from embscale.cli import main; "
            f"main(['params', 'models/configs/{config}', '--json']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["activated"] == activated
