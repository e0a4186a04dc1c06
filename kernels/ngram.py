"""Fused N-gram Embedding gather (Triton) and its sparse, deterministic table gradient.

Forward (:func:`ngram_gather`): token ids ``(B, T)`` and a :class:`embscale.models.ngram.HashPlan` -> the gathered
rows of the concatenated table, ``(B*T, W)``, and the row ids ``(B*T, S)`` (int32 below 2^31 table rows, kept
for the backward). One kernel hashes and gathers: program ``(i, s)`` takes ``BLOCK_T`` tokens and sub-table
``s``, loads their ``N`` context ids, walks the look-back in-kernel (``alive_j = alive_{j-1} and i-j >= 0 and
t_{i-j} != EOS``: a token never sees an EOS behind it nor anything before one, while an EOS as the current
token hashes with its full look-back; context beyond the sequence start is id 0), accumulates the hash
(``acc = (acc + t_{i-j} * (V0^j mod M_s)) mod M_s``, exact in int64 as in :mod:`embscale.models.ngram`), adds
the row offset, writes the row id and copies the row (``d`` features) straight into its slot of the output,
cast to the GEMM's dtype. ``W`` is ``S*d`` rounded up to a multiple of :data:`ALIGN` (zeros past ``S*d``):
with an unaligned ``K`` (``S*d = 1020`` at the benchmark shape) cuBLAS falls back to its slower sm80 kernels,
with ``K = 1024`` it runs its sm90 ones (timings in BENCHMARKS.md).

The whole lookup (:func:`ngram_embed`, what :class:`embscale.models.ngram.NgramEmbedding` runs with
``backend="triton"``): the gather kernel also writes each token's sort key (``total_rows + token id``) beside its
n-gram rows, the token rows are gathered by ``F.embedding`` into the output buffer, and one ``addmm`` adds the
projection and averages. Its backward: two GEMMs (the gathered buffer's gradient, unscaled, and the
projection's), then ONE stable sort of all ``T*(S+1)`` keys (:func:`sort_segments`; int32 keys: half the radix
passes of int64) and a device cumsum of the segment starts. The n-gram lookups sort first and the token lookups
after them, so each table's reduction is a :class:`Part` of the same sort, read straight from its gradient
buffer (no slicing copies) and scaled by the average's factor on the way. The token table thus shares the
n-gram tables' sort instead of running torch's embedding backward (a sort and scatter of its own).

Reduction (:func:`triton_segment_sum`), in fp32, in a fixed order, with no host synchronisation: program
``(c, b)`` takes :data:`SEGMENT_CHUNK` sorted positions and :data:`SEGMENT_BLOCK_D` columns; every lane loads
its lookup's row and a segmented scan over the chunk (a fixed tree) leaves each run's sum at its last lane.
Runs inside the chunk are final; a run crossing a chunk boundary leaves its pieces in a small ``carry`` buffer
that a second kernel adds in chunk order. No lane walks a run, so a row looked up thousands of times (frequent
n-grams and tokens in real text) costs what a row looked up once does, plus ``count / CHUNK`` carried pieces:
skewed (Zipf-distributed) ids cost about what uniform ones do. Nothing table-sized is allocated and two
backwards are bit-identical. The result is a padded :class:`SparseRowGrad` (``P`` = the part's lookups: the
distinct rows ascending, then :data:`PAD_ROW`), so its size is known without reading the device and the whole
forward + backward can be captured in a CUDA graph. :func:`sparse_row_grad` is the same reduction for one
flat array of per-lookup rows; :func:`merge_sparse_grads` re-reduces a list of them (micro-batches);
:func:`dense_row_grad` writes the same sums into a dense gradient.

Autograd: :func:`ngram_embed` (above). With sparse gradients
the backward appends the :class:`SparseRowGrad` to ``weight.sparse_grads`` (a list; one entry per backward) and
returns no gradient, so ``weight.grad`` stays None; otherwise it writes the dense gradient (deterministic too).
Eagerly the call is bound by the host (about 16 launches from Python); inside a model step the GPU's queue
hides that, since nothing in the call synchronises.

Every kernel has a plain-PyTorch twin (``reference_*``) that defines its meaning; the Triton versions run on
CUDA tensors, or anywhere with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests). Kernels
are jitted on first use, not at import, so the interpreter switch is read at the first launch and this module
imports without a GPU (or without Triton).

The measurements behind these choices (launch shapes, the aligned width, each step's predicted and measured
time) are in BENCHMARKS.md, "Measurements behind the kernels' design".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

try:  # a CPU-only install may lack Triton: the reference twins still work
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None
    tl = None

from embscale.kernels.runtime import interpreting, lazy_kernels, triton_usable
from embscale.kernels.runtime import next_pow2 as _next_pow2


class Plan(Protocol):
    """The fields of :class:`embscale.models.ngram.HashPlan` used here (duck-typed: kernels never import
    embscale.models)."""

    vocab_size: int
    max_order: int
    moduli: tuple[int, ...]
    powers: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    total_rows: int


PAD_ROW = 2**63 - 1  # the row id of a SparseRowGrad's padding slots: sorts after every real row
ALIGN = 8  # the gathered buffer's row length is a multiple of this (16 bytes in bf16): cuBLAS's fast path
# Launch shapes, chosen by sweeps at the benchmark shape (196,608 lookups of 85 bf16 features, 16,384 token rows
# of 1024; the numbers are in BENCHMARKS.md). The sweep matters: larger gather tiles were many times slower, and
# more segment-sum warps or other chunk sizes slower too. Gather: 32 tokens x 1 warp per program. Segment sum (a
# scan per chunk): 32 positions x 64 columns x 1 warp. Carry: 16 chunks x 1 warp.
GATHER_BLOCK_T = 32
GATHER_WARPS = 1
SEGMENT_CHUNK = 32
SEGMENT_WARPS = 1
SEGMENT_BLOCK_D = 64  # columns per program of the segment sum (d = 85 in two, the token table's 1024 in 16)
CARRY_BLOCK = 16
CARRY_WARPS = 1


@dataclass
class SparseRowGrad:
    """The gradient of a table restricted to the rows it touched, padded to a size known without reading
    the device: ``rows`` (P,) int64 ascending, the first ``U`` the distinct touched rows and the rest
    :data:`PAD_ROW`; ``values`` (P, d) fp32, row ``i`` the gradient of table row ``rows[i]``, zero at the
    padding. ``P`` is the number of lookups (micro-batches merged: their sum), so producing it needs no host
    synchronisation; consumers skip the padding (``rows == PAD_ROW``, or ``rows >= num_rows``)."""

    rows: torch.Tensor
    values: torch.Tensor

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (U,), values (U, d))`` without the padding (reads ``U``: a host synchronisation)."""
        keep = self.rows != PAD_ROW
        return self.rows[keep], self.values[keep]

    def to_dense(self, num_rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The equivalent dense ``(num_rows, d)`` gradient (tests and small tables only)."""
        rows, values = self.compact()
        dense = torch.zeros(num_rows, self.values.shape[1], dtype=dtype or self.values.dtype,
                            device=self.values.device)
        return dense.index_copy_(0, rows, values.to(dense.dtype))


# ------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _plan_tensors(plan: Plan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(moduli (S,), powers (N, S), offsets (S,)) int64 on ``device``, cached per plan."""
    moduli = torch.tensor(plan.moduli, dtype=torch.int64, device=device)
    powers = torch.tensor(plan.powers, dtype=torch.int64, device=device)
    offsets = torch.tensor(plan.offsets, dtype=torch.int64, device=device)
    return moduli, powers, offsets


# ------------------------------------------------------------------------------------------------------------
# Forward: hash + gather
# ------------------------------------------------------------------------------------------------------------

def reference_row_ids(ids: torch.Tensor, plan: Plan, eos_token_id: int | None) -> torch.Tensor:
    """Rows into the concatenated table, ``(..., T)`` -> ``(..., T, S)`` int64: the same walk-back as the
    kernel, in plain PyTorch (a second, independent writing of :func:`embscale.models.ngram.ngram_row_ids`)."""
    ids = ids.long()
    moduli, powers, offsets = _plan_tensors(plan, ids.device)
    time = ids.shape[-1]
    acc = torch.zeros((*ids.shape, len(plan.moduli)), dtype=torch.int64, device=ids.device)
    alive = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    for j in range(plan.max_order):
        if j == 0:
            context = ids
        else:
            previous = torch.zeros_like(ids)
            if j < time:
                previous[..., j:] = ids[..., :-j]
            alive = alive.clone()
            alive[..., :min(j, time)] = False  # before the sequence start
            if eos_token_id is not None:
                alive &= previous != eos_token_id  # an EOS behind the token ends its look-back
            context = torch.where(alive, previous, torch.zeros_like(previous))
        acc = torch.remainder(acc + context.unsqueeze(-1) * powers[j], moduli)
    return acc + offsets


def _gather_kernel(ids_ptr, rows_in_ptr, weight_ptr, out_ptr, rows_out_ptr, moduli_ptr, powers_ptr, offsets_ptr,
                   n_tokens, seq_len, eos_id, d, stride_w, stride_out, width, token_key_offset,
                   S: tl.constexpr, N: tl.constexpr, HASH: tl.constexpr, HAS_EOS: tl.constexpr,
                   TOKEN_KEYS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                   PAD_BLOCK: tl.constexpr):
    # program (i, s): tokens i*BLOCK_T .. +BLOCK_T, sub-table s. With TOKEN_KEYS the row ids are written
    # (T, S+1), column S holding the token's key (token id + token_key_offset) for a shared backward sort.
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # flat position b*T + t
    s = tl.program_id(1)
    tmask = tok < n_tokens
    keys_width = S + 1 if TOKEN_KEYS else S
    if HASH:
        pos = tok % seq_len
        modulus = tl.load(moduli_ptr + s)
        acc = tl.zeros([BLOCK_T], dtype=tl.int64)
        alive = tmask
        for j in tl.static_range(N):
            t = tl.load(ids_ptr + tok - j, mask=alive & (pos >= j), other=0).to(tl.int64)
            if j > 0:
                alive = alive & (pos >= j)
                if HAS_EOS:
                    alive = alive & (t != eos_id)  # an EOS behind the token: its document starts after it
                t = tl.where(alive, t, 0)
            power = tl.load(powers_ptr + j * S + s)  # 0 past the sub-table's order
            # acc < M <= 2^31, t < 2^21, power < 2^31: below 2^53, exact in int64
            acc = (acc + t * power) % modulus
        row = acc + tl.load(offsets_ptr + s)
        tl.store(rows_out_ptr + tok * keys_width + s, row.to(rows_out_ptr.dtype.element_ty), mask=tmask)
    else:
        row = tl.load(rows_in_ptr + tok * S + s, mask=tmask, other=0).to(tl.int64)
        if TOKEN_KEYS:
            tl.store(rows_out_ptr + tok * keys_width + s, row.to(rows_out_ptr.dtype.element_ty), mask=tmask)
    if TOKEN_KEYS:
        if s == S - 1:
            token = tl.load(ids_ptr + tok, mask=tmask, other=0).to(tl.int64)
            tl.store(rows_out_ptr + tok * keys_width + S, (token + token_key_offset).to(rows_out_ptr.dtype.element_ty),
                     mask=tmask)
    cols = tl.arange(0, BLOCK_D)
    mask = tmask[:, None] & (cols < d)[None, :]
    values = tl.load(weight_ptr + row[:, None] * stride_w + cols[None, :], mask=mask)
    tl.store(out_ptr + tok[:, None] * stride_out + s * d + cols[None, :],
             values.to(out_ptr.dtype.element_ty), mask=mask)
    if PAD_BLOCK > 0:  # the alignment columns past S*d are zeros (the padded projection reads them)
        if s == S - 1:
            pad = width + tl.arange(0, PAD_BLOCK)
            pad_mask = tmask[:, None] & (pad < stride_out)[None, :]
            tl.store(out_ptr + tok[:, None] * stride_out + pad[None, :],
                     tl.zeros([BLOCK_T, PAD_BLOCK], dtype=out_ptr.dtype.element_ty), mask=pad_mask)


def padded_width(width: int, multiple: int = ALIGN) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (the gathered buffer's row length)."""
    return -(-width // multiple) * multiple


def row_id_dtype(total_rows: int) -> torch.dtype:
    """int32 row ids while the table has fewer than 2^31 rows (half the bytes, half the radix passes of the
    backward's sort), int64 beyond."""
    return torch.int32 if total_rows < 2**31 else torch.int64


def triton_gather(ids: torch.Tensor, weight: torch.Tensor, plan: Plan, eos_token_id: int | None,
                  rows: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None, pad: bool = False,
                  token_keys: bool = False, block_t: int | None = None, num_warps: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash (unless ``rows`` is given) and gather in one kernel: ``(gathered (B*T, W), rows (B*T, S))``.

    ``ids`` ``(..., T)``; ``weight`` the concatenated table ``(total_rows, d)`` (any row stride). ``W = S*d``,
    or with ``pad=True`` :func:`padded_width` of it, the extra columns zero. ``out_dtype`` (default the
    table's) is the gathered buffer's dtype: the kernel casts on store. Row ids are :func:`row_id_dtype`.
    ``token_keys=True``: the row ids come back ``(B*T, S+1)``, column ``S`` the token's key ``token id +
    total_rows`` (:func:`token_key_dtype`), so one sort serves the token table and the n-gram tables."""
    num_tables, d = len(plan.moduli), weight.shape[1]
    seq_len = ids.shape[-1]
    ids = ids.reshape(-1).contiguous()
    n_tokens = ids.numel()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    width = num_tables * d
    stride_out = padded_width(width) if pad else width
    out = torch.empty(n_tokens, stride_out, dtype=out_dtype or weight.dtype, device=weight.device)
    moduli, powers, offsets = _plan_tensors(plan, weight.device)
    keys_dtype = token_key_dtype(plan) if token_keys else row_id_dtype(plan.total_rows)
    keys_width = num_tables + 1 if token_keys else num_tables
    if rows is None or token_keys:
        rows_out = torch.empty(n_tokens, keys_width, dtype=keys_dtype, device=weight.device)
    rows_in = rows_out if rows is None else rows.reshape(n_tokens, num_tables).contiguous()
    if rows is not None and not token_keys:
        rows_out = rows_in
    if n_tokens == 0:
        return out, rows_out
    block_t = block_t or GATHER_BLOCK_T
    num_warps = num_warps or GATHER_WARPS
    pad_block = _next_pow2(stride_out - width) if stride_out > width else 0
    common = dict(S=num_tables, N=plan.max_order, HASH=rows is None, HAS_EOS=eos_token_id is not None,
                  TOKEN_KEYS=token_keys, BLOCK_T=block_t, BLOCK_D=_next_pow2(d), PAD_BLOCK=pad_block,
                  num_warps=num_warps)
    args = (ids, rows_in, weight, out, rows_out, moduli, powers, offsets, n_tokens, seq_len,
            -1 if eos_token_id is None else eos_token_id, d, weight.stride(0), stride_out, width, plan.total_rows)
    _kernels()["gather"][(triton.cdiv(n_tokens, block_t), num_tables)](*args, **common)
    return out, rows_out


def token_key_dtype(plan: Plan) -> torch.dtype:
    """The dtype of the shared sort keys (n-gram rows, then ``total_rows + token id``)."""
    return row_id_dtype(plan.total_rows + plan.vocab_size)


def reference_gather(ids: torch.Tensor, weight: torch.Tensor, plan: Plan, eos_token_id: int | None,
                     rows: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None, pad: bool = False,
                     token_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`triton_gather` (same outputs, same dtypes)."""
    if rows is None:
        rows = reference_row_ids(ids, plan, eos_token_id).to(row_id_dtype(plan.total_rows))
    rows = rows.reshape(-1, len(plan.moduli))
    gathered = weight[rows.reshape(-1).long()].reshape(rows.shape[0], -1).to(out_dtype or weight.dtype)
    if pad and padded_width(gathered.shape[1]) != gathered.shape[1]:
        gathered = F.pad(gathered, (0, padded_width(gathered.shape[1]) - gathered.shape[1]))
    if token_keys:
        token = ids.reshape(-1, 1).long() + plan.total_rows
        rows = torch.cat([rows.long(), token], dim=1).to(token_key_dtype(plan))
    return gathered, rows


def ngram_gather(ids: torch.Tensor, weight: torch.Tensor, plan: Plan, eos_token_id: int | None,
                 rows: torch.Tensor | None = None, use_triton: bool | None = None, **options
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel where usable (CUDA, or the interpreter), the twin otherwise; no autograd. ``options``:
    ``out_dtype``, ``pad`` (see :func:`triton_gather`)."""
    if use_triton is None:
        use_triton = triton_usable(weight.device)
    fn = triton_gather if use_triton else reference_gather
    return fn(ids, weight, plan, eos_token_id, rows=rows, **options)


# ------------------------------------------------------------------------------------------------------------
# Backward: deterministic segment reduce into the touched rows
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Segments:
    """Row ids sorted (stably) for a deterministic reduction, all on the device, nothing read by the host.

    ``keys`` (R,) the sorted row ids; ``order`` (R,) int64: ``keys[i]`` came from lookup ``order[i]``;
    ``boundaries`` (R-1,) int32: ``boundaries[i-1]`` is the number of segment starts among ``keys[1..i]``, so
    position ``i`` belongs to segment ``boundaries[i-1]`` (position 0 to segment 0) and ``U = 1 +
    boundaries[-1]`` (U = R for R <= 1)."""

    keys: torch.Tensor
    order: torch.Tensor
    boundaries: torch.Tensor


def sort_segments(rows: torch.Tensor) -> Segments:
    """Stable sort of the flat row ids and the running segment count; int32 keys stay int32 (half the radix
    passes of int64)."""
    keys, order = torch.sort(rows.reshape(-1), stable=True)
    boundaries = torch.cumsum(keys[1:] != keys[:-1], 0, dtype=torch.int32)
    return Segments(keys=keys, order=order, boundaries=boundaries)


@dataclass(frozen=True)
class Part:
    """Which sorted positions to reduce and where their gradient rows live (the shared sort of
    :func:`ngram_embed` holds the n-gram lookups first and the token lookups after them).

    Positions ``first .. first + count`` of the :class:`Segments`; lookup ``o`` (an ``order`` value) reads
    ``values[o // group, (o % group) * col_step : ... + width]``; the reduced row's id is its key minus
    ``key_offset``; each reduced row is multiplied by ``scale``. The defaults describe one flat ``(R, d)``
    array of per-lookup rows."""

    first: int = 0
    count: int | None = None  # None: to the end
    width: int | None = None  # None: values.shape[1]
    group: int = 1
    col_step: int = 0
    key_offset: int = 0
    scale: float = 1.0

    def resolve(self, segments: Segments, values: torch.Tensor) -> tuple[int, int]:
        """(count, width) with the defaults filled in."""
        count = segments.keys.numel() - self.first if self.count is None else self.count
        return count, values.shape[1] if self.width is None else self.width


WHOLE = Part()


def reference_segment_sum(values: torch.Tensor, segments: Segments, dense_rows: int | None = None,
                          out_dtype: torch.dtype | None = None, part: Part = WHOLE
                          ) -> torch.Tensor | SparseRowGrad:
    """Twin of the segment-sum kernel. Each distinct row's gradient is the fp32 sum of its lookups' rows,
    added in sorted (row, lookup) order (``index_add_`` on CPU walks the index sequentially, so the sums
    match the kernel's bit for bit when no run crosses a chunk; on CUDA it is atomic and only the kernel is
    deterministic), times ``part.scale``.

    ``dense_rows=None``: a padded :class:`SparseRowGrad` (``count`` slots: the ``U`` distinct rows ascending,
    then :data:`PAD_ROW` with zero values). Otherwise the dense ``(dense_rows, d)`` gradient in
    ``out_dtype`` (default ``values.dtype``)."""
    count, d = part.resolve(segments, values)
    keys = segments.keys[part.first:part.first + count].long() - part.key_offset
    order = segments.order[part.first:part.first + count]
    lookup, slot = order // part.group, order % part.group
    cols = slot[:, None] * part.col_step + torch.arange(d, device=values.device)
    rows_values = values[lookup[:, None], cols].float()  # (count, d)
    unique, counts = torch.unique_consecutive(keys, return_counts=True)
    segment = torch.repeat_interleave(torch.arange(unique.numel(), device=values.device), counts)
    sums = torch.zeros(unique.numel(), d, dtype=torch.float32, device=values.device)
    sums.index_add_(0, segment, rows_values)
    if part.scale != 1.0:
        sums *= part.scale
    if dense_rows is not None:
        dense = torch.zeros(dense_rows, d, dtype=out_dtype or values.dtype, device=values.device)
        return dense.index_copy_(0, unique, sums.to(dense.dtype))
    rows = torch.full((count,), PAD_ROW, dtype=torch.int64, device=values.device)
    rows[:unique.numel()] = unique
    out = torch.zeros(count, d, dtype=torch.float32, device=values.device)
    out[:unique.numel()] = sums
    return SparseRowGrad(rows=rows, values=out)


_segmented_add = None  # the jitted combine below, set by _build_kernels before any kernel is compiled


def _segmented_add_fn(flag_a, value_a, flag_b, value_b):
    # combine of a segmented inclusive sum: a set flag starts a new run
    return flag_a | flag_b, tl.where(flag_b != 0, value_b, value_a + value_b)


def _segment_sum_kernel(keys_ptr, order_ptr, boundaries_ptr, base_ptr, values_ptr, out_ptr, rows_out_ptr,
                        carry_ptr, first, n, d, stride_v, group, col_step, key_offset, scale, pad_row,
                        DENSE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (c, b) reduces sorted positions first + c*CHUNK .. +CHUNK of the part, columns b*BLOCK_D ..
    # +BLOCK_D: each lane loads its lookup's row, and a segmented inclusive scan over the chunk (a fixed tree:
    # deterministic) leaves each run's sum at its last lane. A run wholly inside the chunk is final and
    # written out; the chunk's first run, when it began in an earlier chunk, and its last run, when it goes on
    # into the next, are left in carry[2c] and carry[2c+1] for _segment_carry_kernel. No serial walk: a row
    # looked up thousands of times costs what a row looked up once does, plus thousands / CHUNK carried
    # pieces. Segment numbers are relative to the part (base: the segment starts before it).
    c = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    lane = tl.arange(0, CHUNK)
    stop = first + n
    chunk_first = first + c * CHUNK + lane * 0
    k = chunk_first + lane  # sorted positions
    kmask = k < stop
    key = tl.load(keys_ptr + k, mask=kmask, other=0)
    previous = tl.load(keys_ptr + k - 1, mask=kmask & (k > first), other=0)
    head = kmask & ((k == first) | (key != previous))  # a row (segment) starts here
    following = tl.load(keys_ptr + k + 1, mask=k + 1 < stop, other=0)
    run_end = kmask & ((k + 1 == stop) | (following != key) | (lane == CHUNK - 1))
    continues = run_end & (lane == CHUNK - 1) & (k + 1 < stop) & (following == key)  # into the next chunk
    first_key = tl.load(keys_ptr + chunk_first)
    before_first = tl.load(keys_ptr + chunk_first - 1, mask=chunk_first > first, other=0)
    first_is_head = (chunk_first == first) | (before_first != first_key)
    from_before = (first_is_head == 0) & (key == first_key)  # the chunk's first run began in an earlier chunk
    base = tl.load(base_ptr + lane * 0)
    segment = tl.load(boundaries_ptr + k - 1, mask=kmask & (k > 0), other=0).to(tl.int64) - base
    segment = tl.where(k == first, 0, segment)

    source = tl.load(order_ptr + k, mask=kmask, other=0).to(tl.int64)
    lookup = source // group
    offset = (source - lookup * group) * col_step
    values = tl.load(values_ptr + lookup[:, None] * stride_v + offset[:, None] + cols[None, :],
                     mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    starts = tl.broadcast_to((head | (lane == 0)).to(tl.int32)[:, None], (CHUNK, BLOCK_D))
    _, sums = tl.associative_scan((starts, values), 0, _segmented_add)
    sums = sums * scale
    whole = run_end & (from_before == 0) & (continues == 0)
    if DENSE:
        tl.store(out_ptr + (key.to(tl.int64) - key_offset)[:, None] * d + cols[None, :],
                 sums.to(out_ptr.dtype.element_ty), mask=whole[:, None] & cmask[None, :])
    else:
        tl.store(out_ptr + segment[:, None] * d + cols[None, :], sums, mask=whole[:, None] & cmask[None, :])
    tl.store(carry_ptr + (2 * c + lane * 0)[:, None] * d + cols[None, :], sums,
             mask=(run_end & from_before)[:, None] & cmask[None, :])
    tl.store(carry_ptr + (2 * c + 1 + lane * 0)[:, None] * d + cols[None, :], sums,
             mask=(run_end & (from_before == 0) & continues)[:, None] & cmask[None, :])
    if not DENSE:
        lasts = stop - 2 + lane * 0
        num_unique = tl.load(boundaries_ptr + lasts, mask=lasts >= 0, other=0) - base + 1
        num_unique = tl.where(lasts >= first, num_unique, 1)  # one position: one row
        padding = kmask & (k - first >= num_unique)
        tl.store(out_ptr + (k - first)[:, None] * d + cols[None, :], tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32),
                 mask=padding[:, None] & cmask[None, :])
        if tl.program_id(1) == 0:
            tl.store(rows_out_ptr + segment, key.to(tl.int64) - key_offset, mask=head)
            tl.store(rows_out_ptr + k - first, tl.full([CHUNK], pad_row, tl.int64), mask=padding)


def _segment_carry_kernel(keys_ptr, boundaries_ptr, base_ptr, out_ptr, carry_ptr, first, n, num_chunks, d,
                          key_offset, DENSE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # Lane c: when chunk c owns a run that goes on into later chunks, add the carried pieces of the chunks it
    # spans, in chunk order, and write the row (columns b*BLOCK_D .. +BLOCK_D of program (i, b)).
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    stop = first + n
    chunk_first = first + c * CHUNK
    last = tl.minimum(chunk_first + CHUNK, stop) - 1
    cmask_c = c < num_chunks
    key = tl.load(keys_ptr + last, mask=cmask_c, other=0)
    before = tl.load(keys_ptr + chunk_first - 1, mask=cmask_c & (c > 0), other=0)
    began_here = (c == 0) | (before != key)
    after = tl.load(keys_ptr + chunk_first + CHUNK, mask=cmask_c & (chunk_first + CHUNK < stop), other=0)
    owner = cmask_c & began_here & (chunk_first + CHUNK < stop) & (after == key)
    base = tl.load(base_ptr + c * 0)
    slot = tl.load(boundaries_ptr + last - 1, mask=owner & (last > first), other=0).to(tl.int64) - base
    slot = tl.where(last > first, slot, 0)
    acc = tl.load(carry_ptr + (2 * c + 1)[:, None] * d + cols[None, :], mask=owner[:, None] & cmask[None, :],
                  other=0.0)
    nxt = c + 1
    active = owner
    while tl.max(active.to(tl.int32), axis=0) > 0:
        acc += tl.load(carry_ptr + (2 * nxt)[:, None] * d + cols[None, :],
                       mask=active[:, None] & cmask[None, :], other=0.0)
        nxt += 1
        active = active & (first + nxt * CHUNK < stop)
        active = active & (tl.load(keys_ptr + first + nxt * CHUNK, mask=active, other=0) == key)
    if DENSE:
        tl.store(out_ptr + (key.to(tl.int64) - key_offset)[:, None] * d + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=owner[:, None] & cmask[None, :])
    else:
        tl.store(out_ptr + slot[:, None] * d + cols[None, :], acc, mask=owner[:, None] & cmask[None, :])


def triton_segment_sum(values: torch.Tensor, segments: Segments, dense_rows: int | None = None,
                       out_dtype: torch.dtype | None = None, part: Part = WHOLE, num_warps: int | None = None
                       ) -> torch.Tensor | SparseRowGrad:
    """Kernel form of :func:`reference_segment_sum` (same outputs up to fp32 summation order; deterministic;
    no host synchronisation). Two launches: per chunk of :data:`SEGMENT_CHUNK` sorted positions and
    :data:`SEGMENT_BLOCK_D` columns, a segmented scan of its rows; then the rows that span chunks, their
    pieces added in chunk order. Skewed counts (frequent n-grams) cost no serial walk."""
    if values.stride(1) != 1:
        values = values.contiguous()
    num_warps = num_warps or SEGMENT_WARPS
    count, d = part.resolve(segments, values)
    if dense_rows is not None:
        out = torch.zeros(dense_rows, d, dtype=out_dtype or values.dtype, device=values.device)
        rows_out = segments.keys  # unused
    else:
        out = torch.empty(count, d, dtype=torch.float32, device=values.device)
        rows_out = torch.empty(count, dtype=torch.int64, device=values.device)
    if count:
        chunk = SEGMENT_CHUNK
        num_chunks = triton.cdiv(count, chunk)
        carry = torch.empty(2 * num_chunks, d, dtype=torch.float32, device=values.device)
        # segment starts before the part: boundaries[first - 1] (a view, nothing read by the host)
        base = segments.boundaries[part.first - 1:part.first] if part.first > 0 else _zero(values.device)
        boundaries = segments.boundaries if segments.keys.numel() > 1 else base  # never read when R == 1
        block_d = min(SEGMENT_BLOCK_D, max(16, _next_pow2(d)))
        column_blocks = triton.cdiv(d, block_d)
        _kernels()["segment_sum"][(num_chunks, column_blocks)](
            segments.keys, segments.order, boundaries, base, values, out, rows_out, carry, part.first, count, d,
            values.stride(0), part.group, part.col_step, part.key_offset, part.scale, PAD_ROW,
            DENSE=dense_rows is not None, CHUNK=chunk, BLOCK_D=block_d, num_warps=num_warps)
        _kernels()["segment_carry"][(triton.cdiv(num_chunks, CARRY_BLOCK), column_blocks)](
            segments.keys, boundaries, base, out, carry, part.first, count, num_chunks, d, part.key_offset,
            DENSE=dense_rows is not None, CHUNK=chunk, BLOCK_C=CARRY_BLOCK, BLOCK_D=block_d, num_warps=CARRY_WARPS)
    return out if dense_rows is not None else SparseRowGrad(rows=rows_out, values=out)


@functools.lru_cache(maxsize=8)
def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def _segment_sum(values: torch.Tensor, segments: Segments, use_triton: bool | None, **kwargs):
    if use_triton is None:
        use_triton = triton_usable(values.device)
    return (triton_segment_sum if use_triton else reference_segment_sum)(values, segments, **kwargs)


def sparse_row_grad(rows: torch.Tensor, grad_rows: torch.Tensor, use_triton: bool | None = None
                    ) -> SparseRowGrad:
    """Reduce per-lookup gradients ``grad_rows`` ``(R, d)`` (lookup ``r`` read table row ``rows[r]``) into
    the distinct rows: a padded :class:`SparseRowGrad` of ``R`` slots, deterministic, fp32, nothing
    table-sized, no host synchronisation."""
    grad_rows = grad_rows.reshape(-1, grad_rows.shape[-1])
    return _segment_sum(grad_rows, sort_segments(rows), use_triton)


def dense_row_grad(rows: torch.Tensor, grad_rows: torch.Tensor, num_rows: int, dtype: torch.dtype,
                   use_triton: bool | None = None) -> torch.Tensor:
    """The same reduction written into a zero-filled dense ``(num_rows, d)`` gradient of ``dtype``."""
    grad_rows = grad_rows.reshape(-1, grad_rows.shape[-1])
    return _segment_sum(grad_rows, sort_segments(rows), use_triton, dense_rows=num_rows, out_dtype=dtype)


def merge_sparse_grads(grads: list[SparseRowGrad], use_triton: bool | None = None) -> SparseRowGrad:
    """One :class:`SparseRowGrad` equal to the sum of ``grads`` (e.g. one per micro-batch): concatenated,
    then re-reduced in a fixed order (list order within a row), so the result is deterministic. Padding
    slots (:data:`PAD_ROW`, zero values) sort last and stay padding."""
    if not grads:
        raise ValueError("merge_sparse_grads: empty list of sparse gradients")
    if len(grads) == 1:
        return grads[0]
    rows = torch.cat([g.rows for g in grads])
    values = torch.cat([g.values.float() for g in grads])
    merged = sparse_row_grad(rows, values, use_triton=use_triton)
    # the padding rows formed one segment (their sum is zero); it stays a padding slot
    return merged


# ------------------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------------------

class _NgramEmbed(torch.autograd.Function):
    """The whole N-gram Embedding lookup: ``scale * (E0[ids] + gathered @ W^T)``, with one shared sort in the
    backward for the token table and the n-gram tables."""

    @staticmethod
    def forward(ctx, token_weight, table_weight, projection_weight, ids, rows, plan, eos_token_id, scale, dtype,
                sparse_token, sparse_table, use_triton):
        with torch.autocast(ids.device.type, enabled=False):  # the dtypes below are explicit
            gathered, keys = ngram_gather(ids, table_weight, plan, eos_token_id, rows=rows, use_triton=use_triton,
                                          out_dtype=dtype, pad=True, token_keys=True)  # (T, W), (T, S+1)
            width, padded = projection_weight.shape[1], gathered.shape[1]
            w = projection_weight.to(dtype)
            if padded != width:
                w = F.pad(w, (0, padded - width))  # zero columns against the gathered buffer's zero padding
            out = F.embedding(ids.reshape(-1), token_weight)  # (T, D), a fresh buffer: summed into in place
            if out.dtype == dtype:
                torch.addmm(out, gathered, w.t(), beta=scale, alpha=scale, out=out)
            else:  # fp32 token rows under bf16 autocast: the sum stays fp32, as in the PyTorch form
                out.add_(torch.mm(gathered, w.t())).mul_(scale)
        ctx.save_for_backward(gathered, w, keys)
        ctx.token_weight, ctx.table_weight = token_weight, table_weight
        ctx.options = (plan, scale, sparse_token, sparse_table, use_triton, projection_weight.dtype)
        return out.view(*ids.shape, out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        gathered, w, keys = ctx.saved_tensors
        plan, scale, sparse_token, sparse_table, use_triton, projection_dtype = ctx.options
        token_weight, table_weight = ctx.token_weight, ctx.table_weight
        num_tables, d = keys.shape[1] - 1, table_weight.shape[1]
        width = num_tables * d
        grad = grad.reshape(-1, grad.shape[-1])  # (T, D)
        g = grad.to(w.dtype)
        grad_gathered = torch.mm(g, w)  # (T, W) unscaled: the segment sum applies the scale
        # over the whole aligned width, then cut: a strided K=1020 operand sends cuBLAS to its sm80 kernels
        grad_projection = torch.mm(g.t(), gathered)[:, :width].mul(scale).to(projection_dtype)  # (D, S*d)
        segments = sort_segments(keys)  # n-gram rows first, then total_rows + token id
        tokens = keys.shape[0]
        ngram = Part(first=0, count=tokens * num_tables, width=d, group=num_tables + 1, col_step=d, scale=scale)
        token = Part(first=tokens * num_tables, count=tokens, group=num_tables + 1, key_offset=plan.total_rows,
                     scale=scale)
        grads = []
        for weight, values, part, sparse in ((table_weight, grad_gathered, ngram, sparse_table),
                                             (token_weight, grad, token, sparse_token)):
            if sparse:
                result = _segment_sum(values, segments, use_triton, part=part)
                if getattr(weight, "sparse_grads", None) is None:
                    weight.sparse_grads = []
                weight.sparse_grads.append(result)
                grads.append(None)
            else:
                grads.append(_segment_sum(values, segments, use_triton, part=part, dense_rows=weight.shape[0],
                                          out_dtype=weight.dtype))
        table_grad, token_grad = grads
        return (token_grad, table_grad, grad_projection) + (None,) * 9


@torch.compiler.disable  # a graph break under torch.compile: sparse gradients go to a Python list
def ngram_embed(token_weight: torch.Tensor, table_weight: torch.Tensor, projection_weight: torch.Tensor,
                ids: torch.Tensor, plan: Plan, eos_token_id: int | None, scale: float, dtype: torch.dtype, *,
                rows: torch.Tensor | None = None, backend: str = "triton", sparse_table: bool = False,
                sparse_token: bool = False) -> torch.Tensor:
    """``scale * (E0[ids] + gathered[..., :S*d] @ W^T)``, the N-gram Embedding before amplification:
    ``(..., T)`` ids -> ``(..., T, D)`` in the token table's dtype, the product in ``dtype``.

    One hash + gather kernel (which also writes each token's sort key), the token rows, one ``addmm``. The
    backward runs two GEMMs and one stable sort over the ``T*(S+1)`` lookups (n-gram rows, then the token
    ids offset by ``total_rows``), then reduces the token table's and the n-gram tables' gradients from it
    (:class:`Part`), in fp32, deterministically, with no host synchronisation. ``sparse_table`` /
    ``sparse_token``: that table's gradient goes to ``weight.sparse_grads`` as a padded
    :class:`SparseRowGrad` and ``weight.grad`` stays None; otherwise the dense gradient is written (the
    same reduction, scattered into zeros). ``backend="triton"`` runs the kernels where usable (CUDA, or
    ``TRITON_INTERPRET=1``) and the twins otherwise; ``"torch"`` always the twins."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" and triton_usable(table_weight.device)
    return _NgramEmbed.apply(token_weight, table_weight, projection_weight, ids, rows, plan, eos_token_id, scale,
                             dtype, sparse_token, sparse_table, use_triton)


def _build_kernels() -> dict:
    # the scan's combine is called from the kernels by its global name, so it is jitted here too (one mode
    # per process: the interpreter in the tests, the compiler on a GPU)
    globals()["_segmented_add"] = triton.jit(_segmented_add_fn)
    return {"gather": triton.jit(_gather_kernel), "segment_sum": triton.jit(_segment_sum_kernel),
            "segment_carry": triton.jit(_segment_carry_kernel)}


def _kernels() -> dict:
    return lazy_kernels(__name__, _build_kernels)


__all__ = [
    "PAD_ROW",
    "Part",
    "Segments",
    "SparseRowGrad",
    "dense_row_grad",
    "interpreting",
    "merge_sparse_grads",
    "ngram_embed",
    "ngram_gather",
    "padded_width",
    "reference_gather",
    "reference_row_ids",
    "reference_segment_sum",
    "row_id_dtype",
    "sort_segments",
    "sparse_row_grad",
    "token_key_dtype",
    "triton_gather",
    "triton_segment_sum",
    "triton_usable",
]
