"""Table sizes and parameter counts of the N-gram and per-layer embeddings, in plain integers.

Kept free of torch so that accounting (``embscale params``, sweep expansion over thousands of configs) runs in
milliseconds; :mod:`embscale.models.ngram` and :mod:`embscale.models.per_layer` re-export these and build the
modules.
"""

from __future__ import annotations

import functools

from embscale.base.errors import ConfigError
from embscale.models.config import ModelConfig, NgramConfig

_MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic for every n < 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin primality test, exact for every 64-bit integer."""
    if n < 2:
        return False
    for p in _MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in _MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(n: int) -> int:
    """The smallest prime >= n."""
    candidate = max(n, 2)
    while not is_prime(candidate):
        candidate += 1
    return candidate


def table_orders(spec: NgramConfig) -> list[tuple[int, int]]:
    """``(n, k)`` of every sub-table, in sub-table order ``idx = (n-2)*K + (k-1)``."""
    return [(n, k) for n in range(2, spec.n + 1) for k in range(1, spec.k + 1)]


@functools.lru_cache(maxsize=256)
def _table_moduli(spec: NgramConfig, vocab_size: int) -> tuple[int, ...]:
    m = spec.base_rows(vocab_size)
    if m < 2:
        raise ConfigError("ngram.ratio", f"ratio * vocab_size = {spec.ratio} * {vocab_size} rounds to {m}; "
                                         "a table needs at least 2 rows")
    num_tables = spec.num_tables
    if spec.sizing == "exact":
        return (m,) * num_tables
    paper = [m + 2 * idx + 1 for idx in range(num_tables)]
    if spec.sizing == "paper":
        return tuple(paper)
    # prime: the next prime at or above the paper modulus, kept strictly increasing so that two sub-tables of
    # one order never share a modulus (they would hash identically and one of them would be wasted).
    moduli: list[int] = []
    for value in paper:
        moduli.append(next_prime(max(value, moduli[-1] + 1 if moduli else value)))
    return tuple(moduli)


def table_moduli(spec: NgramConfig, vocab_size: int) -> list[int]:
    """Modulus ``M_idx`` (= row count) of every sub-table, by the sizing policy of ``spec``.

    With ``m = round(ratio * V0)`` and ``idx = (n-2)*K + (k-1)``:

    - ``paper``: ``M_idx = m + 2*idx + 1`` (the released code: one polynomial, K different odd moduli);
    - ``prime``: the smallest prime ``>= m + 2*idx + 1`` that is also larger than the previous sub-table's
      modulus (so the moduli stay distinct);
    - ``exact``: ``M = m`` for every table (the K sub-tables of an order then hash identically; this policy
      exists to study table sizes that are exact multiples of ``V0``).
    """
    return list(_table_moduli(spec, vocab_size))


def modulus_report(spec: NgramConfig, vocab_size: int) -> list[dict]:
    """Each sub-table's modulus and its distance to the nearest integer multiple of ``V0``.

    2-gram collisions spike when a table size nears an integer multiple of ``V0`` (BRIEF section 2), so a run
    records this. Keys: ``index``, ``n``, ``k``, ``modulus``, ``ratio`` (``M / V0``), ``nearest_multiple``
    (the integer ``q`` minimising ``|M - q V0|``), ``distance`` (``|M - q V0|``), ``relative_distance``
    (``distance / V0``).
    """
    rows = []
    pairs = zip(table_orders(spec), table_moduli(spec, vocab_size), strict=True)
    for index, ((n, k), modulus) in enumerate(pairs):
        multiple = max(1, round(modulus / vocab_size))
        distance = abs(modulus - multiple * vocab_size)
        rows.append({"index": index, "n": n, "k": k, "modulus": modulus, "ratio": modulus / vocab_size,
                     "nearest_multiple": multiple, "distance": distance,
                     "relative_distance": distance / vocab_size})
    return rows


def ngram_parameter_counts(spec: NgramConfig, vocab_size: int, width: int) -> dict[str, int]:
    """Analytic parameter counts of :class:`NgramEmbedding` (allocates nothing).

    ``token`` = ``V0 * width`` (E0), ``tables`` = ``sum_s M_s * d`` (lookup rows), ``projections`` =
    ``S * d * width``, ``norm`` = ``2 * width`` with ``layernorm`` amplification, else 0.
    """
    d = spec.table_width(width)
    return {
        "token": vocab_size * width,
        "tables": sum(table_moduli(spec, vocab_size)) * d,
        "projections": spec.num_tables * d * width,
        "norm": 2 * width if spec.amplification == "layernorm" else 0,
    }


_TARGET_MLPS = {"first": (0,), "second": (1,), "both": (0, 1)}


def per_layer_slots(cfg: ModelConfig) -> list[tuple[int, int]]:
    """``(layer_index, mlp_index)`` of every dense MLP that receives a per-layer embedding (empty without
    one)."""
    if cfg.per_layer is None:
        return []
    mlps = _TARGET_MLPS[cfg.per_layer.targets]
    available = cfg.dense_mlps_per_layer
    if max(mlps) >= available:
        raise ConfigError("per_layer.targets",
                          f"{cfg.per_layer.targets!r} needs {max(mlps) + 1} dense MLPs per layer, but a "
                          f"{cfg.layer_type} layer has {available}; use 'first'")
    return [(layer, mlp) for layer in range(cfg.n_layers) for mlp in mlps]


def per_layer_parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Analytic parameter counts of :func:`build_per_layer_embeddings` (allocates nothing).

    ``tables``: every lookup row (per-layer token tables and n-gram sub-tables; not activated);
    ``projections``: the PLNE projections (activated); ``norm``: PLNE LayerNorms (``layernorm``
    amplification).
    """
    counts = {"tables": 0, "projections": 0, "norm": 0}
    slots = len(per_layer_slots(cfg))
    if slots == 0:
        return counts
    if cfg.per_layer.kind == "ple":
        counts["tables"] = slots * cfg.vocab_size * cfg.dense_hidden
    else:
        one = ngram_parameter_counts(cfg.per_layer.ngram, cfg.vocab_size, cfg.dense_hidden)
        counts["tables"] = slots * (one["token"] + one["tables"])
        counts["projections"] = slots * one["projections"]
        counts["norm"] = slots * one["norm"]
    return counts
