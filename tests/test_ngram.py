"""Hashed N-gram Embedding: the hash against Python integers, EOS handling, the efficient form against the
per-table formula (forward and gradients), table sizing, parameter accounting and amplification."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import time
from pathlib import Path

import pytest
import sympy
import torch
from train_helpers import train_briefly

from embscale.base.errors import ConfigError
from embscale.models.config import ModelConfig, NgramConfig
from embscale.models.ngram import (
    NgramEmbedding,
    hash_plan,
    is_prime,
    lookback_lengths,
    modulus_report,
    next_prime,
    ngram_hashes,
    ngram_parameter_counts,
    ngram_row_ids,
    table_moduli,
    table_orders,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
LONGCAT = ROOT / "models" / "configs" / "longcat_flash_lite.yaml"
ALL_NK = [(n, k) for n in range(2, 9) for k in range(1, 9)]




def reference_hash(seq: list[int], i: int, n: int, vocab: int, modulus: int, eos: int | None) -> int:
    """H = (sum_j t_{i-j} V0^j) mod M in Python integers, walking back until the sequence start or an EOS
    that ends an earlier document."""
    total = 0
    for j in range(n):
        p = i - j
        if p < 0 or (j > 0 and seq[p] == eos):
            break
        total += seq[p] * vocab**j
    return total % modulus


def random_ids(rng: random.Random, vocab: int, batch: int, time_: int, eos: int | None) -> torch.Tensor:
    """Random ids, half of them in the vocabulary's top 1000 (largest products), some EOS, never all zero."""
    rows = []
    for _ in range(batch):
        row = []
        for _ in range(time_):
            u = rng.random()
            if eos is not None and u < 0.15:
                row.append(eos)
            elif u < 0.6:
                row.append(rng.randrange(max(1, vocab - 1000), vocab))
            else:
                row.append(rng.randrange(1, vocab))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def check_against_reference(ids: torch.Tensor, spec: NgramConfig, vocab: int, eos: int | None) -> None:
    hashes = ngram_hashes(ids, spec, vocab, eos)
    moduli = table_moduli(spec, vocab)
    assert hashes.shape == (*ids.shape, spec.num_tables) and hashes.dtype == torch.int64
    got = hashes.tolist()
    for b, seq in enumerate(ids.tolist()):
        for i in range(len(seq)):
            expected = [reference_hash(seq, i, n, vocab, m, eos)
                        for (n, _), m in zip(table_orders(spec), moduli, strict=True)]
            assert got[b][i] == expected, (spec, vocab, b, i)


# (vocab, ratio): small, GPT-2-like, 2^21 at a moderate table, and 2^21 with every modulus just below 2^31.
HASH_CASES = [(97, 3.0), (50257, 31.7), (2**21, 100.5), (2**21, (2**31 - 128) / 2**21)]


@pytest.mark.parametrize("vocab,ratio", HASH_CASES)
def test_hash_equals_python_big_integers_for_every_order(vocab, ratio):
    rng = random.Random(vocab)
    eos = vocab - 7
    for n, k in ALL_NK:
        spec = NgramConfig(n=n, k=k, ratio=ratio)
        ids = random_ids(rng, vocab, batch=2, time_=12, eos=eos)
        check_against_reference(ids, spec, vocab, eos)
    if ratio > 1000:  # the intermediates really are near the int64-exactness bound
        assert max(table_moduli(NgramConfig(n=8, k=8, ratio=ratio), vocab)) > 2**31 - 200


def test_hash_without_eos_reset_and_with_prime_and_exact_sizing():
    rng = random.Random(0)
    for sizing in ("prime", "exact"):
        spec = NgramConfig(n=5, k=3, ratio=7.3, sizing=sizing)
        check_against_reference(random_ids(rng, 1000, 3, 16, eos=None), spec, 1000, None)
    # eos_token_id=None: an id equal to some "EOS" does not reset anything
    ids = torch.tensor([[5, 1, 6, 7]])
    assert lookback_lengths(ids, None).tolist() == [[0, 1, 2, 3]]
    assert lookback_lengths(ids, 1).tolist() == [[0, 1, 0, 1]]


def test_hash_rejects_sizes_past_the_int64_exactness_bound():
    with pytest.raises(ConfigError, match="vocab_size"):
        hash_plan(NgramConfig(n=2, k=1, ratio=2.0), 2**21 + 1)
    with pytest.raises(ConfigError, match="ratio"):
        hash_plan(NgramConfig(n=2, k=1, ratio=1025.0), 2**21)


