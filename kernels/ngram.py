"""Fused N-gram Embedding gather (Triton) and its sparse, deterministic table gradient.

Forward (:func:`ngram_gather`): token ids ``(B, T)`` and a :class:`models.ngram.HashPlan` -> the gathered
rows of the concatenated table, ``(B*T, W)``, and the row ids ``(B*T, S)`` (int32 below 2^31 table rows, kept
for the backward). One kernel hashes and gathers: program ``(i, s)`` takes ``BLOCK_T`` tokens and sub-table
``s``, loads their ``N`` context ids, walks the look-back in-kernel (``alive_j = alive_{j-1} and i-j >= 0 and
t_{i-j} != EOS``: a token never sees an EOS behind it nor anything before one, while an EOS as the current
token hashes with its full look-back; context beyond the sequence start is id 0), accumulates the hash
(``acc = (acc + t_{i-j} * (V0^j mod M_s)) mod M_s``, exact in int64 as in :mod:`models.ngram`), adds the row
offset, writes the row id and copies the row (``d`` features) straight into its slot of the output, cast to
the GEMM's dtype. ``W`` is ``S*d`` rounded up to a multiple of :data:`ALIGN` (zeros past ``S*d``): with ``K =
S*d = 1020`` cuBLAS falls back to its sm80 kernels (0.151 ms per GEMM at the benchmark shape on an H200),
with ``K = 1024`` it runs its sm90 ones (0.052 ms). :func:`project_and_add` then does the projection, the token
row and the average in one ``addmm`` against the projection weight zero-padded to ``W``.

Backward (:func:`sparse_row_grad`): the ``B*T*S`` gathered-row gradients are reduced into the distinct rows
touched, in fp32, in a fixed order, with no host synchronisation: a stable sort of the row ids
(:func:`sort_segments`; int32 keys: half the radix passes of int64), a device cumsum of the segment starts,
then two kernels. The first takes chunks of :data:`SEGMENT_CHUNK` sorted positions; in each, the lane where a
run of equal rows starts walks the run (at most the chunk) adding its lookups' rows in sorted order; runs
inside the chunk are final, a run crossing a chunk boundary leaves its pieces in a small ``carry`` buffer
which the second kernel adds in chunk order. So a row looked up ``c`` times costs ``c / CHUNK`` serial
steps: frequent n-grams in real text stay cheap. Nothing table-sized is allocated and two backwards are
bit-identical. The result is a padded :class:`SparseRowGrad` (``P = B*T*S`` slots: the distinct rows
ascending, then :data:`PAD_ROW`), so its size is known without reading the device and the whole
forward + backward can be captured in a CUDA graph. :func:`merge_sparse_grads` re-reduces a list of them
(micro-batches) the same way; :func:`dense_row_grad` writes the same sums into a dense gradient.

Autograd (:func:`gather_rows`): a ``torch.autograd.Function`` whose forward takes the table weight and returns
the gathered rows. With ``sparse_grad=True`` its backward appends the :class:`SparseRowGrad` to
``weight.sparse_grads`` (a list; one entry per backward) and returns no gradient, so ``weight.grad`` stays
None; with ``sparse_grad=False`` it writes the dense gradient (deterministic too).

Every kernel has a plain-PyTorch twin (``reference_*``) that defines its meaning; the Triton versions run on
CUDA tensors, or anywhere with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests). Kernels
are jitted on first use, not at import, so the interpreter switch is read at the first launch and this module
imports without a GPU (or without Triton).

Predicted against measured for ``make bench`` (T=16384, D=1024, N=4, K=4, S=12, d=85, 2,000,003 rows per
sub-table, bf16; 196,608 lookups), NVIDIA H200, 2026-11-23 (BENCHMARKS.md):

- gather: predicted 0.02-0.03 ms, measured 0.041 ms;
- projection GEMMs (K padded to 1024): predicted 0.16 ms for the three, measured 0.052 ms each;
- sort: predicted 0.03-0.05 ms, measured 0.082 ms (8 radix launches, latency-bound at this size);
- segment sum: predicted 0.02 ms, measured ~0.12 ms (+ 0.03 ms carry): latency-bound walks, not bandwidth;
- forward + backward: predicted 0.40-0.50 ms; measured 0.895 ms replayed from a CUDA graph and 1.75 ms eagerly
  (about 20 launches from Python, the host is the bottleneck), against 5.2-5.5 ms for the naive form. The
  token table's dense gradient (torch's embedding backward with its 256 MB zero-fill) is the other large part.
"""

