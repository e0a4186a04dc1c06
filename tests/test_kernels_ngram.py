"""Fused N-gram Embedding kernels (kernels/ngram.py) against the PyTorch path of models.ngram: the hash +
gather kernel (row ids, gathered buffer, module output), the sparse deterministic table gradient against the
dense gradient, the autograd switch on NgramEmbedding, and merge_sparse_grads. Triton runs in its CPU
interpreter here (set below, before kernels.ngram is imported; its kernels are also jitted only at first
launch), so the shapes are small."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is jitted: triton.jit reads it when it decorates

import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import ngram as kn  # noqa: E402
from models.config import ConfigError, NgramConfig  # noqa: E402
from models.ngram import NgramEmbedding, hash_plan, ngram_row_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EOS = 2


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tricky_ids(seed: int, vocab: int, batch: int, time_: int, eos: int | None) -> torch.Tensor:
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
    return torch.tensor(rows, dtype=torch.long)


def make_module(n: int, k: int, vocab: int, width: int, eos: int | None, dtype=torch.float32, seed: int = 0,
                **kwargs) -> NgramEmbedding:
    torch.manual_seed(seed)
    return NgramEmbedding(NgramConfig(n=n, k=k, ratio=1.7), vocab, width, eos, dtype=dtype, **kwargs)


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
def test_triton_gather_matches_module(n, k, width, batch, time_, eos):
    vocab = 997
    module = make_module(n, k, vocab, width, eos)
    ids = tricky_ids(n * 100 + time_, vocab, batch, time_, eos)
    expected_rows = module.row_ids(ids)  # (B, T, S)
    expected = F.embedding(expected_rows, module.tables.weight).flatten(-2)  # (B, T, S*d)

    gathered, rows = kn.triton_gather(ids, module.tables.weight, module.plan, eos)
    assert torch.equal(rows.view_as(expected_rows), expected_rows)
    assert torch.equal(gathered.view_as(expected), expected)
    assert torch.equal(kn.reference_row_ids(ids, module.plan, eos), expected_rows)
    twin, _ = kn.reference_gather(ids, module.tables.weight, module.plan, eos)
    assert torch.equal(twin.view_as(expected), expected)

    # precomputed rows (layers sharing a hash): the kernel only gathers
    given, _ = kn.triton_gather(ids, module.tables.weight, module.plan, eos, rows=expected_rows)
    assert torch.equal(given.view_as(expected), expected)


def test_hash_kernel_at_exactness_limits():
    """Ids near V0 = 2^21 with moduli near 2^31: the kernel's int64 arithmetic matches models.ngram. The
    table (~1.3e10 rows) is a stride-0 view of one float, so only the row ids are real."""
    vocab = 2**21
    spec = NgramConfig(n=4, k=2, ratio=1020.0)
    plan = hash_plan(spec, vocab)
    assert max(plan.moduli) > 2**30
    top = [vocab - 1, vocab - 2, vocab - 3]
    ids = torch.tensor([[top[0], top[1], top[0], EOS, top[2], top[0], top[0], top[1], EOS]])
    expected = ngram_row_ids(ids, spec, vocab, EOS)
    assert torch.equal(kn.reference_row_ids(ids, plan, EOS), expected)
    weight = torch.ones(1).as_strided((plan.total_rows, 1), (0, 1))
    gathered, rows = kn.triton_gather(ids, weight, plan, EOS)
    assert torch.equal(rows.view_as(expected), expected)
    assert torch.equal(gathered, torch.ones_like(gathered))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,width,batch,time_", [SHAPES[1], SHAPES[2]])
def test_module_backend_forward_matches_torch(n, k, width, batch, time_, dtype):
    vocab = 509
    dense = make_module(n, k, vocab, width, EOS, dtype=dtype)
    fused = make_module(n, k, vocab, width, EOS, dtype=dtype, backend="triton")
    ids = tricky_ids(7, vocab, batch, time_, EOS)
    with torch.no_grad():
        expected = dense(ids)
        got = fused(ids)
        rows = dense.row_ids(ids)
        assert torch.equal(fused(ids, rows=rows), got)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def dense_grads(module: NgramEmbedding, ids: torch.Tensor, grad_out: torch.Tensor):
    module.zero_grad(set_to_none=True)
    module(ids).backward(grad_out)
    return module.tables.weight.grad.float(), module.projection.weight.grad, module.token.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n,k,width,batch,time_", [SHAPES[1], SHAPES[3], SHAPES[4]])
def test_sparse_backward_matches_dense(n, k, width, batch, time_, backend, dtype):
    vocab = 61  # small vocabulary and table: many repeated rows, so segments of several entries
    dense = make_module(n, k, vocab, width, EOS, dtype=dtype)
    fused = make_module(n, k, vocab, width, EOS, dtype=dtype, backend=backend, sparse_grad=True)
    ids = tricky_ids(11, vocab, batch, time_, EOS)
    torch.manual_seed(1)
    grad_out = torch.randn(batch, time_, width, dtype=dtype)
    table_grad, projection_grad, token_grad = dense_grads(dense, ids, grad_out)

    fused(ids).backward(grad_out)
    weight = fused.tables.weight
    assert weight.grad is None and len(weight.sparse_grads) == 1
    sparse = weight.sparse_grads[0]
    touched = torch.unique(dense.row_ids(ids))
    assert torch.equal(sparse.rows, touched)
    assert sparse.values.dtype == torch.float32 and sparse.values.shape == (touched.numel(), fused.table_width)
    assert sparse.values.abs().sum() > 0
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(sparse.values, table_grad[touched], **tol)
    untouched = torch.ones(weight.shape[0], dtype=torch.bool)
    untouched[touched] = False
    assert untouched.any() and table_grad[untouched].abs().max() == 0  # zero elsewhere
    torch.testing.assert_close(sparse.to_dense(weight.shape[0]), table_grad, **tol)
    # the dense parameters still get their ordinary gradients
    torch.testing.assert_close(fused.projection.weight.grad, projection_grad, rtol=0, atol=0)
    torch.testing.assert_close(fused.token.weight.grad, token_grad, rtol=0, atol=0)

    # micro-batches accumulate by appending; the merge equals the sum
    fused(ids).backward(grad_out * 0.5)
    assert len(weight.sparse_grads) == 2 and weight.grad is None
    merged = kn.merge_sparse_grads(weight.sparse_grads)
    torch.testing.assert_close(merged.values, table_grad[touched] * 1.5, **tol)


def test_dense_grad_through_kernel_matches_torch():
    """backend='triton' without sparse_grad: weight.grad is the dense gradient (scattered from the sparse
    reduction)."""
    n, k, width, batch, time_ = SHAPES[1]
    dense = make_module(n, k, 61, width, EOS)
    fused = make_module(n, k, 61, width, EOS, backend="triton")
    ids = tricky_ids(3, 61, batch, time_, EOS)
    grad_out = torch.randn(batch, time_, width)
    expected, _, _ = dense_grads(dense, ids, grad_out)
    got, _, _ = dense_grads(fused, ids, grad_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sparse_backward_is_deterministic_and_matches_twin():
    n, k, width, batch, time_ = SHAPES[4]
    module = make_module(n, k, 23, width, EOS, backend="triton", sparse_grad=True)
    ids = tricky_ids(5, 23, batch, time_, EOS)
    grad_out = torch.randn(batch, time_, width)
    for _ in range(2):
        module(ids).backward(grad_out)
    first, second = module.tables.weight.sparse_grads
    assert torch.equal(first.rows, second.rows) and torch.equal(first.values, second.values)

    # kernel and twin add in the same order: bit-identical
    gathered, rows = kn.triton_gather(ids, module.tables.weight, module.plan, EOS)
    grad_rows = torch.randn(rows.numel(), module.table_width)
    kernel = kn.sparse_row_grad(rows, grad_rows, use_triton=True)
    twin = kn.sparse_row_grad(rows, grad_rows, use_triton=False)
    assert torch.equal(kernel.rows, twin.rows) and torch.equal(kernel.values, twin.values)
    assert kernel.rows.numel() < rows.numel()  # repeated rows were reduced


def test_merge_sparse_grads_equals_sum():
    torch.manual_seed(3)
    num_rows, d = 40, 6
    grads, total = [], torch.zeros(num_rows, d)
    for size in (5, 17, 1, 30):
        rows = torch.randint(0, num_rows, (size,))
        values = torch.randn(size, d)
        grad = kn.sparse_row_grad(rows, values, use_triton=True)
        assert torch.equal(grad.rows, torch.unique(rows))
        grads.append(grad)
        total.index_add_(0, rows, values)
    merged = kn.merge_sparse_grads(grads)
    assert torch.equal(merged.rows, torch.unique(torch.cat([g.rows for g in grads])))
    torch.testing.assert_close(merged.to_dense(num_rows), total, rtol=1e-6, atol=1e-6)
    again = kn.merge_sparse_grads(grads, use_triton=False)
    assert torch.equal(again.values, merged.values)
    with pytest.raises(ValueError, match="empty"):
        kn.merge_sparse_grads([])


def test_backend_validation():
    with pytest.raises(ConfigError, match="backend"):
        make_module(3, 1, 50, 8, EOS, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        kn.gather_rows(torch.zeros(3, 2), torch.zeros(1, 2, dtype=torch.long), None, EOS, backend="x")


def test_imports_without_gpu_or_interpreter():
    """kernels.ngram imports with neither a GPU nor the interpreter, and falls back to the twin on CPU."""
    code = (
        "import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from kernels import ngram as kn\n"
        "assert not kn.triton_usable(torch.device('cpu'))\n"
        "from models.config import NgramConfig\n"
        "from models.ngram import NgramEmbedding\n"
        "m = NgramEmbedding(NgramConfig(n=3, k=1, ratio=2.0), 50, 8, 2, backend='triton', sparse_grad=True)\n"
        "m(torch.randint(0, 50, (1, 9))).sum().backward()\n"
        "assert m.tables.weight.grad is None and len(m.tables.weight.sparse_grads) == 1\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
