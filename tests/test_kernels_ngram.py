"""Fused N-gram Embedding kernels (kernels/ngram.py) against the PyTorch path of models.ngram: the hash +
gather kernel (row ids, gathered buffer, module output), the sparse deterministic table gradient against the
dense gradient, the autograd switch on NgramEmbedding, and merge_sparse_grads. The kernels run compiled on CUDA
tensors when a GPU is there, otherwise in Triton's CPU interpreter (conftest.py decides; the ``kernel_device``
fixture), so the shapes are small. Inputs and modules are made on the CPU (the same values on every machine)
and moved to the kernel device."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embscale.base.errors import ConfigError
from embscale.kernels import ngram as kn
from embscale.models.config import NgramConfig
from embscale.models.ngram import NgramEmbedding, hash_plan, ngram_row_ids

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
EOS = 2


def tricky_ids(seed: int, vocab: int, batch: int, time_: int, eos: int | None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Random ids with the EOS cases placed on purpose: EOS first, consecutive EOS, EOS last, documents
    shorter than N; half the ids near the top of the vocabulary (largest hash products), never all zero."""
    rng = random.Random(seed)
    rows = []
    for b in range(batch):
        row = []
        for _ in range(time_):
            u = rng.random()
            if eos is not None and u < 0.15:
                row.append(eos)
            elif u < 0.6:
                row.append(rng.randrange(max(3, vocab - 50), vocab))
            else:
                row.append(rng.randrange(3, vocab))
        if eos is not None:
            if b % 2 == 0:
                row[0] = eos  # EOS at the start
            row[-1] = eos  # EOS last
            if time_ >= 6:
                row[2] = row[3] = eos  # consecutive EOS, then a one-token document
                row[5] = eos
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long, device=device)


def make_module(n: int, k: int, vocab: int, width: int, eos: int | None, dtype=torch.float32, seed: int = 0,
                device: torch.device | str = "cpu", **kwargs) -> NgramEmbedding:
    """Initialised on the CPU (the same parameters on every machine), then moved to ``device``."""
    torch.manual_seed(seed)
    return NgramEmbedding(NgramConfig(n=n, k=k, ratio=1.7), vocab, width, eos, dtype=dtype, **kwargs).to(device)


# (n, k, width, batch, time): ragged T (not a multiple of BLOCK_T = 32), d not a power of two, N = 2..5
SHAPES = [
    (2, 1, 7, 1, 5),  # d = 7, T < N-1 context for most
    (3, 2, 20, 2, 33),  # d = 5, T = 33
    (4, 3, 85 * 9, 1, 45),  # d = 85 (the benchmark's), S = 9
    (5, 2, 24, 3, 19),  # d = 3, S = 8
    (4, 1, 9, 2, 70),  # d = 3, T over two blocks
]