EOS = 3
V = 11


def one_table(n: int) -> NgramConfig:
    return NgramConfig(n=n, k=1, ratio=1000.0, sizing="exact")  # M = 11000 > every 4-gram below: no wrap


def poly(*tokens_newest_first: int) -> int:
    return sum(t * V**j for j, t in enumerate(tokens_newest_first))


@pytest.mark.parametrize("seq,lookback", [
    ([EOS, 5, 6, 7], [0, 0, 1, 2]),  # EOS at the start: a one-token document
    ([5, EOS, EOS, 6], [0, 1, 0, 0]),  # two EOS in a row: the second is a document of its own
    ([5, 6, EOS], [0, 1, 2]),  # EOS last: hashes with its full look-back
    ([5, EOS, 6, 7, EOS, 8, 9], [0, 1, 0, 1, 2, 0, 1]),  # documents shorter than N
])
def test_eos_resets_the_lookback(seq, lookback):
    ids = torch.tensor([seq])
    assert lookback_lengths(ids, EOS).tolist() == [lookback]
    check_against_reference(ids, NgramConfig(n=4, k=2, ratio=5.0), V, EOS)


def test_eos_cases_by_hand():
    four = one_table(4)
    # left context is id 0: the 4-gram at position 1 is (0, 0, 5, 6)
    assert ngram_hashes(torch.tensor([[5, 6]]), four, V, EOS)[0, :, -1].tolist() == [poly(5), poly(6, 5)]
    # EOS belongs to the document it ends: its 4-gram is (5, 6, 7, EOS); the next token sees nothing behind it
    h = ngram_hashes(torch.tensor([[5, 6, 7, EOS, 8, 9]]), four, V, EOS)[0, :, -1].tolist()
    assert h == [poly(5), poly(6, 5), poly(7, 6, 5), poly(EOS, 7, 6, 5), poly(8), poly(9, 8)]
    # a document shorter than N (3 tokens including its EOS) between two others
    h = ngram_hashes(torch.tensor([[5, EOS, 6, 7, EOS, 8]]), four, V, EOS)[0, :, -1].tolist()
    assert h == [poly(5), poly(EOS, 5), poly(6), poly(7, 6), poly(EOS, 7, 6), poly(8)]


def test_documents_hash_as_if_alone():
    rng = random.Random(1)
    spec = NgramConfig(n=6, k=2, ratio=3.3)
    docs = [random_ids(rng, 500, 1, length, None)[0] for length in (1, 4, 9, 2)]
    docs = [torch.cat([d, torch.tensor([EOS])]) for d in docs]
    together = ngram_hashes(torch.cat(docs)[None], spec, 500, EOS)[0]
    alone = torch.cat([ngram_hashes(d[None], spec, 500, EOS)[0] for d in docs])
    assert torch.equal(together, alone)


def test_row_ids_are_hashes_plus_offsets():
    spec = NgramConfig(n=3, k=3, ratio=2.2)
    ids = random_ids(random.Random(2), 300, 2, 10, EOS)
    hashes = ngram_hashes(ids, spec, 300, EOS)
    rows = ngram_row_ids(ids, spec, 300, EOS)
    moduli = table_moduli(spec, 300)
    offsets = torch.tensor([sum(moduli[:s]) for s in range(len(moduli))])
    assert torch.equal(rows, hashes + offsets)
    assert bool(((hashes >= 0) & (hashes < torch.tensor(moduli))).all())


# ----- sizing -----

def test_paper_sizing_is_m_plus_odd_offsets():
    spec = NgramConfig(n=4, k=4, ratio=78)
    assert table_moduli(spec, 131072) == [78 * 131072 + 2 * idx + 1 for idx in range(12)]
    report = modulus_report(spec, 131072)
    assert [r["distance"] for r in report] == [2 * idx + 1 for idx in range(12)]
    assert {r["nearest_multiple"] for r in report} == {78}
    assert [(r["n"], r["k"]) for r in report] == table_orders(spec)
    # a non-integer ratio is far from a multiple
    far = modulus_report(NgramConfig(n=2, k=1, ratio=30.5), 1000)[0]
    assert far["modulus"] == 30501 and far["distance"] == 499


