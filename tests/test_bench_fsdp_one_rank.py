"""``make bench``'s fsdp section (bench/suite.py, ``measure_fsdp_one_rank``) on the CPU with gloo: the plain model and
the same model FSDP2-sharded over a one-rank mesh as the trainer shards it train the same first two steps (the
benchmark compares like with like), and the section renders. Its numbers come from a GPU (BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

from embscale.bench.suite import measure_fsdp_one_rank, render
from embscale.models.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, layer_type="shortcut", dense_hidden=64,
             n_experts=4, n_zero_experts=2, top_k=2, expert_hidden=32, max_seq_len=64,
             ngram=dict(n=3, k=2, ratio=2.0))


def test_plain_and_one_rank_fsdp_train_alike_and_render():
    assert not torch.distributed.is_initialized()
    result = measure_fsdp_one_rank(ModelConfig.from_dict(MODEL), None, micro_batch=2, accumulation=2, steps=2,
                                   rounds=2, seq_len=16, device="cpu")
    assert not torch.distributed.is_initialized()  # the group it made is gone
    plain, sharded = result["first_two_losses"]["plain"], result["first_two_losses"]["fsdp"]
    assert plain[0] != plain[1]  # the optimizer stepped between them
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(plain), rtol=1e-5, atol=1e-5)
    assert result["tokens_per_step"] == 2 * 2 * 16
    assert len(result["fsdp_over_plain"]["per_round"]) == 2
    assert all(r > 0 for r in result["fsdp_over_plain"]["per_round"])
    assert result["plain"]["tokens_per_s"] > 0 and result["fsdp"]["tokens_per_s"] > 0
    text = render({"date": "d", "device": "cpu", "torch": "t", "triton": "t", "python": "p", "fsdp": [result]})
    assert "## FSDP2 on one GPU" in text and f"{result['fsdp_over_plain']['median']:.3f}" in text


def test_a_failing_measurement_becomes_a_note_and_the_others_are_kept(tmp_path, monkeypatch):
    """run_suite's fsdp section with the GPU parts replaced: a model whose measurement raises is a note in the
    report, the other model's row is kept and rendered."""
    from embscale.bench import suite

    result = measure_fsdp_one_rank(ModelConfig.from_dict(MODEL), None, micro_batch=1, accumulation=1, steps=1,
                                   rounds=1, seq_len=8, device="cpu")

    def measure(name, *args):
        if name == "bench_moe_100m":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {**result, "config": name}

    monkeypatch.setattr(suite, "measure_ceilings", lambda: {"copy_tb_s": 1.0, "gemm_tflop_s": 1.0, "copy_ms": 1.0,
                                                            "gemm_ms": 1.0})
    monkeypatch.setattr(suite, "measure_fsdp_one_rank", measure)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test device")
    out = tmp_path / "BENCHMARKS.md"
    report = suite.run_suite(out, ["fsdp"])
    assert [r["config"] for r in report["fsdp"]] == ["bench_ne_100m"]
    assert report["notes"] == ["fsdp on one rank, bench_moe_100m failed: OutOfMemoryError: CUDA out of memory "
                               "(simulated)"]
    text = out.read_text()
    assert "| bench_ne_100m |" in text and "- fsdp on one rank, bench_moe_100m failed" in text