@pytest.mark.parametrize("n,k,width,batch,time_", SHAPES)
@pytest.mark.parametrize("eos", [EOS, None])
def test_triton_gather_matches_module(n, k, width, batch, time_, eos, kernel_device):
    vocab = 997
    module = make_module(n, k, vocab, width, eos, device=kernel_device)
    ids = tricky_ids(n * 100 + time_, vocab, batch, time_, eos, device=kernel_device)
    expected_rows = module.row_ids(ids)  # (B, T, S)
    expected = F.embedding(expected_rows, module.tables.weight).flatten(-2)  # (B, T, S*d)

    gathered, rows = kn.triton_gather(ids, module.tables.weight, module.plan, eos)
    assert rows.dtype == torch.int32  # the table has fewer than 2^31 rows
    assert torch.equal(rows.view_as(expected_rows).long(), expected_rows)
    assert torch.equal(gathered.view_as(expected), expected)
    assert torch.equal(kn.reference_row_ids(ids, module.plan, eos), expected_rows)
    twin, twin_rows = kn.reference_gather(ids, module.tables.weight, module.plan, eos)
    assert torch.equal(twin.view_as(expected), expected) and torch.equal(twin_rows, rows)

    # padded to an aligned width (zeros past S*d), cast on store
    padded, _ = kn.triton_gather(ids, module.tables.weight, module.plan, eos, pad=True, out_dtype=torch.bfloat16)
    width = expected.shape[-1]
    assert padded.shape[1] == kn.padded_width(width) and padded.shape[1] % kn.ALIGN == 0
    # (Triton's interpreter truncates on a bf16 cast where the GPU rounds: within one bf16 step)
    torch.testing.assert_close(padded[:, :width].float(), expected.reshape(-1, width), rtol=8e-3, atol=0)
    if padded.is_cuda:  # compiled, the cast rounds to nearest even, as torch's does
        assert torch.equal(padded[:, :width], expected.reshape(-1, width).to(torch.bfloat16))
    assert not padded[:, width:].any()
    twin_padded, _ = kn.reference_gather(ids, module.tables.weight, module.plan, eos, pad=True)
    exact, _ = kn.triton_gather(ids, module.tables.weight, module.plan, eos, pad=True)
    assert torch.equal(twin_padded, exact) and torch.equal(exact[:, :width], expected.reshape(-1, width))

    # precomputed rows (layers sharing a hash): the kernel only gathers
    given, _ = kn.triton_gather(ids, module.tables.weight, module.plan, eos, rows=expected_rows)
    assert torch.equal(given.view_as(expected), expected)


def test_hash_kernel_at_exactness_limits(kernel_device):
    """Ids near V0 = 2^21 with moduli near 2^31: the kernel's int64 arithmetic matches models.ngram. The
    table (~1.3e10 rows) is a stride-0 view of one float, so only the row ids are real."""
    vocab = 2**21
    spec = NgramConfig(n=4, k=2, ratio=1020.0)
    plan = hash_plan(spec, vocab)
    assert max(plan.moduli) > 2**30
    top = [vocab - 1, vocab - 2, vocab - 3]
    ids = torch.tensor([[top[0], top[1], top[0], EOS, top[2], top[0], top[0], top[1], EOS]], device=kernel_device)
    expected = ngram_row_ids(ids, spec, vocab, EOS)
    assert torch.equal(kn.reference_row_ids(ids, plan, EOS), expected)
    weight = torch.ones(1, device=kernel_device).as_strided((plan.total_rows, 1), (0, 1))
    gathered, rows = kn.triton_gather(ids, weight, plan, EOS)
    assert rows.dtype == torch.int64  # past 2^31 rows
    assert torch.equal(rows.view_as(expected), expected)
    assert torch.equal(gathered, torch.ones_like(gathered))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,width,batch,time_", [SHAPES[1], SHAPES[2]])
def test_module_backend_forward_matches_torch(n, k, width, batch, time_, dtype, kernel_device):
    vocab = 509
    dense = make_module(n, k, vocab, width, EOS, dtype=dtype, device=kernel_device)
    fused = make_module(n, k, vocab, width, EOS, dtype=dtype, backend="triton", device=kernel_device)
    ids = tricky_ids(7, vocab, batch, time_, EOS, device=kernel_device)
    with torch.no_grad():
        expected = dense(ids)
        got = fused(ids)
        rows = dense.row_ids(ids)
        assert torch.equal(fused(ids, rows=rows), got)
    assert got.dtype == dtype
    # one addmm (sum and average fused) against linear, add, scale: equal up to rounding
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(got, expected, **tol)


def dense_grads(module: NgramEmbedding, ids: torch.Tensor, grad_out: torch.Tensor):
    module.zero_grad(set_to_none=True)
    module(ids).backward(grad_out)
    return module.tables.weight.grad.float(), module.projection.weight.grad, module.token.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n,k,width,batch,time_", [SHAPES[1], SHAPES[3], SHAPES[4]])
