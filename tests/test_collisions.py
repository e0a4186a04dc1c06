"""The collision analysis: its numpy hash equals the model's, and 2-gram collisions spike near multiples of V0."""

import numpy as np
import pytest
import torch

from embscale.analysis.collisions import collision_table, default_table_sizes, polynomial_hash, spike_summary
from embscale.base.errors import ConfigError
from embscale.commands.collisions import parse_sizes
from embscale.models.config import NgramConfig
from embscale.models.ngram import ngram_hashes, table_moduli

V0 = 4096


def zipf_tokens(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # Natural text is Zipfian; the multiple-of-V0 spike comes from that skew, so uniform ids would hide it.
    return np.minimum(rng.zipf(1.3, size=shape), V0 - 1).astype(np.int64)


@pytest.mark.parametrize("order", [2, 3, 5])
def test_numpy_hash_equals_model_hash(order):
    rng = np.random.default_rng(order)
    grams = rng.integers(1, V0, size=(500, order))
    sizes = [30 * V0 + 1, 31 * V0 - 7, 123_457]
    moduli = np.array([table_moduli(NgramConfig(n=order, k=1, ratio=s / V0), V0)[-1] for s in sizes])
    ours = polynomial_hash(grams, V0, moduli)
    for column, size in enumerate(sizes):
        spec = NgramConfig(n=order, k=1, ratio=size / V0)
        model = ngram_hashes(torch.from_numpy(grams), spec, V0, None)[:, -1, -1].numpy()
        np.testing.assert_array_equal(ours[:, column], model)


def test_collisions_spike_near_integer_multiples_of_v0():
    rng = np.random.default_rng(0)
    ids = zipf_tokens(rng, (40, 512))
    ids[:, ::97] = 0  # EOS resets inside the sample
    sizes = default_table_sizes(V0, 30, 32)
    table = collision_table(ids, V0, eos_token_id=0, sizes=sizes, policies=["exact", "paper"], max_order=3)
    assert set(table["order"]) == {2, 3}
    assert table["hit_rate"].between(0, 1).all() and table["collision_rate"].between(0, 1).all()
    summary = spike_summary(table, V0).set_index("policy")
    for policy in ("exact", "paper"):
        assert summary.loc[policy, "collision_near_multiple"] > 1.5 * summary.loc[policy, "collision_elsewhere"]
    # A table far smaller than the number of distinct n-grams makes almost every n-gram collide.
    tiny = collision_table(ids, V0, eos_token_id=0, sizes=[64], policies=["paper"], max_order=3)
    assert (tiny["collision_rate"] > 0.95).all() and (tiny["hit_rate"] < 0.1).all()


def test_size_parsing():
    assert parse_sizes("245760, 2.5x", 8192) == [20480, 245760]
    assert len(parse_sizes("30:33", 8192)) > 60
    for bad in ("33:30", "abc", "1,x"):
        with pytest.raises(ConfigError, match="--sizes"):
            parse_sizes(bad, 8192)
