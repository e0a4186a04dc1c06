"""The memory-aware plan: the per-GPU peak estimate (sweeps/memory.py) against measurements, sharding and the
table optimizer, and ``embscale plan``'s memory columns, shard choice and refusal (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from embscale.base.errors import ConfigError
from embscale.cli import main
from embscale.models.accounting import count_parameters
from embscale.models.config import ModelConfig
from embscale.models.model import build_model
from embscale.sweeps.memory import (
    GIB,
    HEADROOM,
    activation_bytes_per_token,
    estimate_memory,
    fits,
    parse_memory,
    shard_degrees,
    smallest_fitting,
)
from embscale.sweeps.plan import load_plan
from embscale.training.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "sweeps" / "paper_280m.yaml"
CONFIGS = ROOT / "models" / "configs"

# Measured on one NVIDIA H200 (torch.cuda.max_memory_allocated), fp32 parameters, bf16 autocast, fused AdamW,
# micro-batch 4 x 4096 tokens, DDP (no sharding), one training step of the MoE points of sweeps/paper_280m.yaml
# (numbers as given in issue 15 item 5). Each is 16 bytes per parameter plus the 1.0 GiB of bf16 logits the
# trainer holds through the optimizer step: the peak of a first step over one micro-batch is its optimizer step,
# before which no optimizer state existed during a backward.
PAPER_280M_FIRST_STEP_GIB = {8: 34.8, 16: 69.2, 24: 104.1, 30: 130.7}
# BENCHMARKS.md, "Whole-model training steps": one H200, eager (not compiled), micro-batch 16 x 1024 tokens, 4
# micro-batches per step, steady state (after 3 warm-up steps), torch.optim.AdamW(fused=True) over every parameter.
BENCH_STEADY_GIB = {"bench_moe_100m": 15.5, "bench_ne_100m": 15.2, "bench_dense_100m": 9.7}


def _with_adamw_tables(run) -> dict:
    """The run's training section with the N-gram tables trained by AdamW and replicated (the shipped sweep
    trains them with the table optimizer, sharded by rows)."""
    return {k: v for k, v in run.config["training"].items()
            if k not in ("table_optimizer", "table_optimizer_moments", "table_sharding")}


def _paper_moe_runs() -> dict[int, object]:
    plan = load_plan(PAPER).plan
    return {int(run.target_ratio): run for run in plan.runs if run.family == "moe"}


def test_first_step_estimate_is_within_15_percent_of_the_h200_measurements():
    runs = _paper_moe_runs()
    for ratio, measured in PAPER_280M_FIRST_STEP_GIB.items():
        run = runs[ratio]
        cfg = ModelConfig.from_dict(run.config["model"])
        training = TrainingConfig(**run.config["training"])
        estimate = estimate_memory(cfg, run.accounting["groups"], training, gpus=1, shard=1, accumulation=1)
        assert estimate.first_step_peak / GIB == pytest.approx(measured, rel=0.15), ratio
        # steady state holds the optimizer state during every backward: never less than the first step
        assert estimate.peak >= estimate.first_step_peak


def test_steady_state_estimate_is_within_15_percent_of_the_benchmark_steps():
    training = TrainingConfig(steps=10, batch_tokens=65536, micro_batch_size=16, seq_len=1024)
    for name, measured in BENCH_STEADY_GIB.items():
        cfg = ModelConfig.from_yaml(CONFIGS / f"{name}.yaml")
        estimate = estimate_memory(cfg, count_parameters(cfg).groups, training, gpus=1, shard=1)
        assert estimate.accumulation == 4
        assert estimate.peak / GIB == pytest.approx(measured, rel=0.15), name


def _saved_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward under bf16 autocast (CPU)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids[:, :-1], ids[:, 1:])
    return sum(saved.values())


@pytest.mark.parametrize("extra", [
    {"layer_type": "shortcut"},
    {"layer_type": "shortcut", "n_experts": 16, "n_zero_experts": 8, "expert_hidden": 64, "top_k": 4},
    {"layer_type": "standard", "n_experts": 16, "expert_hidden": 64, "top_k": 4},
    {"layer_type": "standard", "ngram": {"n": 3, "k": 2, "ratio": 2.0, "amplification": "layernorm"}},
    {"layer_type": "shortcut",
     "per_layer": {"kind": "plne", "targets": "both", "ngram": {"n": 3, "k": 2, "ratio": 2.0}}},
    {"layer_type": "standard", "per_layer": {"kind": "ple"}},
    {"layer_type": "shortcut", "attention": "mla",
     "mla": {"q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32}},
])
def test_activation_model_matches_what_autograd_saves(extra):
    """The per-token activation bytes plus the bf16 weight copies against the tensors autograd really saves in a
    small model's forward on the CPU, where two things differ from CUDA, and are added here: RMSNorm is not fused
    (it also saves its fp32 normalised output) and the cross-entropy runs on an fp32 copy of the logits (it saves
    the fp32 log-softmax where CUDA's fused kernel saves the bf16 logits). MLA with equal query-key and value head
    widths only: unequal ones send the CPU's SDPA to its math kernel, which saves the T x T matrix (CUDA's
    kernels do not)."""
    cfg = ModelConfig.from_dict({"vocab_size": 512, "d_model": 128, "n_layers": 2, "n_heads": 4, "attention": "mha",
                                 "dense_hidden": 256, "max_seq_len": 256, **extra})
    batch, seq_len = 2, 128
    tokens = batch * seq_len
    training = TrainingConfig(steps=1, batch_tokens=tokens, micro_batch_size=batch, seq_len=seq_len)
    estimate = estimate_memory(cfg, count_parameters(cfg).groups, training)
    logits = 2 * tokens * cfg.vocab_size  # bf16: the gradient (transient, not saved) and the logits CUDA saves
    norms = cfg.d_model * (cfg.n_layers * (4 if cfg.layer_type == "shortcut" else 2) + 1)
    if cfg.attention == "mla":  # the latent's and the query's inner norms
        norms += cfg.n_layers * cfg.attentions_per_layer * (cfg.mla.kv_lora_rank + cfg.mla.q_lora_rank)
    cpu_only = tokens * (4 * norms + 4 * cfg.vocab_size)
    predicted = estimate.activations - 2 * logits + cpu_only + estimate.weight_copies
    assert predicted == pytest.approx(_saved_bytes(cfg, batch, seq_len), rel=0.05)
    assert estimate.activations == tokens * activation_bytes_per_token(cfg)


def test_sharding_divides_all_but_the_replicated_ngram_tables():
    plan = load_plan(PAPER).plan
    run = max((r for r in plan.runs if r.family == "ne"), key=lambda r: r.total)
    cfg = ModelConfig.from_dict(run.config["model"])
    groups = run.accounting["groups"]
    training = TrainingConfig(**_with_adamw_tables(run))
    tables = groups["ngram_tables"]
    one, eight = (estimate_memory(cfg, groups, training, gpus=8, shard=s) for s in (1, 8))
    assert eight.peak < one.peak
    # parameters: tables whole on every GPU, the rest an eighth
    assert eight.parameters == pytest.approx(4 * tables + 4 * (run.total - tables) / 8)
    assert eight.replicated_tables == one.replicated_tables == pytest.approx(16 * tables)  # AdamW: 4 + 4 + 8
    assert one.buckets == pytest.approx(4 * run.total) and eight.buckets == 0  # DDP's gradient buckets
    with pytest.raises(ConfigError):
        estimate_memory(cfg, groups, training, gpus=8, shard=3)


def test_table_optimizer_has_no_table_sized_gradient_and_compact_moments_are_smaller():
    plan = load_plan(PAPER).plan
    run = max((r for r in plan.runs if r.family == "ne"), key=lambda r: r.total)
    cfg = ModelConfig.from_dict(run.config["model"])
    groups, tables = run.accounting["groups"], run.accounting["groups"]["ngram_tables"]
    base = _with_adamw_tables(run)
    adamw, full, compact = (
        estimate_memory(cfg, groups, TrainingConfig(**base, **options), gpus=8, shard=8)
        for options in ({}, {"table_optimizer": "dense"},
                        {"table_optimizer": "dense", "table_optimizer_moments": "compact"}))
    assert adamw.gradients - full.gradients > 0.95 * 4 * tables  # only row gradients remain (~0.5 GB here)
    assert adamw.optimizer == pytest.approx(full.optimizer)  # fp32 moments either way
    assert full.optimizer - compact.optimizer == pytest.approx(6 * tables, rel=0.01)  # 8 -> 2 bytes per element
    assert compact.peak < full.peak < adamw.peak


def test_row_sharded_tables_divide_their_parameters_and_state_by_the_shard_degree():
    """``training.table_sharding: rows``: each GPU holds 1/s of the tables and of the table optimizer's state;
    the row gradients (per lookup) and everything else are unchanged."""
    plan = load_plan(PAPER).plan
    run = max((r for r in plan.runs if r.family == "ne"), key=lambda r: r.total)
    cfg = ModelConfig.from_dict(run.config["model"])
    groups, tables = run.accounting["groups"], run.accounting["groups"]["ngram_tables"]
    base = {**_with_adamw_tables(run), "parallel": "fsdp", "table_optimizer": "dense"}
    replicated, rows = (estimate_memory(cfg, groups, TrainingConfig(**base, table_sharding=sharding), gpus=8, shard=8)
                        for sharding in ("replicate", "rows"))
    assert replicated.parameters - rows.parameters == pytest.approx(4 * tables * 7 / 8)
    assert replicated.optimizer - rows.optimizer == pytest.approx(8 * tables * 7 / 8)  # two fp32 moments
    assert replicated.gradients == rows.gradients and replicated.activations == rows.activations
    one = estimate_memory(cfg, groups, TrainingConfig(**base, table_sharding="rows"), gpus=8, shard=1)
    assert one.parameters == pytest.approx(4 * run.total)  # shard 1 (one GPU per copy): whole tables


def test_smallest_fitting_shard_is_the_smallest():
    runs = _paper_moe_runs()
    run = runs[30]
    cfg = ModelConfig.from_dict(run.config["model"])
    training = TrainingConfig(**run.config["training"])
    groups = run.accounting["groups"]
    memory = 141 * GIB
    chosen = smallest_fitting(cfg, groups, training, 8, memory)
    assert chosen is not None and fits(chosen, memory) and chosen.peak + HEADROOM <= memory
    for smaller in shard_degrees(8):
        if smaller < chosen.shard:
            assert not fits(estimate_memory(cfg, groups, training, 8, smaller), memory)
    assert smallest_fitting(cfg, groups, training, 1, 24 * GIB) is None
    assert shard_degrees(8) == [1, 2, 4, 8] and shard_degrees(6) == [1, 2] and shard_degrees(1) == [1]


def test_parse_memory_units_and_errors():
    assert parse_memory("80GiB", "--gpu-memory") == 80 * GIB
    assert parse_memory("141 gib", "x") == 141 * GIB
    assert parse_memory("80GB", "x") == 80 * 10**9
    assert parse_memory("24576MiB", "x") == 24 * GIB
    for bad in ("80", "lots", "-3GiB", "0GiB", "80 GiBs", True, None):
        with pytest.raises(ConfigError) as info:
            parse_memory(bad, "--gpu-memory")
        assert info.value.field == "--gpu-memory"


# ----- the command -------------------------------------------------------------------------------------------
def test_plan_shows_memory_and_shard_for_every_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(PAPER), "--gpu-memory", "200GiB", "--gpus-per-node", "8", "--shard", "auto"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("id "))
    assert header.split()[-3:] == ["GPUs", "shard", "mem/GPU"]
    runs = load_plan(PAPER).plan.runs
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in {r.run_id for r in runs}]
    assert len(rows) == len(runs)
    assert all(row.split()[-4] == "8" and row.endswith("GiB") for row in rows)
    assert "N-gram tables, which stay replicated" in out and "200.0 GiB per GPU (--gpu-memory)" in out
    assert list(tmp_path.iterdir()) == []  # writes nothing

    assert main(["plan", str(PAPER), "--gpu-memory", "200GiB", "--gpus-per-node", "8", "--shard", "auto",
                 "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["memory_limits"]["gpus"] == 8 and document["memory_limits"]["shard"] == "auto"
    shards = {entry["run_id"]: entry["memory"]["shard"] for entry in document["runs"]}
    assert all(entry["memory"]["fits"] and entry["memory"]["peak"] <= 200 * GIB for entry in document["runs"])
    assert min(shards.values()) == 1 and max(shards.values()) > 1  # small runs stay DDP, large ones shard


def test_plan_refuses_runs_that_cannot_fit_naming_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(PAPER), "--gpu-memory", "24GiB", "--gpus-per-node", "1", "--nodes", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    runs = load_plan(PAPER).plan.runs
    assert f"{len(runs)} of {len(runs)} run(s) do not fit in 24.0 GiB per GPU (--gpu-memory) on 1 GPU(s)" \
        in captured.err
    for run in runs:
        assert run.run_id in captured.err
    assert list(tmp_path.iterdir()) == []

    # under DDP (shard 1) the runs that fit only sharded are refused with the shard that would fit
    sweep = yaml.safe_load(PAPER.read_text())
    sweep["training"] = {**_with_adamw_tables(runs[0]), "parallel": "ddp"}
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text(yaml.safe_dump(sweep))
    assert main(["plan", str(ddp), "--gpu-memory", "141GiB", "--gpus-per-node", "8"]) == 2
    err = capsys.readouterr().err
    assert "fits at shard 2 (--shard 2 or --shard auto)" in err
    smallest = min(load_plan(ddp).plan.runs, key=lambda r: r.total)
    assert smallest.run_id not in err  # the smallest MoE fits on one GPU
    ddp.unlink()


def test_every_paper_point_fits_a_node_of_141gib_gpus_as_shipped(capsys):
    """The shipped sweep shards each run over its node's GPUs (fsdp) and the N-gram tables by rows: on one node
    of 8 H200s every point fits, the largest NE's tables an eighth each."""
    assert main(["plan", str(PAPER), "--gpu-memory", "141GiB", "--gpus-per-node", "8", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    runs = document["runs"]
    assert len(runs) == len(load_plan(PAPER).plan.runs) == 20
    assert all(entry["memory"]["fits"] and entry["memory"]["shard"] == 8 for entry in runs)
    assert max(entry["memory"]["peak"] for entry in runs) < 141 * GIB - 2 * GIB


def test_gpu_memory_from_the_sweep_and_bad_values(tmp_path, capsys):
    sweep = yaml.safe_load(PAPER.read_text())
    sweep["slurm"] = {"gpus_per_node": 1, "gpu_memory": "24GiB"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["plan", str(path)]) == 2
    assert "24.0 GiB per GPU (slurm.gpu_memory) on 1 GPU(s)" in capsys.readouterr().err
    # the command line wins over the sweep
    assert main(["plan", str(path), "--gpu-memory", "1TiB", "--gpus-per-node", "8", "--shard", "auto"]) == 0
    capsys.readouterr()

    sweep["slurm"]["gpu_memory"] = "a lot"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["plan", str(path)]) == 2
    assert "slurm.gpu_memory" in capsys.readouterr().err
    sweep["slurm"] = {"gpus_per_node": 8}
    sweep["executor"] = {"type": "local", "gpu_memory": 80}
    path.write_text(yaml.safe_dump(sweep))
    assert main(["plan", str(path)]) == 2
    assert "executor.gpu_memory" in capsys.readouterr().err
    for flags, named in ((["--gpu-memory", "80"], "--gpu-memory"), (["--gpus-per-node", "0"], "--gpus-per-node"),
                         (["--gpus-per-node", "8", "--shard", "3"], "--shard")):
        assert main(["plan", str(PAPER), *flags]) == 2
        assert named in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's GPU gives the memory")
def test_memory_not_checked_without_a_source(capsys):
    assert main(["plan", str(PAPER)]) == 0
    out = capsys.readouterr().out
    assert "memory is not checked" in out and "mem/GPU" in out


def test_shard_from_the_sweeps_training_parallel():
    """``training.parallel`` (auto, fsdp, hsdp, ddp) picks the shard degree when --shard is not given; the
    command line wins."""
    import dataclasses

    from embscale.sweeps.plan import memory_limits

    sweep = load_plan(PAPER).sweep
    for parallel, shard in (("auto", "auto"), ("fsdp", 16), ("hsdp", 8), ("ddp", 1)):
        given = dataclasses.replace(sweep, training={**sweep.training, "parallel": parallel})
        assert memory_limits(given, "80GiB", 8, 2).shard == shard
        assert memory_limits(given, "80GiB", 8, 2, shard="2").shard == 2
    assert memory_limits(sweep, "80GiB", 8, 2).shard == 16  # the shipped sweep: fsdp over all its GPUs
    for parallel, shard in (("fsdp", 4), ("hsdp", 4)):  # training.shard_degree, as the trainer reads it
        given = dataclasses.replace(sweep, training={**sweep.training, "parallel": parallel, "shard_degree": 4})
        assert memory_limits(given, "80GiB", 8, 2).shard == shard


@pytest.mark.parametrize("extra", [
    {"ngram": {"n": 3, "k": 2, "ratio": 2.0}},
    {"per_layer": {"kind": "plne", "ngram": {"n": 3, "k": 2, "ratio": 2.0}}},
])
def test_ngram_tables_are_the_models(extra):
    """The elements the table optimizer trains (and FSDP leaves replicated) are the model's ``ngram_tables()``."""
    from embscale.sweeps.memory import _ngram_tables

    cfg = ModelConfig.from_dict({"vocab_size": 512, "d_model": 128, "n_layers": 2, "n_heads": 4, "attention": "mha",
                                 "dense_hidden": 256, "max_seq_len": 256, **extra})
    elements, width, lookups = _ngram_tables(cfg, count_parameters(cfg).groups)
    tables = build_model(cfg).ngram_tables()
    assert elements == sum(table.numel() for table in tables)
    assert {table.shape[1] for table in tables} == {width}
    assert lookups == len(tables) * 4  # one lookup per sub-table per token, (n - 1) k = 4 sub-tables each


def test_section_keys_tell_config_sections_apart_as_their_json_does() -> None:
    """The plan builds each distinct training and data section once, keyed without encoding JSON for every run:
    equal sections share a key, sections JSON tells apart (1 and 1.0, nested values) do not, and a section with
    values other than plain data falls back to its JSON."""
    from embscale.sweeps.plan import _section_key

    training = {"tokens": 1_000_000, "lr": 1e-3, "schedule": "wsd", "eval_tokens": None}
    data = {"corpus": "builtin", "val_paths": {"en": "a.jsonl", "zh": ["b.jsonl", "c.jsonl"]}}
    assert _section_key(training) == _section_key(dict(training))
    assert _section_key(data) == _section_key({"corpus": "builtin",
                                               "val_paths": {"en": "a.jsonl", "zh": ["b.jsonl", "c.jsonl"]}})
    assert _section_key({**training, "lr": 1}) != _section_key({**training, "lr": 1.0})
    assert _section_key({**training, "seed": True}) != _section_key({**training, "seed": 1})
    assert _section_key(data) != _section_key({**data, "val_paths": {"en": "a.jsonl", "zh": ["b.jsonl"]}})
    odd = {"corpus": "builtin", "shape": (1, 2)}
    assert _section_key(odd) == '{"corpus": "builtin", "shape": [1, 2]}'
    assert isinstance(hash(_section_key(training)), int) and isinstance(hash(_section_key(data)), int)
