"""Hash hit and collision rates of the N-gram Embedding against table size (the paper's Figure 3).

For a sample of token sequences, every n-gram order ``n`` and every table size, each distinct n-gram (its
EOS-aware look-back context, exactly as the model hashes it) is mapped to a row with the model's own public hash
(:func:`models.ngram.ngram_hashes`), and we count:

- ``collision_rate``: the fraction of distinct n-grams that share their row with at least one other distinct
  n-gram (their embeddings are then forced to be the same vector);
- ``hit_rate``: distinct rows hit divided by distinct n-grams: the fraction of n-grams the table can tell apart
  (1 when every n-gram has a row of its own);
- ``token_collision_rate``: the same as ``collision_rate`` but weighted by occurrences (how often a lookup
  returns a shared row).

Table sizes are nominal sizes ``m``; each sizing policy turns ``m`` into the order's modulus as the model does
(``paper``: ``m + 2*idx + 1``, ``prime``: the next prime at or above that, ``exact``: ``m``), with one sub-table
per order (``K = 1``). Under the polynomial hash with base ``V0``, a 2-gram ``(a, b)`` lands on
``(b + a V0) mod M``; when ``M`` is near ``q V0`` only about ``q`` distinct values of ``a`` are told apart, so
2-gram collisions spike near integer multiples of ``V0`` (BRIEF section 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from embscale.models.config import NgramConfig

POLICIES = ("paper", "prime", "exact")


def default_table_sizes(vocab_size: int, low: float = 30.0, high: float = 33.0, coarse_step: float = 0.05,
                        dense_halfwidth: float = 0.004, dense_points: int = 9) -> list[int]:
    """Nominal sizes from ``low`` to ``high`` times ``V0``: a coarse grid plus dense points around every integer
    multiple of ``V0`` in the range, where the 2-gram collisions change fastest."""
    ratios = set(np.round(np.arange(low, high + 1e-9, coarse_step), 6))
    for multiple in range(int(np.ceil(low)), int(np.floor(high)) + 1):
        ratios.update(np.round(np.linspace(multiple - dense_halfwidth, multiple + dense_halfwidth, dense_points), 6))
    sizes = sorted({int(round(r * vocab_size)) for r in ratios if low <= r <= high})
    return sizes


def _distinct_ngrams(ids, max_order: int, eos_token_id: int | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each order: the distinct n-grams as ``(U, order)`` sequences oldest token first, and their counts."""
    import torch

    from embscale.models.ngram import ngram_context

    context = ngram_context(torch.as_tensor(ids, dtype=torch.int64), max_order, eos_token_id)
    context = context.reshape(-1, max_order).numpy()  # column j is t_{i-j}, 0 beyond the look-back
    result = {}
    for order in range(2, max_order + 1):
        grams, counts = np.unique(context[:, :order], axis=0, return_counts=True)
        result[order] = (np.ascontiguousarray(grams[:, ::-1]), counts)
    return result


def polynomial_hash(grams: np.ndarray, vocab_size: int, moduli: np.ndarray) -> np.ndarray:
    """``(sum_j t_{i-j} V0^j) mod M`` of ``(U, n)`` n-grams (oldest token first) for many moduli at once:
    ``(U, len(moduli))``. The numpy twin of :func:`models.ngram.ngram_hashes` for one sub-table per order, used
    to sweep many table sizes quickly; ``tests/test_collisions.py`` checks the two agree. Exact in int64 for
    ``V0 <= 2^21`` and ``M <= 2^31`` (same bound as the model's hash)."""
    moduli = np.asarray(moduli, dtype=np.int64)
    order = grams.shape[1]
    acc = np.zeros((grams.shape[0], len(moduli)), dtype=np.int64)
    for j in range(order):
        power = np.array([pow(vocab_size, j, int(m)) for m in moduli], dtype=np.int64)
        acc = (acc + grams[:, order - 1 - j, None].astype(np.int64) * power) % moduli
    return acc


def collision_table(ids, vocab_size: int, eos_token_id: int | None, sizes: Sequence[int],
                    policies: Iterable[str] = POLICIES, max_order: int = 4) -> pd.DataFrame:
    """Hit and collision rates per (policy, nominal size, order) for a ``(B, T)`` sample of token ids.

    Columns: ``policy``, ``table_size`` (nominal ``m``), ``ratio`` (``m / V0``), ``modulus`` (the row count the
    policy gives this order), ``modulus_ratio``, ``distance_to_multiple`` (``|M - q V0|`` for the nearest
    integer ``q``, in units of ``V0``), ``order``, ``distinct_ngrams``, ``rows_hit``, ``hit_rate``,
    ``collision_rate``, ``token_collision_rate``.
    """
    from embscale.models.ngram import table_moduli

    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"policy: unknown value {policy!r}; expected one of {', '.join(POLICIES)}")
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    distinct = _distinct_ngrams(ids, max_order, eos_token_id)
    rows = []
    for policy in policies:
        moduli = np.array([table_moduli(NgramConfig(n=max_order, k=1, ratio=size / vocab_size, sizing=policy),
                                        vocab_size) for size in sizes], dtype=np.int64)  # (sizes, orders)
        for order in range(2, max_order + 1):
            grams, counts = distinct[order]
            modulus = moduli[:, order - 2]
            buckets = polynomial_hash(grams, vocab_size, modulus)  # (U, sizes)
            for column, size in enumerate(sizes):
                bucket = buckets[:, column]
                m = int(modulus[column])
                per_row = np.bincount(bucket, minlength=m)
                shared = per_row[bucket] > 1
                hit = int(np.count_nonzero(per_row))
                multiple = max(1, round(m / vocab_size))
                rows.append({
                    "policy": policy, "table_size": size, "ratio": size / vocab_size, "modulus": m,
                    "modulus_ratio": m / vocab_size,
                    "distance_to_multiple": abs(m - multiple * vocab_size) / vocab_size,
                    "order": order, "distinct_ngrams": len(bucket), "rows_hit": hit,
                    "hit_rate": hit / len(bucket),
                    "collision_rate": float(shared.mean()),
                    "token_collision_rate": float((counts * shared).sum() / counts.sum()),
                })
    return pd.DataFrame(rows)


def spike_summary(table: pd.DataFrame, vocab_size: int, order: int = 2, near: float = 0.002) -> pd.DataFrame:
    """Mean collision rate of one order near integer multiples of ``V0`` (within ``near`` x V0 of the modulus)
    against elsewhere, per policy: the number the paper's Figure 3 is about."""
    sub = table[table["order"] == order]
    out = []
    for policy, group in sub.groupby("policy", sort=False):
        close = group["distance_to_multiple"] <= near
        out.append({
            "policy": policy, "order": order,
            "collision_near_multiple": float(group.loc[close, "collision_rate"].mean()) if close.any() else np.nan,
            "collision_elsewhere": float(group.loc[~close, "collision_rate"].mean()),
            "points_near": int(close.sum()), "points_elsewhere": int((~close).sum()),
        })
    return pd.DataFrame(out)
