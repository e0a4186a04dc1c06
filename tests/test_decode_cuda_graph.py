"""The decode step replayed from a CUDA graph decodes exactly as the eager step: the same greedy tokens, the same
logits (bf16, to its rounding), the same caches and expert loads; also when the captured step is compiled with
``torch.compile``. Needs a CUDA device (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from embscale.inference.decode import Decoder
from embscale.models.config import ModelConfig
from embscale.models.model import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]

EOS = 3
MODEL = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, layer_type="shortcut", dense_hidden=128,
             n_experts=8, n_zero_experts=4, top_k=2, expert_hidden=64, eos_token_id=EOS, max_seq_len=128,
             ngram=dict(n=3, k=2, ratio=2.0),
             per_layer=dict(kind="plne", targets="first", ngram=dict(n=2, k=2, ratio=1.5)))
MLA = dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


@pytest.mark.parametrize(("attention", "compile"), [("mha", False), ("mla", False), ("mla", True)])
def test_graph_replayed_decoding_equals_eager_decoding(attention, compile):
    from embscale.inference.cuda_graph import GraphedDecodeStep

    cfg = ModelConfig.from_dict({**MODEL, "attention": attention, **({"mla": MLA} if attention == "mla" else {})})
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda").to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 512, (n,), generator=generator).cuda() for n in (5, 9, 2)]
    prompts[1][4] = EOS  # a prompt that crosses a document boundary
    steps = 12

    def decode(graphed: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], Decoder, list[torch.Tensor]]:
        decoder = Decoder(model, len(prompts), 9 + steps)
        with torch.no_grad():
            token = decoder.prefill(prompts).argmax(-1)
            step = GraphedDecodeStep(decoder, compile=compile) if graphed else None
            tokens, logits, loads = [], [], []
            for i in range(steps):
                if i == 5:
                    token = torch.full_like(token, EOS)  # feed an EOS: the N-gram Cache restarts after it
                if graphed:
                    out = step(token.unsqueeze(1)).clone()
                    token = step.next_token.clone()
                else:
                    out = decoder.feed(token.unsqueeze(1))
                    token = out[:, -1].argmax(-1)
                tokens.append(token)
                logits.append(out.float())
                loads.append(torch.stack([moe.last_counts.clone() for moe in model.moe_layers()]))
        return tokens, logits, decoder, loads

    eager_tokens, eager_logits, eager, eager_loads = decode(graphed=False)
    graph_tokens, graph_logits, graphed, graph_loads = decode(graphed=True)
    assert torch.equal(torch.stack(graph_tokens), torch.stack(eager_tokens))
    torch.testing.assert_close(torch.stack(graph_logits), torch.stack(eager_logits), rtol=1.6e-2, atol=1e-2)
    assert torch.equal(torch.stack(graph_loads), torch.stack(eager_loads))
    assert torch.equal(graphed.lengths, eager.lengths)
    for role, cache in eager.ngrams.caches.items():
        assert torch.equal(graphed.ngrams.caches[role].history, cache.history), role
    for mine, theirs in zip(graphed.kv.all(), eager.kv.all(), strict=True):
        for name, buffer in theirs.buffers.items():
            torch.testing.assert_close(mine.buffers[name], buffer, rtol=1.6e-2, atol=1e-2)


def test_graphed_decode_bench_rows_on_cuda():
    from embscale.bench.decode import copy_bandwidth, measure_decode

    cfg = ModelConfig.from_dict({**MODEL, "attention": "mha"})
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda").to(torch.bfloat16).eval()
    row = measure_decode(model, 4, 6, 6, torch.Generator().manual_seed(0), cuda_graph=True,
                         bandwidth=copy_bandwidth("cuda", 64 << 20))
    assert row.cuda_graph and row.ms_per_step > 0 and row.floor_ratio > 0
    assert 1 <= row.experts_per_step <= 8
    assert 0 < row.ngram_share < 1  # the N-gram lookups, from a graph of their own, are part of the step
