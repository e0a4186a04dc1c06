"""``embscale decode-bench`` on a pair: two configs, two trained run folders, a sweep's matched pair; the memory
floor against a hand count; the figures; bad input exits 2 naming the file or field and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import train_briefly

from embscale.base import rundir
from embscale.bench.decode import copy_bandwidth, measure_decode, weight_layout
from embscale.bench.decode_models import build, from_run_dir
from embscale.cli import main
from embscale.inference.decode import Decoder
from embscale.models.accounting import count_parameters
from embscale.models.config import CONFIG_DIR, ModelConfig
from embscale.models.model import build_model
from embscale.models.ngram import ngram_row_ids
from embscale.training.checkpoint import checkpoint_payload

MOE = dict(vocab_size=61, d_model=16, n_layers=1, n_heads=2, layer_type="standard", attention="mha",
           n_experts=4, n_zero_experts=2, top_k=2, expert_hidden=8, eos_token_id=3, max_seq_len=64)
NE = {**MOE, "n_experts": 2, "n_zero_experts": 1, "ngram": dict(n=3, k=2, ratio=2.0)}
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only oversubscribe a busy CI box
FAST = ["--batch-sizes", "1,2", "--prompt-len", "3", "--new-tokens", "3", "--k", "1", "--copy-mib", "4"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _run_folder(root: Path, name: str, model_cfg: dict, seed: int) -> tuple[Path, torch.nn.Module]:
    """A run folder as the trainer leaves it: run.json with the resolved model, a checkpoint after a few
    optimizer steps of real training."""
    cfg = ModelConfig.from_dict(model_cfg)
    torch.manual_seed(seed)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    train_briefly(model, ids, steps=3)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    rundir.write_run_record(run_dir, {"identity": {"run_id": name}, "run_id": name, "model": cfg.to_dict()})
    optimizer = torch.optim.AdamW(model.parameters())
    payload = checkpoint_payload(3, name, model, [optimizer], {}, torch.device("cpu"), None, 0.0)
    rundir.save_checkpoint(run_dir, 3, payload)
    return run_dir, model


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_pair_of_configs_rows_floor_and_figures(tmp_path, capsys):
    ne, moe = _write(tmp_path / "ne.yaml", NE), _write(tmp_path / "moe.yaml", MOE)
    out = tmp_path / "out"
    assert main(["decode-bench", str(ne), str(moe), *FAST, "--out", str(out), "--json"]) == 0
    report = _report(capsys)
    assert [m["label"] for m in report["models"]] == ["ne", "moe"]
    assert [m["family"] for m in report["models"]] == ["ne", "moe"]
    assert report["copy_bandwidth_gb_s"] > 0 and report["cuda_graph"] is False
    for model in report["models"]:
        assert model["weights"] == "random"
        assert [(r["mode"], r["batch"]) for r in model["rows"]] == [("decode", 1), ("decode", 2),
                                                                    ("speculative", 1), ("speculative", 2)]
        for row in model["rows"]:
            parts = [row[p] for p in ("dense_bytes", "expert_bytes", "ngram_row_bytes", "token_row_bytes",
                                      "kv_bytes")]
            assert row["floor_bytes"] == pytest.approx(sum(parts))
            assert row["floor_ms"] > 0 and row["floor_ratio"] == pytest.approx(row["ms_per_step"] / row["floor_ms"])
        decode, speculative = model["rows"][1], model["rows"][3]  # batch 2
        # a round (k = 1) reads the dense weights in a draft step and the verification pass; the draft's
        # plain embedding reads no N-gram rows
        assert speculative["dense_bytes"] > decode["dense_bytes"]
    ne_rows, moe_rows = report["models"][0]["rows"], report["models"][1]["rows"]
    assert ne_rows[0]["ngram_row_bytes"] > 0 and moe_rows[0]["ngram_row_bytes"] == 0
    assert ne_rows[0]["experts_per_step"] <= 2 and moe_rows[0]["experts_per_step"] <= 2
    written = sorted(p.name for p in out.iterdir())
    assert written == ["decode_bench.json", "decode_experts.pdf", "decode_experts.png", "decode_throughput.pdf",
                       "decode_throughput.png"]
    assert all((out / name).stat().st_size > 1000 for name in written)
    assert json.loads((out / "decode_bench.json").read_text())["models"][1]["label"] == "moe"


def test_pair_of_trained_run_folders_loads_their_checkpoints(tmp_path, capsys):
    ne_dir, ne_model = _run_folder(tmp_path / "results", "ne_run", NE, seed=1)
    moe_dir, _ = _run_folder(tmp_path / "results", "moe_run", MOE, seed=2)
    loaded = build(from_run_dir(ne_dir), "cpu", "float32", seed=123)
    for name, tensor in ne_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name  # the trained weights, not the seed's
    assert main(["decode-bench", str(ne_dir), str(moe_dir), *FAST, "--k", "0", "--json"]) == 0
    report = _report(capsys)
    assert [m["label"] for m in report["models"]] == ["ne_run", "moe_run"]
    for model, run_dir in zip(report["models"], (ne_dir, moe_dir), strict=True):
        assert model["weights"] == f"checkpoint step 3 ({rundir.checkpoint_path(run_dir, 3)})"
        assert [r["mode"] for r in model["rows"]] == ["decode", "decode"]


def test_sweep_pair_by_point_and_ambiguous_selector(tmp_path, capsys):
    sweep = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
    assert main(["decode-bench", "--sweep", str(sweep), "--pair", "ratio=3,seed=0", "--results",
                 str(tmp_path), "--batch-sizes", "1", "--prompt-len", "2", "--new-tokens", "2", "--k", "0",
                 "--copy-mib", "4", "--json"]) == 0
    report = _report(capsys)
    families = [m["family"] for m in report["models"]]
    assert families == ["ne", "moe"]
    assert all(m["weights"] == "random" for m in report["models"])  # no run folders under tmp_path
    totals = [m["parameters"] for m in report["models"]]
    assert abs(totals[0] / totals[1] - 1) < 0.05  # a matched pair: about equal totals
    moe_run_id = report["models"][1]["source"].rsplit(": ", 1)[1]
    assert main(["decode-bench", "--sweep", str(sweep), "--pair", moe_run_id[:10], "--results", str(tmp_path),
                 "--batch-sizes", "1", "--prompt-len", "2", "--new-tokens", "2", "--k", "0", "--copy-mib", "1",
                 "--json"]) == 0  # the same pair, picked by its MoE member's run id
    assert [m["source"] for m in _report(capsys)["models"]] == [m["source"] for m in report["models"]]
    assert main(["decode-bench", "--sweep", str(sweep), "--pair", "seed=0", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "3 pairs match" in err and "tiny.yaml" in err


def test_memory_floor_matches_a_hand_count():
    """Every real expert is routed (top_k = all router outputs), so the experts read are known by hand; the
    N-gram rows come from hashing the whole sequence, not from the cache."""
    cfg = ModelConfig.from_dict({**NE, "top_k": 3})
    D, V, E, Z, H = 16, 61, 2, 1, 8
    S, d = 4, 4  # (N - 1) K sub-tables of width D / S
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    layout = weight_layout(model)
    dense = 3 * D + 4 * D * D + (E + Z) * D + V * D + S * d * D  # 3 norms, attention, router, head, projection
    assert layout.dense_bytes == 4 * dense
    assert layout.expert_bytes == [4 * 3 * D * H]
    assert layout.token_row_bytes == 4 * D and layout.ngram_row_bytes == {"embed": 4 * d}
    assert layout.kv_bytes_per_token == 4 * 2 * D
    plain = weight_layout(model, plain_embedding=True)  # a draft of the trunk: no N-gram projection or rows
    assert plain.dense_bytes == 4 * (dense - S * d * D) and plain.ngram_row_bytes == {}
    assert plain.token_row_bytes == 4 * D

    prompts = torch.tensor([[5, 7, 9], [5, 3, 8]])
    fed = torch.tensor([[7], [7]])
    decoder = Decoder(model, 2, 8)
    with torch.no_grad():
        decoder.prefill(list(prompts))
        rows = decoder.ngrams.step(fed)
        model.forward_cached(fed, decoder.kv, **rows)
    parts = layout.step_bytes(model, fed, rows, tokens_held=8)
    whole = ngram_row_ids(torch.cat((prompts, fed), dim=1), cfg.ngram, V, cfg.eos_token_id)[:, -1]  # (2, S)
    assert parts == {"dense_bytes": 4 * dense, "expert_bytes": E * 4 * 3 * D * H,
                     "ngram_row_bytes": len(set(whole.flatten().tolist())) * 4 * d,
                     "token_row_bytes": 1 * 4 * D,  # one distinct token id (7) in the step
                     "kv_bytes": 8 * 4 * 2 * D}
    row = measure_decode(model, 2, 3, 3, torch.Generator().manual_seed(0), bandwidth=copy_bandwidth("cpu", 1 << 20))
    assert row.expert_bytes == E * 4 * 3 * D * H and row.dense_bytes == 4 * dense
    assert row.kv_bytes == 4 * 2 * D * (8 + 10) / 2  # the two sequences hold 8, then 10 tokens


def test_bad_input_exits_2_naming_the_file_or_field(tmp_path, capsys):
    moe = _write(tmp_path / "moe.yaml", MOE)
    other = _write(tmp_path / "other.yaml", {**MOE, "vocab_size": 67})
    out = tmp_path / "out"
    assert main(["decode-bench", str(moe), str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["decode-bench", str(moe), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vocab_size" in err and "other.yaml" in err
    assert main(["decode-bench", str(moe), str(moe), str(moe)]) == 2
    assert "one or two models" in capsys.readouterr().err
    assert main(["decode-bench", str(moe), "--cuda-graph"]) == 2  # the default device is the CPU
    assert "--cuda-graph: needs a CUDA device" in capsys.readouterr().err

    run_dir, _ = _run_folder(tmp_path / "results", "run", MOE, seed=0)
    checkpoint = rundir.checkpoint_path(run_dir, 3)
    with checkpoint.open("ab") as handle:
        handle.write(b"torn")
    before = sorted(p.name for p in rundir.checkpoint_dir(run_dir).iterdir())
    assert main(["decode-bench", str(moe), str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "step_00000003.pt" in err and "checksum mismatch" in err
    assert sorted(p.name for p in rundir.checkpoint_dir(run_dir).iterdir()) == before  # nothing renamed
    assert not out.exists()  # nothing written

    mismatched, _ = _run_folder(tmp_path / "results", "wider", MOE, seed=0)
    record = rundir.read_run_record(mismatched)
    rundir.write_run_record(mismatched, {**record, "model": {**record["model"], "d_model": 32}})
    assert main(["decode-bench", str(mismatched), "--k", "0", "--batch-sizes", "1"]) == 2
    assert "step_00000003.pt" in capsys.readouterr().err


def test_longcat_flash_lite_slice_builds_on_meta_with_the_accounted_size():
    cfg = ModelConfig.from_yaml(CONFIG_DIR / "longcat_flash_lite_slice.yaml")
    assert (cfg.d_model, cfg.n_layers, cfg.n_experts, cfg.n_zero_experts, cfg.top_k) == (3072, 1, 256, 128, 12)
    assert (cfg.ngram.n, cfg.ngram.k, cfg.attention) == (4, 4, "mla")
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert total == count_parameters(cfg).total == 34_817_498_112
    layout = weight_layout(model.to(torch.bfloat16))
    assert layout.expert_bytes == [2 * 3 * 3072 * 1024]
    assert layout.ngram_row_bytes == {"embed": 2 * 3072 // 12}
