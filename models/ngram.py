"""Hashed N-gram Embedding (NE), BRIEF section 1.

For token ``t_i`` with base vocabulary ``V0``, width ``D``, orders ``n = 2..N`` and ``K`` sub-tables per order
(``S = (N-1) K`` sub-tables of width ``d = D // S``)::

    e_i = 1/(S+1) * [ E0(t_i) + sum_{n,k} W_{n,k} E_{n,k}( H_{n,k}(t_{i-n+1}, ..., t_i) ) ]
    H_{n,k} = ( sum_{j=0..n-1} t_{i-j} * V0^j ) mod M_{n,k}

followed by the optional Embedding Amplification (``NgramConfig.amplification``).

Look-back rules (the released code's): positions before the sequence start count as token id 0; the
look-back resets after every EOS token. The EOS token belongs to the document it ends (as the current token it
hashes with its full look-back); the first token after an EOS sees only zeros behind it. Since a zero id adds
nothing to the polynomial, a masked position is simply a shorter n-gram.

The hash is public (:func:`ngram_hashes`, :func:`ngram_row_ids`): the collision analysis calls it and a Triton
kernel must reproduce it bit for bit.

Exactness in int64: the hash is accumulated as ``acc = (acc + t_{i-j} * (V0^j mod M)) mod M`` for
``j = 0..n-1``. With ``t < V0 <= 2^21`` and ``acc, V0^j mod M < M <= 2^31`` every intermediate is below
``2^31 + 2^21 * 2^31 = 2^31 + 2^52 < 2^63``, so it never overflows (``tests/test_ngram.py`` checks it against
Python integers at ``V0 = 2^21`` and ``M`` near ``2^31``). :func:`hash_plan` rejects larger sizes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embscale.base.errors import ConfigError
from embscale.models.config import NgramConfig
from embscale.models.sizes import (  # noqa: F401  (re-exported: the public home of the hash and its sizes)
    is_prime,
    modulus_report,
    next_prime,
    ngram_parameter_counts,
    table_moduli,
    table_orders,
)

MAX_VOCAB = 2**21  # token ids < 2^21
MAX_MODULUS = 2**31  # hash values < 2^31
BACKENDS = ("torch", "triton")  # NgramEmbedding's gather: plain PyTorch, or embscale.kernels.ngram's fused kernel


# ------------------------------------------------------------------------------------------------------------
# Hash plan (table sizes live in embscale.models.sizes, torch-free)
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HashPlan:
    """Everything the hash needs, as plain integers (computed once per ``(spec, V0)``).

    ``powers[j][s] = V0^j mod M_s`` for ``j < n_s`` and 0 for ``j >= n_s`` (so one loop over ``j = 0..N-1``
    serves every order at once); ``offsets[s]`` is sub-table ``s``'s first row in the concatenated table.
    """

    vocab_size: int
    max_order: int
    orders: tuple[int, ...]
    moduli: tuple[int, ...]
    powers: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    total_rows: int


@functools.lru_cache(maxsize=256)
def hash_plan(spec: NgramConfig, vocab_size: int) -> HashPlan:
    """The hash constants of ``spec`` at base vocabulary ``vocab_size``; raises ``ConfigError`` past the
    exactness limits (``V0 <= 2^21``, every ``M <= 2^31``)."""
    if not 2 <= vocab_size <= MAX_VOCAB:
        raise ConfigError("vocab_size",
                          f"n-gram hashing is exact in int64 for 2 <= V0 <= 2^21, got {vocab_size}")
    moduli = tuple(table_moduli(spec, vocab_size))
    if max(moduli) > MAX_MODULUS:
        raise ConfigError("ngram.ratio",
                          f"largest table modulus {max(moduli)} exceeds 2^31 (int64-exact limit); "
                          "lower the ratio")
    orders = tuple(n for n, _ in table_orders(spec))
    powers = tuple(tuple(pow(vocab_size, j, m) if j < n else 0 for n, m in zip(orders, moduli, strict=True))
                   for j in range(spec.n))
    offsets = tuple(sum(moduli[:s]) for s in range(len(moduli)))
    return HashPlan(vocab_size=vocab_size, max_order=spec.n, orders=orders, moduli=moduli, powers=powers,
                    offsets=offsets, total_rows=sum(moduli))


@functools.lru_cache(maxsize=64)
def _plan_tensors(plan: HashPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(moduli (S,), powers (N, S), offsets (S,)) as int64 tensors on ``device``, cached."""
    moduli = torch.tensor(plan.moduli, dtype=torch.int64, device=device)
    powers = torch.tensor(plan.powers, dtype=torch.int64, device=device)
    offsets = torch.tensor(plan.offsets, dtype=torch.int64, device=device)
    return moduli, powers, offsets