def test_sparse_backward_matches_dense(n, k, width, batch, time_, backend, dtype, kernel_device):
    vocab = 61  # small vocabulary and table: many repeated rows, so segments of several entries
    dense = make_module(n, k, vocab, width, EOS, dtype=dtype, device=kernel_device)
    fused = make_module(n, k, vocab, width, EOS, dtype=dtype, backend=backend, sparse_grad=True,
                        device=kernel_device)
    ids = tricky_ids(11, vocab, batch, time_, EOS, device=kernel_device)
    torch.manual_seed(1)
    grad_out = torch.randn(batch, time_, width, dtype=dtype).to(kernel_device)
    table_grad, projection_grad, token_grad = dense_grads(dense, ids, grad_out)

    fused(ids).backward(grad_out)
    weight = fused.tables.weight
    assert weight.grad is None and len(weight.sparse_grads) == 1
    sparse = weight.sparse_grads[0]
    touched = torch.unique(dense.row_ids(ids))
    lookups = batch * time_ * fused.num_tables
    assert sparse.rows.shape == (lookups,) and sparse.values.shape == (lookups, fused.table_width)
    assert torch.equal(sparse.rows[:touched.numel()], touched)  # the distinct rows, ascending, then padding
    assert (sparse.rows[touched.numel():] == kn.PAD_ROW).all() and not sparse.values[touched.numel():].any()
    rows, values = sparse.compact()
    assert torch.equal(rows, touched)
    assert values.dtype == torch.float32 and values.abs().sum() > 0
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(values, table_grad[touched], **tol)
    untouched = torch.ones(weight.shape[0], dtype=torch.bool, device=kernel_device)
    untouched[touched] = False
    assert untouched.any() and table_grad[untouched].abs().max() == 0  # zero elsewhere
    torch.testing.assert_close(sparse.to_dense(weight.shape[0]), table_grad, **tol)
    # the dense parameters still get their ordinary gradients
    torch.testing.assert_close(fused.projection.weight.grad, projection_grad, **tol)
    # the token table's gradient is summed in fp32 and rounded once: compared with the exact sum (torch's bf16
    # embedding backward rounds every addition and is off by 0.009 on the EOS row here)
    exact_token = torch.zeros(vocab, width, dtype=torch.float64).index_add_(
        0, ids.reshape(-1).cpu(), grad_out.reshape(-1, width).double().cpu()) * fused.scale
    torch.testing.assert_close(fused.token.weight.grad.double().cpu(), exact_token, **tol)

    # micro-batches accumulate by appending; the merge equals the sum
    fused(ids).backward(grad_out * 0.5)
    assert len(weight.sparse_grads) == 2 and weight.grad is None
    merged = kn.merge_sparse_grads(weight.sparse_grads)
    merged_rows, merged_values = merged.compact()
    assert torch.equal(merged_rows, touched)
    torch.testing.assert_close(merged_values, table_grad[touched] * 1.5, **tol)