def test_exact_sizing_gives_m_for_every_table():
    for n, k in [(2, 1), (4, 4), (8, 8)]:
        spec = NgramConfig(n=n, k=k, ratio=31.25, sizing="exact")
        assert table_moduli(spec, 1024) == [32000] * ((n - 1) * k)


def test_prime_sizing_gives_increasing_primes_at_or_above_paper_values():
    for ratio, vocab in [(78, 131072), (30.2, 50257), (1.0, 2)]:
        spec = NgramConfig(n=8, k=8, ratio=ratio)
        paper = table_moduli(spec, vocab)
        primes = table_moduli(NgramConfig(n=8, k=8, ratio=ratio, sizing="prime"), vocab)
        assert all(sympy.isprime(p) for p in primes)
        assert all(p >= q for p, q in zip(primes, paper, strict=True))
        assert all(a < b for a, b in zip(primes[:-1], primes[1:], strict=True))
        assert primes[0] == sympy.nextprime(paper[0] - 1)


def test_miller_rabin_is_exact():
    rng = random.Random(3)
    assert [n for n in range(200) if is_prime(n)] == list(sympy.primerange(0, 200))
    special = [561, 3215031751, 2152302898747, 3474749660383, 341550071728321, 3825123056546413051,
               2**31 - 1, 2**61 - 1, 2**64 - 59, (2**32 - 5) * (2**32 - 17)]
    for n in special + [rng.randrange(2**40, 2**64) for _ in range(300)]:
        assert is_prime(n) == sympy.isprime(n), n
    assert next_prime(10223617) == sympy.nextprime(10223616)


# ----- parameters -----

def module_counts(module: NgramEmbedding) -> dict[str, int]:
    norm = sum(p.numel() for p in module.norm.parameters()) if module.norm is not None else 0
    return {"token": module.token.weight.numel(), "tables": module.tables.weight.numel(),
            "projections": module.projection.weight.numel(), "norm": norm}


@pytest.mark.parametrize("spec,vocab,width", [
    (NgramConfig(n=2, k=1, ratio=3.0), 50, 16),
    (NgramConfig(n=3, k=2, ratio=2.5, sizing="prime", amplification="layernorm"), 97, 24),
    (NgramConfig(n=4, k=4, ratio=1.7, sizing="exact"), 64, 26),  # 26 // 12 = 2: remainder tolerated
])
def test_parameter_counts_equal_numel(spec, vocab, width):
    module = NgramEmbedding(spec, vocab, width, EOS)
    assert ngram_parameter_counts(spec, vocab, width) == module_counts(module)
    total = sum(ngram_parameter_counts(spec, vocab, width).values())
    assert total == sum(p.numel() for p in module.parameters())


def test_parameter_count_is_independent_of_n_and_k_up_to_odd_offsets():
    vocab, width, ratio = 1000, 5040, 3.7
    m = round(ratio * vocab)
    checked = 0
    for n, k in ALL_NK:
        s = (n - 1) * k
        if width % s:
            continue
        d = width // s
        paper = ngram_parameter_counts(NgramConfig(n=n, k=k, ratio=ratio), vocab, width)
        exact = ngram_parameter_counts(NgramConfig(n=n, k=k, ratio=ratio, sizing="exact"), vocab, width)
        offsets = sum(2 * idx + 1 for idx in range(s)) * d
        assert paper["tables"] - exact["tables"] == offsets
        assert exact["tables"] + exact["projections"] == m * width + width * width
        assert paper["token"] == vocab * width and paper["norm"] == 0
        checked += 1
    assert checked >= 20


def test_released_model_ne_on_meta_device():
    cfg = ModelConfig.from_yaml(LONGCAT)
    counts = ngram_parameter_counts(cfg.ngram, cfg.vocab_size, cfg.d_model)
    assert counts["tables"] + counts["projections"] == pytest.approx(31.4e9, rel=5e-3)
    module = NgramEmbedding(cfg.ngram, cfg.vocab_size, cfg.d_model, cfg.eos_token_id, device="meta")
    assert module.tables.weight.shape == (sum(table_moduli(cfg.ngram, cfg.vocab_size)), 256)
    assert module_counts(module) == counts


# ----- the module -----

AMPLIFICATIONS = ("none", "sqrt_d", "layernorm", "sqrt_count")