from __future__ import annotations

import functools
import os
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


class Plan(Protocol):
    """The fields of :class:`models.ngram.HashPlan` used here (duck-typed: kernels never import models)."""

    max_order: int
    moduli: tuple[int, ...]
    powers: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    total_rows: int


PAD_ROW = 2**63 - 1  # the row id of a SparseRowGrad's padding slots: sorts after every real row
ALIGN = 8  # the gathered buffer's row length is a multiple of this (16 bytes in bf16): cuBLAS's fast path
# Launch shapes, from a sweep on an H200 at the benchmark shape (196,608 lookups of 85 bf16 features):
# gather 32 tokens x 1 warp per program 41 us (64 x 4 warps: 1.08 ms, 128 x 8: 2.3 ms: the sweep matters);
# segment sum 32 sorted positions x 2 warps: 126 us random rows; a row looked up 5,000 times costs ~0.9 ms at
# width 1024 (chunks of 64: 0.85 ms, of 16: 1.5 ms).
GATHER_BLOCK_T = 32
GATHER_WARPS = 1
SEGMENT_CHUNK = 32
SEGMENT_WARPS = 2


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

def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_usable(device: torch.device) -> bool:
    """The Triton kernels run on CUDA tensors, or on any tensor under the interpreter."""
    return triton is not None and (device.type == "cuda" or interpreting())