def test_dense_grad_through_kernel_matches_torch(kernel_device):
    """backend='triton' without sparse_grad: weight.grad is the dense gradient (scattered from the sparse
    reduction)."""
    n, k, width, batch, time_ = SHAPES[1]
    dense = make_module(n, k, 61, width, EOS, device=kernel_device)
    fused = make_module(n, k, 61, width, EOS, backend="triton", device=kernel_device)
    ids = tricky_ids(3, 61, batch, time_, EOS, device=kernel_device)
    grad_out = torch.randn(batch, time_, width).to(kernel_device)
    expected, _, _ = dense_grads(dense, ids, grad_out)
    got, _, _ = dense_grads(fused, ids, grad_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sparse_backward_is_deterministic_and_matches_twin(kernel_device):
    n, k, width, batch, time_ = SHAPES[4]
    module = make_module(n, k, 23, width, EOS, backend="triton", sparse_grad=True, device=kernel_device)
    ids = tricky_ids(5, 23, batch, time_, EOS, device=kernel_device)
    grad_out = torch.randn(batch, time_, width).to(kernel_device)
    for _ in range(2):
        module(ids).backward(grad_out)
    first, second = module.tables.weight.sparse_grads
    assert torch.equal(first.rows, second.rows) and torch.equal(first.values, second.values)

    # kernel and twin add in sorted order (the kernel in chunk-sized pieces for long runs): equal rows, values
    # equal up to fp32 summation order
    gathered, rows = kn.triton_gather(ids, module.tables.weight, module.plan, EOS)
    grad_rows = torch.randn(rows.numel(), module.table_width).to(kernel_device)
    kernel = kn.sparse_row_grad(rows, grad_rows, use_triton=True)
    twin = kn.sparse_row_grad(rows, grad_rows, use_triton=False)
    assert torch.equal(kernel.rows, twin.rows)
    torch.testing.assert_close(kernel.values, twin.values, rtol=1e-5, atol=1e-5)
    assert kernel.compact()[0].numel() < rows.numel()  # repeated rows were reduced


def test_merge_sparse_grads_equals_sum(kernel_device):
    torch.manual_seed(3)
    num_rows, d = 40, 6
    grads, total = [], torch.zeros(num_rows, d, device=kernel_device)
    for size in (5, 17, 1, 30):
        rows = torch.randint(0, num_rows, (size,)).to(kernel_device)
        values = torch.randn(size, d).to(kernel_device)
        grad = kn.sparse_row_grad(rows, values, use_triton=True)
        assert torch.equal(grad.compact()[0], torch.unique(rows))
        grads.append(grad)
        total.index_add_(0, rows, values)
    merged = kn.merge_sparse_grads(grads)
    assert merged.rows.numel() == sum(g.rows.numel() for g in grads)  # padded: no host read of U
    assert torch.equal(merged.compact()[0], torch.unique(torch.cat([g.compact()[0] for g in grads])))
    torch.testing.assert_close(merged.to_dense(num_rows), total, rtol=1e-6, atol=1e-6)
    again = kn.merge_sparse_grads(grads, use_triton=False)
    assert torch.equal(again.rows, merged.rows)
    torch.testing.assert_close(again.values, merged.values, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        kn.merge_sparse_grads([])


# Long runs (a row looked up more than a chunk's worth of times, crossing chunk boundaries), single lookups,
# empty input, widths over one column block: kernel against twin, sparse and dense outputs.
RUNS = [
    [3],
    [4, 4],
    [7] * kn.SEGMENT_CHUNK,
    [7] * (kn.SEGMENT_CHUNK + 1),
    [9] * (4 * kn.SEGMENT_CHUNK + 3),
    [1] * (kn.SEGMENT_CHUNK - 1) + [2] * 3 + [5] * (2 * kn.SEGMENT_CHUNK),
    [],
]


@pytest.mark.parametrize("runs", RUNS, ids=lambda r: f"len{len(r)}")
@pytest.mark.parametrize("d", [3, 70])  # 70: over one column block (SEGMENT_BLOCK_D = 64)
def test_segment_sum_long_runs(runs, d, kernel_device):
    generator = torch.Generator().manual_seed(len(runs) * d)
    rows = torch.tensor(runs + torch.randint(10, 60, (23,), generator=generator).tolist(), dtype=torch.long)
    rows = rows[torch.randperm(rows.numel(), generator=generator)]
    values = torch.randn(rows.numel(), d, generator=generator)
    expected = torch.zeros(64, d, dtype=torch.float64).index_add_(0, rows, values.double()).to(kernel_device)
    rows, values = rows.to(kernel_device), values.to(kernel_device)
    for keys in (rows, rows.to(torch.int32)):
        kernel = kn.sparse_row_grad(keys, values, use_triton=True)
        twin = kn.sparse_row_grad(keys, values, use_triton=False)
        assert torch.equal(kernel.rows, twin.rows)
        assert (kernel.rows == kn.PAD_ROW).sum() == rows.numel() - torch.unique(rows).numel()
        torch.testing.assert_close(kernel.to_dense(64).double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernel.values, twin.values, rtol=1e-5, atol=1e-5)
        dense = kn.dense_row_grad(keys, values, 64, torch.float32, use_triton=True)
        torch.testing.assert_close(dense.double(), expected, rtol=1e-5, atol=1e-5)
        again = kn.sparse_row_grad(keys, values, use_triton=True)
        assert torch.equal(again.values, kernel.values)  # deterministic


def test_merge_keeps_padding_last(kernel_device):
    generator = torch.Generator().manual_seed(0)
    grads = [kn.sparse_row_grad(torch.randint(0, 5, (n,), generator=generator).to(kernel_device),
                                torch.randn(n, 4, generator=generator).to(kernel_device), use_triton=True)
             for n in (70, 40)]
    merged = kn.merge_sparse_grads(grads, use_triton=True)
    real = merged.rows != kn.PAD_ROW
    count = int(real.sum())
    assert real[:count].all() and not real[count:].any()  # real rows first, ascending, then padding
    assert torch.equal(merged.rows[:count], torch.unique(merged.rows[:count]))
    assert not merged.values[count:].any()
    torch.testing.assert_close(merged.to_dense(5), grads[0].to_dense(5) + grads[1].to_dense(5))


def test_backend_validation():
    with pytest.raises(ConfigError, match="backend"):
        make_module(3, 1, 50, 8, EOS, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        module = make_module(3, 1, 50, 8, EOS)
        kn.ngram_embed(module.token.weight, module.tables.weight, module.projection.weight,
                       torch.zeros(1, 2, dtype=torch.long), module.plan, EOS, 0.5, torch.float32, backend="x")


def test_imports_without_gpu_or_interpreter():
    """embscale.kernels.ngram imports with neither a GPU nor the interpreter, and falls back to the twin on CPU."""
    code = (
        "import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from embscale.kernels import ngram as kn\n"
        "assert not kn.triton_usable(torch.device('cpu'))\n"
        "from embscale.models.config import NgramConfig\n"
        "from embscale.models.ngram import NgramEmbedding\n"
        "m = NgramEmbedding(NgramConfig(n=3, k=1, ratio=2.0), 50, 8, 2, backend='triton', sparse_grad=True)\n"
        "m(torch.randint(0, 50, (1, 9))).sum().backward()\n"
        "assert m.tables.weight.grad is None and len(m.tables.weight.sparse_grads) == 1\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ngram_embed_keeps_the_token_dtype(backend, kernel_device):
    """fp32 parameters with a bf16 product (autocast): the sum stays fp32, as in the PyTorch form, and each
    gradient has its parameter's dtype."""
    vocab, width = 31, 24
    module = make_module(3, 2, vocab, width, EOS, backend=backend, sparse_grad=True, device=kernel_device)
    reference = make_module(3, 2, vocab, width, EOS, device=kernel_device)
    ids = tricky_ids(2, vocab, 2, 33, EOS, device=kernel_device)
    with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
        got = module(ids)
        expected = reference(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)
    got.sum().backward()
    assert module.token.weight.grad.dtype == torch.float32
    assert module.projection.weight.grad.dtype == torch.float32
    assert module.tables.weight.sparse_grads[0].values.dtype == torch.float32
    counts = torch.bincount(ids.reshape(-1), minlength=vocab).float()[:, None].expand(vocab, width)
    torch.testing.assert_close(module.token.weight.grad, counts * module.scale)


# ------------------------------------------------------------------------------------------------------------
# ngram_embed: the token table and the n-gram tables reduced from one shared sort
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given_rows", [False, True])
@pytest.mark.parametrize("n,k,width,batch,time_", [SHAPES[1], SHAPES[4]])
def test_gather_token_keys_kernel_matches_twin(n, k, width, batch, time_, given_rows, kernel_device):
    module = make_module(n, k, 61, width, EOS, device=kernel_device)
    ids = tricky_ids(7, 61, batch, time_, EOS, device=kernel_device)
    rows = module.row_ids(ids) if given_rows else None
    weight = module.tables.weight.detach()
    got, keys = kn.triton_gather(ids, weight, module.plan, EOS, rows=rows, pad=True, token_keys=True)
    want, want_keys = kn.reference_gather(ids, weight, module.plan, EOS, rows=rows, pad=True, token_keys=True)
    assert keys.shape == (batch * time_, module.num_tables + 1) and keys.dtype == kn.token_key_dtype(module.plan)
    assert torch.equal(keys, want_keys) and torch.equal(got, want)
    assert torch.equal(keys[:, -1].long(), ids.reshape(-1) + module.plan.total_rows)
    assert torch.equal(keys[:, :-1].long(), module.row_ids(ids).reshape(-1, module.num_tables))


def _part_case(seed: int, device: torch.device):
    """Two parts sorted together, as ngram_embed lays them out: 3 lookups per token into rows < 50 (the first
    part, width 5 at column step 5 of a (T, 16) buffer), then one per token keyed 50 + token id (the second,
    width 7 of a (T, 7) buffer), with runs longer than a chunk in both. Drawn on the CPU, the exact float64
    sums made there; everything returned on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = 3 * kn.SEGMENT_CHUNK + 5
    first = torch.randint(0, 50, (tokens, 3), generator=generator)
    first[: 2 * kn.SEGMENT_CHUNK, 1] = 17  # a run over two chunks
    token = torch.randint(0, 9, (tokens, 1), generator=generator)
    token[kn.SEGMENT_CHUNK: 3 * kn.SEGMENT_CHUNK] = 4
    keys = torch.cat([first, token + 50], dim=1).to(torch.int32)
    first_values = torch.randn(tokens, 16, generator=generator)
    token_values = torch.randn(tokens, 7, generator=generator)
    parts = (kn.Part(first=0, count=tokens * 3, width=5, group=4, col_step=5, scale=0.25),
             kn.Part(first=tokens * 3, count=tokens, group=4, key_offset=50, scale=0.25))
    expected = (torch.zeros(50, 5, dtype=torch.float64).index_add_(
                    0, first.reshape(-1), first_values[:, :15].reshape(-1, 5).double()) * 0.25,
                torch.zeros(9, 7, dtype=torch.float64).index_add_(0, token[:, 0], token_values.double()) * 0.25)
    return (keys.to(device), (first_values.to(device), token_values.to(device)), parts,
            tuple(exact.to(device) for exact in expected))


def test_segment_sum_parts_kernel_matches_twin_and_exact_sums(kernel_device):
    keys, values, parts, expected = _part_case(0, kernel_device)
    segments = kn.sort_segments(keys)
    for part_values, part, exact in zip(values, parts, expected, strict=True):
        kernel = kn.triton_segment_sum(part_values, segments, part=part)
        twin = kn.reference_segment_sum(part_values, segments, part=part)
        assert kernel.rows.shape == (part.count,) and torch.equal(kernel.rows, twin.rows)
        assert torch.equal(kernel.compact()[0], torch.nonzero(exact.abs().sum(1)).flatten())
        torch.testing.assert_close(kernel.values, twin.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernel.to_dense(exact.shape[0]).double(), exact, rtol=1e-5, atol=1e-5)
        dense = kn.triton_segment_sum(part_values, segments, dense_rows=exact.shape[0], part=part)
        torch.testing.assert_close(dense.double(), exact, rtol=1e-5, atol=1e-5)
        again = kn.triton_segment_sum(part_values, segments, part=part)
        assert torch.equal(again.values, kernel.values)


@pytest.mark.parametrize("amplification", ["none", "layernorm"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ngram_embed_sparse_token_and_tables_match_dense(backend, amplification, kernel_device):
    """Both tables' gradients sparse, from one sort: equal to the plain PyTorch form's dense gradients."""
    vocab, width = 61, 20
    spec = NgramConfig(n=3, k=2, ratio=1.7, amplification=amplification)
    torch.manual_seed(0)
    dense = NgramEmbedding(spec, vocab, width, EOS).to(kernel_device)
    fused = NgramEmbedding(spec, vocab, width, EOS, backend=backend, sparse_grad=True, sparse_token_grad=True)
    fused = fused.to(kernel_device)
    fused.load_state_dict(dense.state_dict())
    ids = tricky_ids(13, vocab, 2, 40, EOS, device=kernel_device)
    grad_out = torch.randn(2, 40, width).to(kernel_device)
    dense(ids).backward(grad_out)
    out = fused(ids)
    torch.testing.assert_close(out, dense(ids), rtol=1e-5, atol=1e-6)
    out.backward(grad_out)
    assert fused.token.weight.grad is None and fused.tables.weight.grad is None
    (token,), (tables,) = fused.token.weight.sparse_grads, fused.tables.weight.sparse_grads
    assert token.rows.shape == (80,) and tables.rows.shape == (80 * fused.num_tables,)
    token_tol = {"rtol": 1e-5, "atol": 1e-6}
    if kernel_device.type == "cuda" and amplification == "layernorm":
        # On CUDA the three forms add a token row's lookups in different orders (the twin's index_add_ is atomic,
        # in no fixed order; torch's embedding backward has its own; the kernel a tree), where on the CPU the twin
        # and torch add sequentially alike. Under the layer norm the per-lookup gradients are large (the pre-norm
        # sum has an RMS near 0.01, so the norm's backward scales grad_out up; up to ~500 here) and cancel: fp32
        # reordering error scales with the sum of |terms| (up to 1020 on a token row here), not with the result.
        # 2 eps x 1020 = 2.4e-4; measured on an H200: up to 1.1e-4 (1.6 eps x sum |terms|) over 100 runs.
        token_tol = {"rtol": 1e-5, "atol": 2.5e-4}
    torch.testing.assert_close(token.to_dense(vocab), dense.token.weight.grad, **token_tol)
    torch.testing.assert_close(tables.to_dense(fused.plan.total_rows), dense.tables.weight.grad, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(fused.projection.weight.grad, dense.projection.weight.grad, rtol=1e-5, atol=1e-6)
    # dense gradients for both through the same reduction
    fused.sparse_grad = fused.sparse_token_grad = False
    fused(ids).backward(grad_out)
    torch.testing.assert_close(fused.token.weight.grad, dense.token.weight.grad, **token_tol)
    torch.testing.assert_close(fused.tables.weight.grad, dense.tables.weight.grad, rtol=1e-5, atol=1e-6)


def test_ngram_embed_is_deterministic_and_kernel_matches_twin(kernel_device):
    vocab, width = 23, 9
    module = make_module(4, 1, vocab, width, EOS, backend="triton", sparse_grad=True, sparse_token_grad=True,
                         device=kernel_device)
    ids = tricky_ids(5, vocab, 2, 70, EOS, device=kernel_device)
    grad_out = torch.randn(2, 70, width).to(kernel_device)
    for backend in ("triton", "triton", "torch"):
        module.backend = backend
        module(ids).backward(grad_out)
    for weight in (module.token.weight, module.tables.weight):
        first, second, twin = weight.sparse_grads
        assert torch.equal(first.rows, second.rows) and torch.equal(first.values, second.values)
        assert torch.equal(first.rows, twin.rows)
        torch.testing.assert_close(first.values, twin.values, rtol=1e-5, atol=1e-6)
