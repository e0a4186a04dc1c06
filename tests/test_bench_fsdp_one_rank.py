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
