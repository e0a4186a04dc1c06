"""Decoding with the caches equals the training forward: the KV cache (MHA, GQA, MLA), the N-gram Cache (NE and
PLNE, EOS rule), batches of unequal lengths, steps of one and of several tokens, and rollback."""

from __future__ import annotations

import pytest
import torch

from embscale.inference.decode import Decoder, generate, pad_right
from embscale.inference.ngram_cache import NgramCache
from embscale.models.config import MLAConfig, ModelConfig, NgramConfig, PerLayerConfig
from embscale.models.model import build_model
from embscale.models.ngram import NgramEmbedding, ngram_row_ids

VOCAB, EOS = 61, 3
# fp32 logits of the cached steps against one forward pass over the whole sequence: the same operations on the
# same numbers except the attention's reduction length (masked cache slots vs is_causal), so they agree to a few
# ulps of the logits' size (~1e-1 here); 2e-5 absolute leaves a wide margin and still catches any wrong key.
ATOL = 2e-5
MLA = MLAConfig(q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def config(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=24, n_layers=2, n_heads=2, layer_type="shortcut", dense_hidden=24,
                n_experts=4, n_zero_experts=2, top_k=2, expert_hidden=8, eos_token_id=EOS)
    return ModelConfig(**{**base, **changes})


NE = NgramConfig(n=3, k=2, ratio=2.0)
PLNE = PerLayerConfig(kind="plne", targets="both", ngram=NgramConfig(n=4, k=1, ratio=1.5))
MODELS = {
    "ne-moe-mha": dict(ngram=NE),
    "ne-plne-moe-mla": dict(attention="mla", mla=MLA, n_shared_experts=1, ngram=NE, per_layer=PLNE),
    "plne-dense-standard-gqa": dict(layer_type="standard", n_heads=4, n_kv_heads=2, n_experts=0,
                                    n_zero_experts=0, top_k=0,
                                    per_layer=PerLayerConfig(kind="plne", ngram=NgramConfig(n=2, k=2))),
    "dense-mla-ple": dict(attention="mla", mla=MLA, n_experts=0, n_zero_experts=0, top_k=0,
                          per_layer=PerLayerConfig(kind="ple", targets="second"), tie_embeddings=True),
    "moe-standard-mha": dict(layer_type="standard"),
}


def sequences(lengths: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Random sequences with EOS tokens sprinkled in (at the start, mid-sequence, twice in a row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        s = torch.randint(4, VOCAB, (n,), generator=g)
        s[torch.randperm(n, generator=g)[: max(1, n // 5)]] = EOS
        out.append(s)
    out[0][[0, 5, 6]] = EOS
    return out


def feed_in_steps(decoder: Decoder, seqs: list[torch.Tensor], prompt_lengths: list[int],
                  widths: list[int]) -> list[torch.Tensor]:
    """Prefill the prompts, then feed each sequence's next ``width`` tokens per step (fewer at its end);
    return the logits of every position of every sequence."""
    B = len(seqs)
    logits = [[] for _ in range(B)]
    ids, lengths = pad_right([s[:n] for s, n in zip(seqs, prompt_lengths, strict=True)])
    out = decoder.feed(ids, lengths)
    for b in range(B):
        logits[b].append(out[b, : lengths[b]])
    done = list(prompt_lengths)
    for width in widths:
        n_new = torch.tensor([min(width, len(s) - d) for s, d in zip(seqs, done, strict=True)])
        ids = torch.zeros(B, width, dtype=torch.int64)
        for b in range(B):
            ids[b, : n_new[b]] = seqs[b][done[b]: done[b] + n_new[b]]
        out = decoder.feed(ids, n_new)
        for b in range(B):
            logits[b].append(out[b, : n_new[b]])
            done[b] += int(n_new[b])
    assert done == [len(s) for s in seqs]
    return [torch.cat(parts) for parts in logits]


@pytest.mark.parametrize("name", MODELS)
def test_cached_steps_match_one_forward(name):
    torch.manual_seed(0)
    model = build_model(config(**MODELS[name])).eval()
    seqs = sequences((17, 9, 14))
    decoder = Decoder(model, 3, 20)
    got = feed_in_steps(decoder, seqs, [4, 1, 7], [1, 3, 1, 2, 5, 1, 1, 4])
    with torch.no_grad():
        for s, logits in zip(seqs, got, strict=True):
            torch.testing.assert_close(logits, model(s[None]).logits[0], atol=ATOL, rtol=0)
    assert decoder.lengths.tolist() == [17, 9, 14]


def test_ngram_cache_rows_are_the_training_rows_exactly():
    """Row ids step by step equal the hash of the whole sequence, bitwise, through EOS in every place: in the
    history, as a step's last token, inside a step, twice in a row; and with no EOS reset at all."""
    for eos in (EOS, None, 0):
        module = NgramEmbedding(NgramConfig(n=5, k=2, ratio=1.3), VOCAB, 16, eos)
        seqs = sequences((23, 11, 18), seed=1)
        seqs[1][:3] = 0  # id 0: a real token (or the EOS when eos == 0)
        cache = NgramCache(module, 3)
        want = [ngram_row_ids(s, module.spec, VOCAB, eos) for s in seqs]
        got = [[] for _ in seqs]
        done = [0, 0, 0]
        for width in (5, 1, 1, 3, 6, 2, 1, 7, 4):
            n_new = torch.tensor([min(width, len(s) - d) for s, d in zip(seqs, done, strict=True)])
            ids = torch.full((3, width), 7, dtype=torch.int64)
            for b in range(3):
                ids[b, : n_new[b]] = seqs[b][done[b]: done[b] + n_new[b]]
            rows = cache.step(ids, n_new)
            for b in range(3):
                got[b].append(rows[b, : n_new[b]])
                done[b] += int(n_new[b])
        for g, w in zip(got, want, strict=True):
            assert torch.equal(torch.cat(g), w)


def test_rollback_leaves_both_caches_as_if_never_fed():
    torch.manual_seed(0)
    model = build_model(config(**MODELS["ne-plne-moe-mla"])).eval()
    seqs = sequences((14, 10, 14), seed=2)
    prompt_lengths = [5, 3, 6]
    extra = 4  # a step of 4 tokens, of which each sequence keeps 4 - drop[b]
    drop = torch.tensor([4, 1, 0])

    fed = Decoder(model, 3, 16)
    ids, lengths = pad_right([s[:n] for s, n in zip(seqs, prompt_lengths, strict=True)])
    fed.feed(ids, lengths)
    step = torch.stack([s[n: n + extra] for s, n in zip(seqs, prompt_lengths, strict=True)])
    fed.feed(step)
    fed.rollback(drop)

    never = Decoder(model, 3, 16)
    kept = [n + extra - int(d) for n, d in zip(prompt_lengths, drop, strict=True)]
    ids, lengths = pad_right([s[:n] for s, n in zip(seqs, kept, strict=True)])
    never.feed(ids, lengths)

    assert torch.equal(fed.lengths, never.lengths)
    for a, b in zip(fed.kv.all(), never.kv.all(), strict=True):
        for name in a.buffers:  # the kept tokens' entries agree to rounding, everything past them is zero
            torch.testing.assert_close(a.buffers[name], b.buffers[name], atol=1e-6, rtol=0)
            stale = torch.arange(a.buffers[name].shape[1]) >= fed.lengths.unsqueeze(1)
            assert not a.buffers[name][stale].any()
    for role, cache in fed.ngrams.caches.items():
        assert torch.equal(cache.history, never.ngrams.caches[role].history), role

    # and the decoding that follows is the same
    nxt = torch.stack([s[k: k + 2] for s, k in zip(seqs, kept, strict=True)])
    torch.testing.assert_close(fed.feed(nxt), never.feed(nxt), atol=ATOL, rtol=0)


def test_rollback_is_bitwise_when_the_cache_was_built_the_same_way():
    """Feed tokens one per step, roll back the last step's j tokens: buffers and history are bitwise those
    before that step."""
    torch.manual_seed(0)
    model = build_model(config(**MODELS["ne-moe-mha"])).eval()
    seqs = sequences((9, 8), seed=3)
    decoder = Decoder(model, 2, 12)
    ids, lengths = pad_right([seqs[0][:5], seqs[1][:4]])
    decoder.feed(ids, lengths)
    before = [{k: v.clone() for k, v in c.buffers.items()} for c in decoder.kv.all()]
    history = decoder.ngrams.caches["embed"].history.clone()
    decoder.feed(torch.stack([seqs[0][5:8], seqs[1][4:7]]))
    decoder.rollback(3)
    for cache, saved in zip(decoder.kv.all(), before, strict=True):
        assert all(torch.equal(cache.buffers[k], saved[k]) for k in saved)
    assert torch.equal(decoder.ngrams.caches["embed"].history, history)
    assert decoder.lengths.tolist() == [5, 4]


def test_cache_bytes_per_token():
    mha = build_model(config(layer_type="standard"))  # 2 layers x (k + v) x 2 heads x 12 x 4 bytes
    assert mha.new_cache(1, 4).bytes_per_token() == 2 * 2 * 2 * 12 * 4
    mla = build_model(config(attention="mla", mla=MLA))  # 2 layers x 2 attentions x (12 + 4) x 4 bytes
    assert mla.new_cache(1, 4).bytes_per_token() == 2 * 2 * (12 + 4) * 4


def test_generate_greedy_matches_recomputing_the_whole_sequence():
    torch.manual_seed(0)
    model = build_model(config(**MODELS["ne-plne-moe-mla"])).eval().double()
    prompts = [torch.tensor([5, 9, EOS, 7]), torch.tensor([11]), torch.tensor([4, 4, 8, 30, 2, EOS])]
    out = generate(model, prompts, 6)
    with torch.no_grad():
        for prompt, tokens in zip(prompts, out, strict=True):
            seq = prompt
            for _ in range(6):
                seq = torch.cat((seq, model(seq[None]).logits[0, -1].argmax().view(1)))
            assert torch.equal(seq[len(prompt):], tokens)


def test_capacity_and_missing_rows_are_clear_errors():
    model = build_model(config(ngram=NE)).eval()
    decoder = Decoder(model, 1, 4)
    with pytest.raises(ValueError, match="capacity"):
        decoder.feed(torch.ones(1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="embed_rows"):
        model.forward_cached(torch.ones(1, 1, dtype=torch.int64), model.new_cache(1, 4))