@functools.lru_cache(maxsize=8)
def _plan_tensors(plan: Plan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(moduli (S,), powers (N, S), offsets (S,)) int64 on ``device``, cached per plan."""
    moduli = torch.tensor(plan.moduli, dtype=torch.int64, device=device)
    powers = torch.tensor(plan.powers, dtype=torch.int64, device=device)
    offsets = torch.tensor(plan.offsets, dtype=torch.int64, device=device)
    return moduli, powers, offsets


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ------------------------------------------------------------------------------------------------------------
# Forward: hash + gather
# ------------------------------------------------------------------------------------------------------------

def reference_row_ids(ids: torch.Tensor, plan: Plan, eos_token_id: int | None) -> torch.Tensor:
    """Rows into the concatenated table, ``(..., T)`` -> ``(..., T, S)`` int64: the same walk-back as the
    kernel, in plain PyTorch (a second, independent writing of :func:`models.ngram.ngram_row_ids`)."""
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
                   n_tokens, seq_len, eos_id, d, stride_w, stride_out, width,
                   S: tl.constexpr, N: tl.constexpr, HASH: tl.constexpr, HAS_EOS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PAD_BLOCK: tl.constexpr):
    # program (i, s): tokens i*BLOCK_T .. +BLOCK_T, sub-table s
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # flat position b*T + t
    s = tl.program_id(1)
    tmask = tok < n_tokens
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
        tl.store(rows_out_ptr + tok * S + s, row.to(rows_out_ptr.dtype.element_ty), mask=tmask)
    else:
        row = tl.load(rows_in_ptr + tok * S + s, mask=tmask, other=0).to(tl.int64)
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
                  block_t: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash (unless ``rows`` is given) and gather in one kernel: ``(gathered (B*T, W), rows (B*T, S))``.

    ``ids`` ``(..., T)``; ``weight`` the concatenated table ``(total_rows, d)`` (any row stride). ``W = S*d``,
    or with ``pad=True`` :func:`padded_width` of it, the extra columns zero. ``out_dtype`` (default the
    table's) is the gathered buffer's dtype: the kernel casts on store. Row ids are :func:`row_id_dtype`."""
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
    if rows is None:
        rows_out = torch.empty(n_tokens, num_tables, dtype=row_id_dtype(plan.total_rows), device=weight.device)
        rows_in = rows_out  # unused
    else:
        rows_out = rows_in = rows.reshape(n_tokens, num_tables).contiguous()
    if n_tokens == 0:
        return out, rows_out
    block_t = block_t or GATHER_BLOCK_T
    num_warps = num_warps or GATHER_WARPS
    pad_block = _next_pow2(stride_out - width) if stride_out > width else 0
    common = dict(S=num_tables, N=plan.max_order, HASH=rows is None, HAS_EOS=eos_token_id is not None,
                  BLOCK_T=block_t, BLOCK_D=_next_pow2(d), PAD_BLOCK=pad_block, num_warps=num_warps)
    args = (ids, rows_in, weight, out, rows_out, moduli, powers, offsets, n_tokens, seq_len,
            -1 if eos_token_id is None else eos_token_id, d, weight.stride(0), stride_out, width)
    _kernels()["gather"][(triton.cdiv(n_tokens, block_t), num_tables)](*args, **common)
    return out, rows_out


def reference_gather(ids: torch.Tensor, weight: torch.Tensor, plan: Plan, eos_token_id: int | None,
                     rows: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None, pad: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`triton_gather` (same outputs, same dtypes)."""
    if rows is None:
        rows = reference_row_ids(ids, plan, eos_token_id).to(row_id_dtype(plan.total_rows))
    rows = rows.reshape(-1, len(plan.moduli))
    gathered = weight[rows.reshape(-1).long()].reshape(rows.shape[0], -1).to(out_dtype or weight.dtype)
    if pad and padded_width(gathered.shape[1]) != gathered.shape[1]:
        gathered = F.pad(gathered, (0, padded_width(gathered.shape[1]) - gathered.shape[1]))
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


def reference_segment_sum(values: torch.Tensor, segments: Segments, dense_rows: int | None = None,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor | SparseRowGrad:
    """Twin of the segment-sum kernel. Each distinct row's gradient is the fp32 sum of its lookups' ``values``
    rows, added in sorted (row, lookup) order (``index_add_`` on CPU walks the index sequentially, so the sums
    match the kernel's bit for bit; on CUDA it is atomic and only the kernel is deterministic).

    ``dense_rows=None``: a padded :class:`SparseRowGrad` (``R`` slots: the ``U`` distinct rows ascending,
    then :data:`PAD_ROW` with zero values). Otherwise the dense ``(dense_rows, d)`` gradient in
    ``out_dtype`` (default ``values.dtype``)."""
    count, d = segments.keys.numel(), values.shape[1]
    unique, counts = torch.unique_consecutive(segments.keys, return_counts=True)
    segment = torch.repeat_interleave(torch.arange(unique.numel(), device=values.device), counts)
    sums = torch.zeros(unique.numel(), d, dtype=torch.float32, device=values.device)
    sums.index_add_(0, segment, values[segments.order].float())
    if dense_rows is not None:
        dense = torch.zeros(dense_rows, d, dtype=out_dtype or values.dtype, device=values.device)
        return dense.index_copy_(0, unique.long(), sums.to(dense.dtype))
    rows = torch.full((count,), PAD_ROW, dtype=torch.int64, device=values.device)
    rows[:unique.numel()] = unique
    out = torch.zeros(count, d, dtype=torch.float32, device=values.device)
    out[:unique.numel()] = sums
    return SparseRowGrad(rows=rows, values=out)


def _segment_sum_kernel(keys_ptr, order_ptr, boundaries_ptr, values_ptr, out_ptr, rows_out_ptr, carry_ptr,
                         n, d, stride_v, pad_row, DENSE: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # Program c reduces sorted positions c*CHUNK .. +CHUNK, one lane per position. A lane where a run of
    # equal keys starts (a new row, or the chunk's first position) walks the run to its end or to the chunk's
    # end, adding its lookups' rows in sorted order (fixed: deterministic). A run wholly inside the chunk is
    # final and written out; the chunk's first run, when it began in an earlier chunk, and its last run, when
    # it goes on into the next, are left in carry[2c] and carry[2c+1] for _segment_carry_kernel. No lane
    # walks more than CHUNK steps, so a row looked up thousands of times costs thousands / CHUNK steps.
    c = tl.program_id(0).to(tl.int64)
    first = c * CHUNK
    k = first + tl.arange(0, CHUNK)
    kmask = k < n
    end = tl.minimum(first + CHUNK, n)
    key = tl.load(keys_ptr + k, mask=kmask, other=0)
    previous = tl.load(keys_ptr + k - 1, mask=kmask & (k > 0), other=0)
    head = kmask & ((k == 0) | (key != previous))  # a row (segment) starts here
    start = head | (kmask & (k == first))  # a run starts here
    segment = tl.load(boundaries_ptr + k - 1, mask=head & (k > 0), other=0).to(tl.int64)
    next_key = tl.load(keys_ptr + end, mask=end < n, other=0)
    for col in tl.range(0, d, BLOCK_D):
        cols = col + tl.arange(0, BLOCK_D)
        cmask = cols < d
        acc = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
        active = start
        position = k
        while tl.max(active.to(tl.int32), axis=0) > 0:
            source = tl.load(order_ptr + position, mask=active, other=0)
            acc += tl.load(values_ptr + source[:, None] * stride_v + cols[None, :],
                           mask=active[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            position = tl.where(active, position + 1, position)  # stopped lanes keep their run's end
            active = active & (position < end)
            active = active & (tl.load(keys_ptr + position, mask=active, other=0) == key)
        # the walk stopped at `position`: at the chunk's end with the same key next -> the run goes on
        continues = start & (position == end) & (position < n) & (next_key == key)
        whole = head & (continues == 0)
        if DENSE:
            tl.store(out_ptr + key.to(tl.int64)[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=whole[:, None] & cmask[None, :])
        else:
            tl.store(out_ptr + segment[:, None] * d + cols[None, :], acc, mask=whole[:, None] & cmask[None, :])
        to_first = start & (head == 0)
        tl.store(carry_ptr + (2 * c + k * 0)[:, None] * d + cols[None, :], acc, mask=to_first[:, None] & cmask[None, :])
        to_last = head & continues
        tl.store(carry_ptr + (2 * c + 1 + k * 0)[:, None] * d + cols[None, :], acc,
                 mask=to_last[:, None] & cmask[None, :])
    if not DENSE:
        num_unique = tl.load(boundaries_ptr + n - 2, mask=n > 1, other=n - 1) + 1
        padding = kmask & (k >= num_unique)
        tl.store(rows_out_ptr + segment, key.to(tl.int64), mask=head)
        tl.store(rows_out_ptr + k, tl.full([CHUNK], pad_row, tl.int64), mask=padding)
        for col in tl.range(0, d, BLOCK_D):
            cols = col + tl.arange(0, BLOCK_D)
            tl.store(out_ptr + k[:, None] * d + cols[None, :], tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32),
                     mask=padding[:, None] & (cols < d)[None, :])


def _segment_carry_kernel(keys_ptr, boundaries_ptr, out_ptr, carry_ptr, n, num_chunks, d,
                          DENSE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # Lane c: when chunk c owns a run that goes on into later chunks, add the carried pieces of the chunks it
    # spans, in chunk order, and write the row.
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    last = tl.minimum((c + 1) * CHUNK, n) - 1
    cmask_c = c < num_chunks
    key = tl.load(keys_ptr + last, mask=cmask_c, other=0)
    before = tl.load(keys_ptr + c * CHUNK - 1, mask=cmask_c & (c > 0), other=0)
    began_here = (c == 0) | (before != key)
    after = tl.load(keys_ptr + (c + 1) * CHUNK, mask=cmask_c & ((c + 1) * CHUNK < n), other=0)
    owner = cmask_c & began_here & ((c + 1) * CHUNK < n) & (after == key)
    slot = tl.load(boundaries_ptr + last - 1, mask=owner & (last > 0), other=0).to(tl.int64)
    for col in tl.range(0, d, BLOCK_D):
        cols = col + tl.arange(0, BLOCK_D)
        cmask = cols < d
        acc = tl.load(carry_ptr + (2 * c + 1)[:, None] * d + cols[None, :], mask=owner[:, None] & cmask[None, :],
                      other=0.0)
        nxt = c + 1
        active = owner
        while tl.max(active.to(tl.int32), axis=0) > 0:
            acc += tl.load(carry_ptr + (2 * nxt)[:, None] * d + cols[None, :],
                           mask=active[:, None] & cmask[None, :], other=0.0)
            nxt += 1
            active = active & (nxt * CHUNK < n)
            active = active & (tl.load(keys_ptr + nxt * CHUNK, mask=active, other=0) == key)
        if DENSE:
            tl.store(out_ptr + key.to(tl.int64)[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=owner[:, None] & cmask[None, :])
        else:
            tl.store(out_ptr + slot[:, None] * d + cols[None, :], acc, mask=owner[:, None] & cmask[None, :])




def triton_segment_sum(values: torch.Tensor, segments: Segments, dense_rows: int | None = None,
                       out_dtype: torch.dtype | None = None, num_warps: int | None = None
                       ) -> torch.Tensor | SparseRowGrad:
    """Kernel form of :func:`reference_segment_sum` (same outputs up to fp32 summation order; deterministic;
    no host synchronisation). Two launches: per chunk of :data:`SEGMENT_CHUNK` sorted positions, its runs
    summed by a one-hot product; then the rows that span chunks, their pieces added in chunk order. A row
    looked up ``c`` times costs ``c / CHUNK`` serial steps, so skewed counts (frequent n-grams) stay cheap."""
    if values.stride(1) != 1:
        values = values.contiguous()
    num_warps = num_warps or SEGMENT_WARPS
    count, d = segments.keys.numel(), values.shape[1]
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
        boundaries = segments.boundaries if count > 1 else segments.keys  # never read when count == 1
        block_d = min(128, max(16, _next_pow2(d)))
        _kernels()["segment_sum"][(num_chunks,)](
            segments.keys, segments.order, boundaries, values, out, rows_out, carry, count, d, values.stride(0),
            PAD_ROW, DENSE=dense_rows is not None, CHUNK=chunk, BLOCK_D=block_d, num_warps=num_warps)
        block_c = 64
        _kernels()["segment_carry"][(triton.cdiv(num_chunks, block_c),)](
            segments.keys, boundaries, out, carry, count, num_chunks, d, DENSE=dense_rows is not None,
            CHUNK=chunk, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4)
    return out if dense_rows is not None else SparseRowGrad(rows=rows_out, values=out)


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

class _GatherRows(torch.autograd.Function):
    """weight -> gathered rows; the backward reduces into the touched rows (sparse or dense)."""

    @staticmethod
    def forward(ctx, weight, ids, rows, plan, eos_token_id, use_triton, sparse_grad, out_dtype, pad):
        gathered, row_ids = ngram_gather(ids, weight, plan, eos_token_id, rows=rows, use_triton=use_triton,
                                         out_dtype=out_dtype, pad=pad)
        ctx.save_for_backward(row_ids)
        ctx.weight = weight
        ctx.sparse_grad = sparse_grad
        ctx.use_triton = use_triton
        return gathered

    @staticmethod
    def backward(ctx, grad_gathered):
        (row_ids,) = ctx.saved_tensors
        weight = ctx.weight
        d = weight.shape[1]
        width = row_ids.shape[1] * d
        grad_rows = grad_gathered[:, :width].reshape(-1, d) if grad_gathered.shape[1] != width else \
            grad_gathered.reshape(-1, d)
        nones = (None,) * 8
        if ctx.sparse_grad:
            grad = sparse_row_grad(row_ids, grad_rows, use_triton=ctx.use_triton)
            if getattr(weight, "sparse_grads", None) is None:
                weight.sparse_grads = []
            weight.sparse_grads.append(grad)
            return (None,) + nones
        dense = dense_row_grad(row_ids, grad_rows, weight.shape[0], weight.dtype, use_triton=ctx.use_triton)
        return (dense,) + nones


@torch.compiler.disable  # a graph break under torch.compile: the backward appends to a Python list
def gather_rows(weight: torch.Tensor, ids: torch.Tensor, plan: Plan, eos_token_id: int | None, *,
                rows: torch.Tensor | None = None, backend: str = "triton", sparse_grad: bool = False,
                out_dtype: torch.dtype | None = None, pad: bool = False) -> torch.Tensor:
    """Differentiable gather of the hashed rows: ``(..., T)`` ids -> ``(..., T, W)`` (``W = S*d``, or
    :func:`padded_width` of it with ``pad=True``, zeros in the extra columns).

    ``backend="triton"`` runs the fused kernel where usable (CUDA, or ``TRITON_INTERPRET=1``) and the twin
    otherwise; ``"torch"`` always the twins. ``sparse_grad=True``: the table gradient is appended to
    ``weight.sparse_grads`` as a padded :class:`SparseRowGrad` and ``weight.grad`` is left alone; otherwise
    ``weight.grad`` gets the dense gradient (through the same deterministic reduction). ``out_dtype``: the
    gathered buffer's dtype (the kernel casts on store; default the table's).
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" and triton_usable(weight.device)
    gathered = _GatherRows.apply(weight, ids, rows, plan, eos_token_id, use_triton, sparse_grad, out_dtype, pad)
    return gathered.reshape(*ids.shape, -1)


class _ProjectAndAdd(torch.autograd.Function):
    """``scale * (token + gathered @ weight^T)`` as one ``addmm``; ``weight`` (D, S*d) is zero-padded to the
    gathered buffer's aligned width (a 16-byte-aligned K keeps cuBLAS on its fast kernels: measured 3x
    faster at K = 1024 than at K = 1020 on an H200). The backward scales the output gradient once."""

    @staticmethod
    def forward(ctx, token, gathered, weight, scale, dtype):
        width, padded = weight.shape[1], gathered.shape[-1]
        w = weight.to(dtype)
        if padded != width:
            w = F.pad(w, (0, padded - width))
        g2 = gathered.reshape(-1, padded).to(dtype)
        t2 = token.reshape(-1, token.shape[-1])
        if t2.dtype == dtype:
            out = torch.addmm(t2, g2, w.t(), beta=scale, alpha=scale)
        else:  # e.g. fp32 token rows under bf16 autocast: the sum stays in the token's dtype, as in the torch form
            out = torch.add(t2, torch.mm(g2, w.t())).mul_(scale)
        ctx.save_for_backward(g2, w)
        ctx.scale, ctx.width = scale, width
        ctx.dtypes = (token.dtype, gathered.dtype, weight.dtype)
        ctx.shapes = (token.shape, gathered.shape)
        return out.view(token.shape[:-1] + (out.shape[-1],))

    @staticmethod
    def backward(ctx, grad):
        g2, w = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        token_dtype, gathered_dtype, weight_dtype = ctx.dtypes
        grad_token = grad.view(ctx.shapes[0]).to(token_dtype)
        grad = grad.to(w.dtype)
        grad_gathered = grad @ w  # (T, padded)
        grad_weight = (grad.t() @ g2)[:, :ctx.width]
        return (grad_token, grad_gathered.view(ctx.shapes[1]).to(gathered_dtype), grad_weight.to(weight_dtype),
                None, None)


def project_and_add(token: torch.Tensor, gathered: torch.Tensor, weight: torch.Tensor, scale: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """``scale * (token + gathered[..., :S*d] @ weight^T)``, the product in ``dtype``: token ``(..., D)``,
    gathered ``(..., W)`` (``W >= S*d``, zero past ``S*d``), weight ``(D, S*d)``. The result has the token's
    dtype: one fused ``addmm`` when that is ``dtype``, else the product is added to the token rows (fp32 token
    rows under bf16 autocast keep an fp32 sum, as the PyTorch form does)."""
    return _ProjectAndAdd.apply(token, gathered, weight, scale, dtype)


@functools.lru_cache(maxsize=2)
def _jitted(interpret: bool) -> dict:
    # triton.jit picks the interpreter or the compiler when it decorates, so decorate at first launch
    # (keyed by the switch), not at import.
    del interpret
    return {"gather": triton.jit(_gather_kernel), "segment_sum": triton.jit(_segment_sum_kernel),
            "segment_carry": triton.jit(_segment_carry_kernel)}


def _kernels() -> dict:
    if triton is None:
        raise RuntimeError("kernels.ngram: Triton is not installed")
    return _jitted(interpreting())


__all__ = [
    "PAD_ROW",
    "Segments",
    "SparseRowGrad",
    "dense_row_grad",
    "gather_rows",
    "interpreting",
    "merge_sparse_grads",
    "ngram_gather",
    "padded_width",
    "project_and_add",
    "reference_gather",
    "reference_row_ids",
    "reference_segment_sum",
    "row_id_dtype",
    "sort_segments",
    "sparse_row_grad",
    "triton_gather",
    "triton_segment_sum",
    "triton_usable",
]