# ------------------------------------------------------------------------------------------------------------
# The hash
# ------------------------------------------------------------------------------------------------------------

def lookback_lengths(ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """How many earlier positions each token may see: ``(..., T)`` int64.

    A token starts a document when it is first in the sequence or its previous token is EOS; its look-back
    reaches back to its document's start. ``eos_token_id=None`` disables the reset (look-back = position).
    """
    time = ids.shape[-1]
    position = torch.arange(time, device=ids.device).expand(ids.shape)
    if eos_token_id is None:
        return position.clone()
    starts = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    starts[..., 1:] = ids[..., :-1] == eos_token_id
    document_start = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=-1).values
    return position - document_start


def ngram_context(ids: torch.Tensor, order: int, eos_token_id: int | None) -> torch.Tensor:
    """``(..., T, order)`` int64: entry ``j`` is ``t_{i-j}``, or 0 where ``j`` exceeds the look-back
    (before the sequence start, or before the token's document start)."""
    ids = ids.long()
    lookback = lookback_lengths(ids, eos_token_id)
    columns = [ids]
    for j in range(1, order):
        shifted = F.pad(ids[..., :-j], (j, 0)) if j < ids.shape[-1] else torch.zeros_like(ids)
        columns.append(shifted.masked_fill(lookback < j, 0))
    return torch.stack(columns, dim=-1)


def _hash_context(context: torch.Tensor, plan: HashPlan) -> torch.Tensor:
    """``(..., N)`` masked contexts (entry ``j`` = ``t_{i-j}`` or 0) -> ``(..., S)`` hashes."""
    moduli, powers, _ = _plan_tensors(plan, context.device)
    acc = torch.zeros((*context.shape[:-1], len(plan.moduli)), dtype=torch.int64, device=context.device)
    for j in range(plan.max_order):
        # acc < M <= 2^31, t < 2^21, power < 2^31: acc + t * power < 2^53, exact in int64
        acc = torch.remainder(acc + context[..., j:j + 1] * powers[j], moduli)
    return acc


def _hashes(ids: torch.Tensor, plan: HashPlan, eos_token_id: int | None) -> torch.Tensor:
    return _hash_context(ngram_context(ids, plan.max_order, eos_token_id), plan)  # context: (..., T, N)


def context_row_ids(context: torch.Tensor, plan: HashPlan) -> torch.Tensor:
    """Rows into the concatenated table from ready contexts ``(..., N)`` int64 (entry ``j`` is ``t_{i-j}``, 0 where
    masked, as :func:`ngram_context` makes them) -> ``(..., S)``. Decoding builds the contexts of new tokens from
    its N-gram cache and hashes only those; the result is bitwise :func:`ngram_row_ids` of the whole sequence."""
    _, _, offsets = _plan_tensors(plan, context.device)
    return _hash_context(context, plan) + offsets


def ngram_hashes(ids: torch.Tensor, spec: NgramConfig, vocab_size: int,
                 eos_token_id: int | None) -> torch.Tensor:
    """Raw per-sub-table hashes ``H_{n,k}``: ``(..., T)`` ids -> ``(..., T, S)`` int64, each in ``[0, M_s)``.

    Sub-table ``s = (n-2)*K + (k-1)`` hashes the n-gram ending at each position with
    ``(sum_{j<n} t_{i-j} V0^j) mod M_s``, masked ids counting as 0 (see the module docstring).
    ``ids`` must lie in ``[0, vocab_size)``; ``eos_token_id=None`` disables the EOS reset.
    """
    return _hashes(ids, hash_plan(spec, vocab_size), eos_token_id)


def ngram_row_ids(ids: torch.Tensor, spec: NgramConfig, vocab_size: int,
                  eos_token_id: int | None) -> torch.Tensor:
    """Rows into the concatenated table: :func:`ngram_hashes` plus each sub-table's row offset.
    ``(..., T)`` -> ``(..., T, S)`` int64, in ``[0, sum_s M_s)``."""
    plan = hash_plan(spec, vocab_size)
    _, _, offsets = _plan_tensors(plan, ids.device)
    return _hashes(ids, plan, eos_token_id) + offsets


# ------------------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------------------

