"""Speculative decoding: greedy returns the tokens of greedy decoding; the sampling rule leaves the target
distribution unchanged (chi-square tests with fixed seeds)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from embscale.inference.decode import generate
from embscale.inference.speculative import accept_greedy, accept_sampling, speculative_generate
from embscale.models.config import MLAConfig, ModelConfig, NgramConfig, PerLayerConfig
from embscale.models.model import build_model

EOS = 3
# A chi-square p-value below this fails a test. The seeds are fixed, so each test is deterministic; a correct
# rule passes at this level with probability 0.999 per seed, a wrong one (the draft's own distribution) fails
# with a p-value far below it (test_the_chi_square_check_can_fail).
P_MIN = 1e-3


def config(vocab: int, **changes) -> ModelConfig:
    base = dict(vocab_size=vocab, d_model=24, n_layers=2, n_heads=2, layer_type="shortcut", dense_hidden=24,
                n_experts=4, n_zero_experts=2, top_k=2, expert_hidden=8, eos_token_id=EOS)
    return ModelConfig(**{**base, **changes})


TARGET = dict(attention="mla", mla=MLAConfig(kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                             v_head_dim=6),
              ngram=NgramConfig(n=3, k=2, ratio=2.0),
              per_layer=PerLayerConfig(kind="plne", targets="first", ngram=NgramConfig(n=2, k=2, ratio=1.5)))
PROMPTS = [torch.tensor([5, 9, EOS, 7, 12]), torch.tensor([11]), torch.tensor([4, 4, 8, 30, 2, EOS, 6])]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("drafter", ["own-trunk", "small-model"])
def test_greedy_speculative_decoding_returns_the_greedy_tokens(k, drafter):
    torch.manual_seed(0)
    target = build_model(config(61, **TARGET)).eval().double()  # float64: no argmax tie flips on rounding
    draft = None
    if drafter == "small-model":
        draft = build_model(config(61, n_layers=1, layer_type="standard", n_experts=0, n_zero_experts=0,
                                   top_k=0)).eval().double()
    want = generate(target, PROMPTS, 20)
    got, stats = speculative_generate(target, PROMPTS, 20, k=k, draft=draft)
    assert torch.equal(got, want)
    # finished sequences stop drafting while the slower ones catch up
    assert stats.rounds >= 1 and 0 <= stats.accepted <= stats.drafted <= stats.rounds * len(PROMPTS) * k


def test_sequences_that_run_ahead_keep_their_caches_bounded():
    """High but uneven acceptance (an N-gram target drafting with its own trunk): sequences finish rounds apart,
    one with all k drafts accepted in its last round; the finished ones ride along (everything they feed rolled
    back) without outgrowing the caches (seed 0 overflowed a bound of prompt + max_new + k + 2)."""
    torch.manual_seed(0)
    target = build_model(config(61, layer_type="standard",
                                ngram=NgramConfig(n=2, k=1, ratio=1.0, amplification="sqrt_count"))).eval().double()
    prompts = [torch.randint(0, 61, (2,)) for _ in range(6)]
    got, stats = speculative_generate(target, prompts, 20, k=4)
    assert torch.equal(got, generate(target, prompts, 20))
    assert stats.drafted < stats.rounds * len(prompts) * 4  # some sequences finished first


def test_a_draft_equal_to_the_target_is_always_accepted():
    """A target without N-gram tables drafting for itself: every draft is accepted (the all-accepted path, where
    the draft feeds d_k and the next token in one step)."""
    torch.manual_seed(0)
    model = build_model(config(61, layer_type="standard")).eval().double()
    got, stats = speculative_generate(model, PROMPTS, 13, k=4, draft=model)
    assert torch.equal(got, generate(model, PROMPTS, 13))
    assert stats.acceptance_rate == 1.0


def test_accept_greedy_takes_the_longest_matching_prefix():
    logits = torch.zeros(3, 4, 5)
    best = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0], [2, 2, 1, 3]])
    logits.scatter_(-1, best.unsqueeze(-1), 1.0)
    drafts = torch.tensor([[1, 2, 3], [1, 0, 0], [2, 2, 1]])
    accepted, nxt = accept_greedy(logits, drafts)
    assert accepted.tolist() == [3, 0, 3] and nxt.tolist() == [4, 0, 3]


def emitted_tokens(p: torch.Tensor, q: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one round of the rule on ``n`` copies of fixed ``p (k+1, V)``, ``q (k, V)``: the first emitted token
    of every row, and the second one of the rows that accepted d_1."""
    g = torch.Generator().manual_seed(seed)
    k = q.shape[0]
    P, Q = p.expand(n, *p.shape), q.expand(n, *q.shape)
    drafts = torch.multinomial(Q.reshape(-1, Q.shape[-1]), 1, generator=g).view(n, k)
    accepted, nxt = accept_sampling(P, Q, drafts, g)
    first = torch.where(accepted >= 1, drafts[:, 0], nxt)
    second = torch.where(accepted >= 2, drafts[:, 1], nxt)[accepted >= 1]
    return first, second


def chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    return float(chisquare(counts.numpy(), (probs * counts.sum()).numpy()).pvalue)


def test_sampling_acceptance_keeps_the_target_distribution():
    """V = 6, k = 2, a draft far from the target: the emitted tokens follow p_1 and, after an accepted d_1, p_2."""
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                      [0.05, 0.05, 0.30, 0.30, 0.20, 0.10],
                      [0.10, 0.10, 0.20, 0.20, 0.20, 0.20]], dtype=torch.float64)
    q = torch.tensor([[0.10, 0.10, 0.10, 0.30, 0.30, 0.10],
                      [0.50, 0.10, 0.10, 0.10, 0.10, 0.10]], dtype=torch.float64)
    first, second = emitted_tokens(p, q, 60_000, seed=1)
    assert chi_square_p(first, p[0]) > P_MIN
    assert chi_square_p(second, p[1]) > P_MIN
    assert second.numel() > 10_000  # d_1 was accepted often enough to test the second token


def test_the_chi_square_check_can_fail():
    """Power: the draft's samples themselves are rejected as draws of p at this sample size."""
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)
    q = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.10, 0.05], dtype=torch.float64)
    samples = torch.multinomial(q, 60_000, replacement=True, generator=torch.Generator().manual_seed(2))
    assert chi_square_p(samples, p) < 1e-12


def test_sampled_speculative_decoding_follows_the_target_model():
    """End to end, rollbacks included: 3000 copies of one prompt, two tokens each, k = 2, a draft of the target's
    own trunk; the 64 joint outcomes (vocabulary 8) follow the target's exact two-token distribution."""
    torch.manual_seed(0)
    vocab = 8
    target = build_model(config(vocab, init_std=0.4, ngram=NgramConfig(n=3, k=2, ratio=3.0),
                                per_layer=TARGET["per_layer"])).eval().double()
    prompt = torch.tensor([5, 1, EOS, 6])
    n = 3000
    tokens, stats = speculative_generate(target, [prompt] * n, 2, k=2, temperature=1.0,
                                         generator=torch.Generator().manual_seed(3))
    assert 0.05 < stats.acceptance_rate < 0.95  # both paths, acceptance and rejection, are exercised
    with torch.no_grad():
        first = target(prompt[None]).logits[0, -1].softmax(-1)  # (V,)
        nexts = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], dim=1)
        second = target(nexts).logits[:, -1].softmax(-1)  # (V, V): row = first token
    joint = (first.unsqueeze(1) * second).flatten()
    assert chi_square_p(tokens[:, 0] * vocab + tokens[:, 1], joint) > P_MIN