@pytest.mark.parametrize("amplification", AMPLIFICATIONS)
@pytest.mark.parametrize("n,k,width", [(3, 2, 24), (4, 4, 26)])
def test_efficient_form_equals_per_table_reference(amplification, n, k, width):
    torch.manual_seed(0)
    vocab = 97
    spec = NgramConfig(n=n, k=k, ratio=2.5, amplification=amplification)  # small tables: rows repeat
    module = NgramEmbedding(spec, vocab, width, EOS, dtype=torch.float64)
    if module.norm is not None:  # non-trivial affine parameters
        with torch.no_grad():
            module.norm.weight.normal_(1.0, 0.3)
            module.norm.bias.normal_(0.0, 0.3)
    ids = random_ids(random.Random(4), vocab, 3, 20, EOS)
    probe = torch.randn(3, 20, width, dtype=torch.float64)

    def run(forward):
        module.zero_grad(set_to_none=True)
        out = forward(ids)
        (out * probe).sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}

    out, grads = run(module.forward)
    ref_out, ref_grads = run(module.forward_reference)
    assert out.shape == (3, 20, width)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-14)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-12, atol=1e-14, msg=name)


def test_amplification_scales_the_output_as_specified():
    torch.manual_seed(0)
    vocab, width, spec = 97, 256, NgramConfig(n=3, k=2, ratio=2.0)
    ids = random_ids(random.Random(5), vocab, 2, 32, EOS)
    weights = NgramEmbedding(spec, vocab, width, EOS).state_dict()
    modules = {}
    for amplification in AMPLIFICATIONS:
        modules[amplification] = NgramEmbedding(NgramConfig(n=3, k=2, ratio=2.0, amplification=amplification),
                                                vocab, width, EOS, dtype=torch.float64)
        modules[amplification].load_state_dict(weights, strict=False)
    with torch.no_grad():
        out = {name: module(ids) for name, module in modules.items()}
    s = spec.num_tables
    torch.testing.assert_close(out["sqrt_d"], out["none"] * math.sqrt(width), rtol=1e-12, atol=0)
    torch.testing.assert_close(out["sqrt_count"], out["none"] * math.sqrt(s + 1), rtol=1e-12, atol=0)
    ln = out["layernorm"]
    assert ln.mean(-1).abs().max() < 1e-6
    torch.testing.assert_close(ln.var(-1, unbiased=False), torch.ones(2, 32, dtype=torch.float64),
                               rtol=0, atol=1e-2)
    # the un-amplified average is small: amplification is what makes it visible
    assert out["none"].pow(2).mean().sqrt() < 0.01


def test_forward_accepts_precomputed_rows_and_runs_on_meta():
    spec = NgramConfig(n=3, k=2, ratio=2.0)
    module = NgramEmbedding(spec, 50, 16, EOS)
    ids = random_ids(random.Random(6), 50, 2, 8, EOS)
    rows = ngram_row_ids(ids, spec, 50, EOS)
    assert torch.equal(module.row_ids(ids), rows)
    assert torch.equal(module(ids, rows=rows), module(ids))
    meta = NgramEmbedding(spec, 50, 16, EOS, device="meta")
    assert meta(ids.to("meta")).shape == (2, 8, 16)


# ----- with the backbone -----

def test_model_with_ngram_embedding_trains():
    from embscale.models.model import build_model

    cfg = ModelConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=4, layer_type="shortcut",
                      dense_hidden=64, n_experts=4, n_zero_experts=2, expert_hidden=32, top_k=2,
                      eos_token_id=EOS,
                      ngram=NgramConfig(n=3, k=2, ratio=3.0, amplification="sqrt_d"), max_seq_len=64)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert any(isinstance(m, NgramEmbedding) for m in model.modules())
    ids = random_ids(random.Random(7), 64, 4, 33, EOS)
    losses = train_briefly(model, ids)
    assert losses[-1] < 0.7 * losses[0], losses


def test_released_model_accounting_through_the_cli():
    from embscale.cli import main

    buffer = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        code = main(["params", str(LONGCAT), "--json"])
    elapsed = time.perf_counter() - start
    assert code == 0
    report = json.loads(buffer.getvalue())
    assert report["total"] == pytest.approx(68.5e9, rel=5e-3)
    assert report["ne_share"] * report["total"] == pytest.approx(31.4e9, rel=5e-3)
    assert report["activated_min"] == pytest.approx(2.93e9, rel=1e-2)
    assert report["activated_max"] == pytest.approx(4.52e9, rel=1e-2)
    assert elapsed < 2.0