class NgramEmbedding(nn.Module):
    """Token embedding plus hashed n-gram sub-tables, averaged (BRIEF section 1), then amplified.

    Parameters (names are part of the interface):

    - ``token``: ``nn.Embedding(V0, width)``, the ordinary table E0 (tie the LM head to ``token.weight``);
    - ``tables``: ``nn.Embedding(sum_s M_s, d)``, all sub-tables concatenated; sub-table ``s`` is rows
      ``offsets[s] : offsets[s] + M_s`` (``self.plan``);
    - ``projection``: ``nn.Linear(S*d, width, bias=False)``; ``W_s`` (``width x d``) is
      ``projection.weight[:, s*d:(s+1)*d]``;
    - ``norm``: ``nn.LayerNorm(width)`` for ``layernorm`` amplification, else ``None``.

    ``d = width // S``; a ``ModelConfig`` requires ``S`` to divide the width, the module itself accepts a
    remainder (the projection then reads ``S*d < width`` features). Initialisation: every table and the
    projection ``N(0, init_std^2)`` (0.02 by default), LayerNorm weight 1 and bias 0. Build with
    ``device="meta"`` for sizes that do not fit in memory.

    Amplification: ``none`` keeps the average; ``sqrt_d`` multiplies it by ``sqrt(width)``; ``layernorm``
    applies the LayerNorm (``eps = norm_eps``) to it; ``sqrt_count`` divides the sum by ``sqrt(S+1)``
    instead of ``S+1``. LayerNorm is invariant to the constant ``1/(S+1)``, so it is applied to the sum
    directly: at init the average has a variance near 1e-5 (tables at std 0.02, divided by ``S+1``), which a
    LayerNorm ``eps`` would swamp; normalising the sum is the same function with ``eps`` scaled by
    ``1/(S+1)^2``.

    Backends (opt-in; the default is the plain PyTorch form above): ``backend="triton"`` runs the whole lookup
    as :func:`embscale.kernels.ngram.ngram_embed`: one fused hash + gather kernel, the token rows and the
    projection in one ``addmm``, and a backward that sorts the token and n-gram lookups once and reduces both
    tables' gradients from that sort (on CUDA, or anywhere under ``TRITON_INTERPRET=1``; its PyTorch twins
    otherwise). ``sparse_grad=True`` (either backend) delivers the n-gram tables' gradient as a
    :class:`embscale.kernels.ngram.SparseRowGrad` (touched rows only, fp32, deterministic) appended to
    ``tables.weight.sparse_grads`` (one entry per backward) and leaves ``tables.weight.grad`` None; the table
    optimizer consumes and clears that list. ``sparse_token_grad=True`` does the same for ``token.weight``
    (then a table optimizer must train it too). ``projection`` stays a dense parameter. :meth:`set_backend`
    switches all three after construction.

    ``tables`` may be replaced after construction by another module with the same call (row ids ``(..., S)`` ->
    rows ``(..., S, d)``) and a ``weight`` holding the rows it trains, e.g. one whose rows are spread over
    several processes (``embscale.training.table_shard``); the lookup then takes the plain form above (the
    fused kernel reads a whole table in memory), and that module delivers the table's gradient.
    """

    def __init__(self, spec: NgramConfig, vocab_size: int, width: int, eos_token_id: int | None, *,
                 init_std: float = 0.02, norm_eps: float = 1e-6, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, backend: str = "torch", sparse_grad: bool = False,
                 sparse_token_grad: bool = False):
        super().__init__()
        self.spec = spec
        self.vocab_size = vocab_size
        self.width = width
        self.eos_token_id = eos_token_id
        self.init_std = init_std
        self.plan = hash_plan(spec, vocab_size)
        self.num_tables = spec.num_tables
        self.table_width = spec.table_width(width)
        if self.table_width < 1:
            raise ConfigError("ngram.k", f"sub-table width {width} // {self.num_tables} is zero")
        factory = {"device": device, "dtype": dtype}
        self.token = nn.Embedding(vocab_size, width, **factory)
        self.tables = nn.Embedding(self.plan.total_rows, self.table_width, **factory)
        self.projection = nn.Linear(self.num_tables * self.table_width, width, bias=False, **factory)
        layernorm = spec.amplification == "layernorm"
        self.norm = nn.LayerNorm(width, eps=norm_eps, **factory) if layernorm else None
        # The average and the amplification are one constant factor (none for layernorm: see the class doc).
        count = self.num_tables + 1
        self.scale = {"none": 1.0 / count, "sqrt_d": math.sqrt(width) / count, "layernorm": 1.0,
                      "sqrt_count": 1.0 / math.sqrt(count)}[spec.amplification]
        self.set_backend(backend, sparse_grad=sparse_grad, sparse_token_grad=sparse_token_grad)
        self.reset_parameters()

    def set_backend(self, backend: str, *, sparse_grad: bool = False, sparse_token_grad: bool = False) -> None:
        """How the lookup runs (the math is the same): ``backend`` ``torch`` or ``triton``, and whether the n-gram
        tables' (``sparse_grad``) and the token table's (``sparse_token_grad``) gradients come as touched rows in
        ``weight.sparse_grads`` for a table optimizer, instead of a dense ``weight.grad``."""
        if backend not in BACKENDS:
            raise ConfigError("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.sparse_grad = sparse_grad
        self.sparse_token_grad = sparse_token_grad
        for weight, sparse in ((self.tables.weight, sparse_grad), (self.token.weight, sparse_token_grad)):
            if sparse and not hasattr(weight, "sparse_grads"):
                weight.sparse_grads = []  # embscale.kernels.ngram appends one SparseRowGrad per backward

    def reset_parameters(self) -> None:
        for weight in (self.token.weight, self.tables.weight, self.projection.weight):
            nn.init.normal_(weight, mean=0.0, std=self.init_std)
        if self.norm is not None:
            self.norm.reset_parameters()

    def row_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, S) rows into ``tables`` (see :func:`ngram_row_ids`)."""
        _, _, offsets = _plan_tensors(self.plan, ids.device)
        return _hashes(ids, self.plan, self.eos_token_id) + offsets

    def _finish(self, summed: torch.Tensor) -> torch.Tensor:
        """Sum of the S+1 vectors -> average, amplified."""
        return self.norm(summed) if self.norm is not None else summed * self.scale

    def forward(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, width). ``rows`` may pass precomputed :meth:`row_ids` (layers sharing a
        hash)."""
        fused = self.backend != "torch" or self.sparse_grad or self.sparse_token_grad
        if fused and type(self.tables) is nn.Embedding:  # the fused kernel reads the whole table in memory
            from embscale.kernels.ngram import ngram_embed  # PyTorch twins without CUDA

            # one fused hash + gather (padded to an aligned width, in the GEMM's dtype), the token rows and
            # the projection summed and averaged in one addmm; one shared sort in the backward
            dtype = (torch.get_autocast_dtype(ids.device.type) if torch.is_autocast_enabled(ids.device.type)
                     else self.projection.weight.dtype)
            scale = 1.0 if self.norm is not None else self.scale
            summed = ngram_embed(self.token.weight, self.tables.weight, self.projection.weight, ids, self.plan,
                                 self.eos_token_id, scale, dtype, rows=rows, backend=self.backend,
                                 sparse_table=self.sparse_grad, sparse_token=self.sparse_token_grad)
            return self.norm(summed) if self.norm is not None else summed
        if rows is None:
            rows = self.row_ids(ids)
        gathered = self.tables(rows)  # (B, T, S, d): one gather, concatenated table
        ngram = F.linear(gathered.flatten(-2), self.projection.weight)  # (B, T, width): one GEMM S*d -> width
        return self._finish(self.token(ids) + ngram)

    def token_only(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, width): the formula with the n-gram sum left out (no hashing, no table lookup),
        ``finish(E0(t))``: the plain embedding a speculative draft built from this model's trunk reads."""
        return self._finish(self.token(ids))

    def forward_reference(self, ids: torch.Tensor) -> torch.Tensor:
        """The formula term by term: per sub-table lookup and projection. Same parameters and result as
        :meth:`forward`; tests use it to check the efficient form."""
        hashes = _hashes(ids, self.plan, self.eos_token_id)  # (B, T, S)
        d = self.table_width
        summed = self.token(ids)
        for s, (offset, modulus) in enumerate(zip(self.plan.offsets, self.plan.moduli, strict=True)):
            table = self.tables.weight[offset:offset + modulus]  # E_{n,k}: (M_s, d)
            projection = self.projection.weight[:, s * d:(s + 1) * d]  # W_{n,k}: (width, d)
            summed = summed + F.linear(F.embedding(hashes[..., s], table), projection)
        return self._finish(summed)

    def extra_repr(self) -> str:
        return (f"n={self.spec.n}, k={self.spec.k}, sub_tables={self.num_tables}, d={self.table_width}, "
                f"rows={self.plan.total_rows}, sizing={self.spec.sizing}, "
                f"amplification={self.spec.amplification}")


__all__ = [
    "HashPlan",
    "NgramEmbedding",
    "hash_plan",
    "is_prime",
    "lookback_lengths",
    "modulus_report",
    "next_prime",
    "context_row_ids",
    "ngram_context",
    "ngram_hashes",
    "ngram_parameter_counts",
    "ngram_row_ids",
    "table_moduli",
    "table_orders",
]
