"""TableAdamW (kernels/table_optim.py): the dense mode equals torch's AdamW, the sparse mode a per-row lazy
Adam reference, compact moments a float64 partial row-wise reference, the Triton kernels (compiled on CUDA
tensors when a GPU is there, otherwise in Triton's CPU interpreter: conftest.py decides, the ``kernel_device``
fixture) their PyTorch twins; padded gradients (PAD_ROW slots) give exactly the unpadded results; state
round-trips through torch.save / torch.load(weights_only=True); and the trainer's opt-in wiring on the CPU
(clipping over sparse gradients, training with each mode and with compact moments, exact resume with the sparse
mode, a model without N-gram tables refused). Under DDP: tests/test_ddp.py."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_data import write_text_corpus

from embscale.base.errors import ConfigError
from embscale.base.rundir import list_checkpoints, write_status
from embscale.kernels.table_optim import (
    PAD_ROW,
    RowGrad,
    TableAdamW,
    dense_step_torch,
    dense_step_triton,
    merge_row_grads,
    sparse_step_torch,
    sparse_step_triton,
)
from embscale.training.config import RunConfig
from embscale.training.optim import clip_gradients
from embscale.training.trainer import train_run

HYPER = {"lr": 3e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def random_row_grad(generator: torch.Generator, num_rows: int, d: int, touchable: int, count: int) -> RowGrad:
    """``count`` distinct rows among the first ``touchable`` (the rest are never touched), random values."""
    rows = torch.randperm(touchable, generator=generator)[:count].sort().values
    return RowGrad(rows, torch.randn(count, d, generator=generator))


def to_dense(grad: RowGrad, num_rows: int) -> torch.Tensor:
    real = grad.rows != PAD_ROW
    return torch.zeros(num_rows, grad.values.shape[1]).index_copy_(0, grad.rows[real], grad.values[real])


def padded(grad: RowGrad, extra: int) -> RowGrad:
    """``grad`` with ``extra`` padding slots appended (rows PAD_ROW, values exactly zero): the contract of
    ``kernels.ngram.SparseRowGrad``, whose P is the number of lookups and U only known on the device."""
    rows = torch.cat([grad.rows, torch.full((extra,), PAD_ROW, dtype=torch.int64)])
    return RowGrad(rows, torch.cat([grad.values, grad.values.new_zeros(extra, grad.values.shape[1])]))


def moved(grad: RowGrad, device: torch.device) -> RowGrad:
    """``grad`` (made on the CPU: the same values on every machine) on ``device``."""
    return RowGrad(grad.rows.to(device), grad.values.to(device))


def state_tensors(num_rows: int, d: int, generator: torch.Generator, moments: str = "full") -> list[torch.Tensor]:
    """Random (param, exp_avg, exp_avg_sq) for the step functions: never zeros, exp_avg_sq >= 0."""
    param = torch.randn(num_rows, d, generator=generator)
    exp_avg = torch.randn(num_rows, d, generator=generator)
    if moments == "compact":
        return [param, exp_avg.bfloat16(), torch.rand(num_rows, generator=generator)]
    return [param, exp_avg, torch.rand(num_rows, d, generator=generator)]


def run_steps(table: torch.nn.Parameter, optimizer: TableAdamW, steps: list[list[RowGrad]]) -> None:
    """One optimizer step per entry of ``steps`` (that step's micro-batch row gradients)."""
    for step_grads_ in steps:
        table.sparse_grads = list(step_grads_)
        optimizer.step()
        optimizer.zero_grad()


def step_grads(generator: torch.Generator, num_rows: int, d: int, step: int) -> list[RowGrad]:
    """Two micro-batches' sparse gradients (overlapping rows); every fifth step touches no row at all."""
    if step % 5 == 4:
        return [RowGrad(torch.zeros(0, dtype=torch.int64), torch.zeros(0, d))]
    return [random_row_grad(generator, num_rows, d, touchable=num_rows - 5, count=6) for _ in range(2)]


# ----------------------------------------------------------------------------------------------------------
# The PyTorch twins against their definitions
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_mode_equals_torch_adamw_over_50_steps(weight_decay):
    generator = torch.Generator().manual_seed(0)
    num_rows, d = 40, 6
    init = torch.randn(num_rows, d, generator=generator)
    table = torch.nn.Parameter(init.clone())
    reference = torch.nn.Parameter(init.clone())
    hyper = {**HYPER, "weight_decay": weight_decay}
    ours = TableAdamW([table], mode="dense", backend="torch", **hyper)
    theirs = torch.optim.AdamW([reference], foreach=False, **hyper)
    for step in range(50):
        lr = hyper["lr"] * (1 - step / 60)  # a schedule through param_groups
        ours.param_groups[0]["lr"] = theirs.param_groups[0]["lr"] = lr
        grads = step_grads(generator, num_rows, d, step)
        table.sparse_grads = list(grads)
        reference.grad = sum(to_dense(g, num_rows) for g in grads)
        ours.step()
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
        assert table.grad is None and table.sparse_grads == []
    torch.testing.assert_close(table.data, reference.data, rtol=1e-6, atol=1e-7)
    state, expected = ours.state[table], theirs.state[reference]
    torch.testing.assert_close(state["exp_avg"], expected["exp_avg"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(state["exp_avg_sq"], expected["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert state["step"] == int(expected["step"]) == 50
    never = slice(num_rows - 5, num_rows)  # never touched: g = 0 there, so only weight decay moves them
    assert state["exp_avg"][never].abs().sum() == 0
    if weight_decay:
        assert (table.data[never].abs() < init[never].abs()).all()
    else:
        assert torch.equal(table.data[never], init[never])


def test_dense_mode_takes_a_plain_dense_grad_too():
    generator = torch.Generator().manual_seed(1)
    init = torch.randn(20, 4, generator=generator)
    table, reference = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = TableAdamW([table], mode="dense", backend="torch", **HYPER)
    theirs = torch.optim.AdamW([reference], foreach=False, **HYPER)
    for _ in range(10):
        grad = torch.randn(20, 4, generator=generator)
        table.grad, reference.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(table.data, reference.data, rtol=1e-6, atol=1e-7)


def lazy_adam_reference(init: torch.Tensor, steps: list[list[RowGrad]], lrs: list[float]) -> torch.Tensor:
    """Per-row lazy AdamW written plainly: a row moves only at the steps that touch it, with its own count."""
    beta1, beta2 = HYPER["betas"]
    table = init.clone().double()
    m, v = torch.zeros_like(table), torch.zeros_like(table)
    count = [0] * table.shape[0]
    for grads, lr in zip(steps, lrs, strict=True):
        summed: dict[int, torch.Tensor] = {}
        for grad in grads:
            for row, value in zip(grad.rows.tolist(), grad.values.double(), strict=True):
                summed[row] = summed.get(row, 0) + value
        for row, g in summed.items():
            count[row] += 1
            t = count[row]
            table[row] *= 1 - lr * HYPER["weight_decay"]
            m[row] = beta1 * m[row] + (1 - beta1) * g
            v[row] = beta2 * v[row] + (1 - beta2) * g * g
            m_hat, v_hat = m[row] / (1 - beta1**t), v[row] / (1 - beta2**t)
            table[row] -= lr * m_hat / (v_hat.sqrt() + HYPER["eps"])
    return table.float()


def test_sparse_mode_equals_a_per_row_lazy_adam_over_50_steps():
    generator = torch.Generator().manual_seed(2)
    num_rows, d = 40, 6
    init = torch.randn(num_rows, d, generator=generator)
    table = torch.nn.Parameter(init.clone())
    optimizer = TableAdamW([table], mode="sparse", backend="torch", **HYPER)
    history, lrs = [], []
    for step in range(50):
        lr = HYPER["lr"] * (1 - step / 60)
        optimizer.param_groups[0]["lr"] = lr
        grads = step_grads(generator, num_rows, d, step)
        table.sparse_grads = list(grads)
        optimizer.step()
        optimizer.zero_grad()
        history.append(grads)
        lrs.append(lr)
    expected = lazy_adam_reference(init, history, lrs)
    torch.testing.assert_close(table.data, expected, rtol=1e-5, atol=1e-6)
    never = slice(num_rows - 5, num_rows)
    assert torch.equal(table.data[never], init[never])  # untouched rows never move (no decay either)
    touched = torch.unique(torch.cat([g.rows for grads in history for g in grads]))
    row_step = optimizer.state[table]["row_step"]
    assert row_step.dtype == torch.int64 and row_step[never].sum() == 0 and (row_step[touched] > 0).all()
    assert row_step.max() < 50 <= optimizer.state[table]["step"]  # per-row counts differ from the global one


def test_sparse_mode_with_a_dense_grad_updates_its_nonzero_rows():
    generator = torch.Generator().manual_seed(3)
    init = torch.randn(12, 3, generator=generator)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_a = TableAdamW([a], mode="sparse", backend="torch", **HYPER)
    opt_b = TableAdamW([b], mode="sparse", backend="torch", **HYPER)
    for _ in range(5):
        grad = random_row_grad(generator, 12, 3, touchable=10, count=4)
        a.grad = to_dense(grad, 12)
        b.sparse_grads = [grad]
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    torch.testing.assert_close(a.data, b.data, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (compiled on a GPU, interpreted on the CPU) against the twins
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("moments", ["full", "compact"])
@pytest.mark.parametrize("num_rows,d,block_rows", [(37, 5, 4), (19, 130, 8)])
def test_dense_kernel_matches_the_twin(num_rows, d, block_rows, moments, kernel_device):
    generator = torch.Generator().manual_seed(4)
    beta1, beta2 = HYPER["betas"]
    tensors = [t.to(kernel_device) for t in state_tensors(num_rows, d, generator, moments)]
    twin = [t.clone() for t in tensors]
    for step in range(1, 5):
        count = [7, 0, num_rows, 5][step - 1]  # some rows, none, all, some with padding
        grad = padded(random_row_grad(generator, num_rows, d, touchable=num_rows, count=count), 3 * (step // 4))
        grad = moved(grad, kernel_device)
        kw = {"step": step, "lr": 1e-2, "beta1": beta1, "beta2": beta2, "eps": 1e-8, "weight_decay": 0.1}
        dense_step_triton(*tensors, grad.rows, grad.values, block_rows=block_rows, **kw)
        dense_step_torch(*twin, grad.rows, grad.values, **kw)
        for got, want in zip(tensors, twin, strict=True):
            # compact m (bf16): the same fp32 op sequence and round-to-nearest-even on both sides: equal bits
            exact = got.dtype == torch.bfloat16
            torch.testing.assert_close(got, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("moments", ["full", "compact"])
def test_sparse_kernel_matches_the_twin(moments, kernel_device):
    """Step counts and bias corrections are computed in the kernel (float64 exp(t log b)), the twin's with
    torch.pow: they agree to an fp32 ulp, so the tolerance stays tight."""
    generator = torch.Generator().manual_seed(5)
    num_rows, d = 41, 6
    beta1, beta2 = HYPER["betas"]
    tensors = state_tensors(num_rows, d, generator, moments) + [torch.zeros(num_rows, dtype=torch.int64)]
    tensors = [t.to(kernel_device) for t in tensors]
    twin = [t.clone() for t in tensors]
    for step in range(6):
        grad = padded(random_row_grad(generator, num_rows, d, touchable=num_rows - 3, count=11), step % 3 * 4)
        grad = moved(grad, kernel_device)
        kw = {"lr": 1e-2 * (1 - step / 10), "beta1": beta1, "beta2": beta2, "eps": 1e-8, "weight_decay": 0.1}
        sparse_step_triton(*tensors, grad.rows, grad.values, block_touched=4, **kw)
        sparse_step_torch(*twin, grad.rows, grad.values, **kw)
    for got, want in zip(tensors, twin, strict=True):
        exact = got.dtype == torch.bfloat16  # (see the dense kernel's test)
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7)
    assert torch.equal(tensors[3], twin[3]) and tensors[3].sum() > 0
    assert tensors[3][num_rows - 3:].sum() == 0  # never touched: padding never counts as a row


def test_sparse_kernel_bias_corrections_at_large_step_counts(kernel_device):
    """Rows with step counts in the thousands (b2^t far from 1) and in the first steps (1 - b^t tiny)."""
    generator = torch.Generator().manual_seed(15)
    num_rows, d = 16, 4
    tensors = state_tensors(num_rows, d, generator) + [torch.tensor([0, 1, 2, 9, 99, 999, 4999, 99999] * 2)]
    tensors = [t.to(kernel_device) for t in tensors]
    twin = [t.clone() for t in tensors]
    grad = padded(random_row_grad(generator, num_rows, d, touchable=num_rows, count=num_rows), 5)
    grad = moved(grad, kernel_device)
    kw = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    sparse_step_triton(*tensors, grad.rows, grad.values, **kw)
    sparse_step_torch(*twin, grad.rows, grad.values, **kw)
    for got, want in zip(tensors, twin, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("moments", ["full", "compact"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_optimizer_on_the_triton_backend_matches_the_torch_backend(mode, moments, kernel_device):
    generator = torch.Generator().manual_seed(6)
    init = torch.randn(30, 5, generator=generator).to(kernel_device)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_a = TableAdamW([a], mode=mode, backend="triton", moments=moments, **HYPER)
    opt_b = TableAdamW([b], mode=mode, backend="torch", moments=moments, **HYPER)
    for step in range(6):
        # Merged beforehand with the PyTorch twin (on the CPU): this compares the update kernels, not
        # kernels.ngram's merge (tests/test_kernels_ngram.py compares that).
        grads = [moved(merge_row_grads(step_grads(generator, 30, 5, step), use_triton=False), kernel_device)]
        a.sparse_grads, b.sparse_grads = list(grads), list(grads)
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The padded gradient contract
# ----------------------------------------------------------------------------------------------------------
def test_pad_row_is_the_producers():
    from embscale.kernels.ngram import PAD_ROW as NGRAM_PAD_ROW

    assert PAD_ROW == NGRAM_PAD_ROW == 2**63 - 1


@pytest.mark.parametrize("moments", ["full", "compact"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_padding_slots_change_nothing(mode, backend, moments, kernel_device):
    """The same steps with and without padding give bit-identical tables and state, including a step with
    no slots at all (P = 0) and one with padding only."""
    generator = torch.Generator().manual_seed(9)
    num_rows, d = 23, 5
    steps = [random_row_grad(generator, num_rows, d, touchable=num_rows - 2, count=6) for _ in range(3)]
    steps.insert(1, RowGrad(torch.zeros(0, dtype=torch.int64), torch.zeros(0, d)))
    steps.append(steps[1])
    extras = [4, 3, 1, 7, 2]  # padding per step: the second step is all padding, the last one too
    init = torch.randn(num_rows, d, generator=generator).to(kernel_device)
    plain, pad = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_plain = TableAdamW([plain], mode=mode, backend=backend, moments=moments, **HYPER)
    opt_pad = TableAdamW([pad], mode=mode, backend=backend, moments=moments, **HYPER)
    for grad, extra in zip(steps, extras, strict=True):
        plain.sparse_grads = [moved(grad, kernel_device)]
        pad.sparse_grads = [moved(padded(grad, extra), kernel_device)]
        opt_plain.step()
        opt_pad.step()
        opt_plain.zero_grad()
        opt_pad.zero_grad()
    assert torch.equal(plain.data, pad.data) and not torch.equal(plain.data, init)
    for key, value in opt_plain.state[plain].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_pad.state[pad][key])), key
    assert opt_pad.state[pad]["step"] == 5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_padding_only_gradient_in_sparse_mode_moves_nothing(backend, kernel_device):
    init = torch.randn(9, 3).to(kernel_device)
    table = torch.nn.Parameter(init.clone())
    optimizer = TableAdamW([table], mode="sparse", backend=backend, **HYPER)
    table.sparse_grads = [moved(padded(RowGrad(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3)), 6),
                                kernel_device)]
    optimizer.step()
    state = optimizer.state[table]
    assert torch.equal(table.data, init) and state["row_step"].sum() == 0 and state["exp_avg"].abs().sum() == 0


def test_the_torch_merge_keeps_the_contract():
    """The fallback merge (used when kernels.ngram is missing): sum of padded gradients, distinct rows sorted
    first, then padding up to P = the sum of the inputs' P, zero values there."""
    from embscale.kernels.table_optim import _merge_row_grads_torch

    generator = torch.Generator().manual_seed(10)
    grads = [padded(random_row_grad(generator, 15, 3, touchable=15, count=5), extra) for extra in (2, 0, 3)]
    merged = _merge_row_grads_torch(grads)
    assert merged.rows.numel() == sum(g.rows.numel() for g in grads)
    touched = torch.unique(torch.cat([g.rows[g.rows != PAD_ROW] for g in grads]))
    count = touched.numel()
    assert torch.equal(merged.rows[:count], touched) and (merged.rows[count:] == PAD_ROW).all()
    assert merged.values[count:].abs().sum() == 0
    torch.testing.assert_close(to_dense(merged, 15), sum(to_dense(g, 15) for g in grads))


def test_a_dense_gradient_in_sparse_mode_becomes_padded_rows():
    from embscale.kernels.table_optim import collect_row_grad

    dense = torch.zeros(8, 2)
    dense[[1, 4, 6]] = torch.randn(3, 2)
    table = torch.nn.Parameter(torch.zeros(8, 2))
    table.grad = dense
    grad = collect_row_grad(table, "sparse", use_triton=False)
    assert grad.rows.tolist() == [1, 4, 6] + [PAD_ROW] * 5
    assert torch.equal(to_dense(grad, 8), dense) and grad.values[3:].abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------
# Compact moments (bf16 m per element, fp32 v per row)
# ----------------------------------------------------------------------------------------------------------
def row_wise_reference(init: torch.Tensor, steps: list[list[RowGrad]], lrs: list[float], mode: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial row-wise AdamW written plainly in float64, row by row: m per element (rounded to bf16 after
    each update, as stored), v per row from the mean of g^2; ``dense`` steps every row with the global t,
    ``sparse`` the touched ones with their own counts."""
    beta1, beta2 = HYPER["betas"]
    table = init.clone().double()
    num_rows, d = table.shape
    m, v = torch.zeros_like(table), torch.zeros(num_rows, dtype=torch.float64)
    count = [0] * num_rows
    for t, (grads, lr) in enumerate(zip(steps, lrs, strict=True), start=1):
        summed: dict[int, torch.Tensor] = {}
        for grad in grads:
            for row, value in zip(grad.rows.tolist(), grad.values.double(), strict=True):
                if row != PAD_ROW:
                    summed[row] = summed.get(row, 0) + value
        for row in range(num_rows) if mode == "dense" else sorted(summed):
            g = summed.get(row, torch.zeros(d, dtype=torch.float64))
            count[row] += 1
            t_row = t if mode == "dense" else count[row]
            table[row] *= 1 - lr * HYPER["weight_decay"]
            m[row] = beta1 * m[row] + (1 - beta1) * g
            v[row] = beta2 * v[row] + (1 - beta2) * (g * g).mean()
            m_hat, v_hat = m[row] / (1 - beta1**t_row), v[row] / (1 - beta2**t_row)
            table[row] -= lr * m_hat / (v_hat.sqrt() + HYPER["eps"])
            m[row] = m[row].to(torch.bfloat16).double()
    return table.float(), m, v


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_compact_moments_equal_a_row_wise_reference_over_20_steps(mode):
    generator = torch.Generator().manual_seed(11)
    num_rows, d = 30, 6
    init = torch.randn(num_rows, d, generator=generator)
    table = torch.nn.Parameter(init.clone())
    optimizer = TableAdamW([table], mode=mode, backend="torch", moments="compact", **HYPER)
    history, lrs = [], []
    for step in range(20):
        lr = HYPER["lr"] * (1 - step / 30)
        optimizer.param_groups[0]["lr"] = lr
        grads = [padded(merge_row_grads(step_grads(generator, num_rows, d, step), use_triton=False), 2)]
        table.sparse_grads = list(grads)
        optimizer.step()
        optimizer.zero_grad()
        history.append(grads)
        lrs.append(lr)
    expected, m, v = row_wise_reference(init, history, lrs, mode)
    state = optimizer.state[table]
    # fp32 against float64: v and the table agree closely; m to a bf16 ulp or two (a value next to a rounding
    # boundary may round the other way, and a decaying m carries that on)
    torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=1e-5, atol=0)
    torch.testing.assert_close(state["exp_avg"].double(), m, rtol=2**-6, atol=0)
    torch.testing.assert_close(table.data, expected, rtol=1e-4, atol=1e-5)
    # it is not AdamW: the per-element second moment would move the table elsewhere
    adamw = torch.nn.Parameter(init.clone())
    full = TableAdamW([adamw], mode=mode, backend="torch", **HYPER)
    for grads, lr in zip(history, lrs, strict=True):
        full.param_groups[0]["lr"] = lr
        adamw.sparse_grads = list(grads)
        full.step()
    assert (adamw.data - table.data).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # g^2 of the huge entries
def test_compact_first_moment_rounds_to_nearest_even_in_the_kernel(kernel_device):
    """beta1 = 0 from zero moments stores bf16(g): halfway cases, signs, tiny and huge values, inf and NaN
    must round like torch's .to(torch.bfloat16) (the interpreter's own cast would truncate)."""
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    special = [1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 + 2**-20, 1 + ulp / 2 - 2**-20,
               3.3895314e38, -1e-40, 1e-30, float("inf"), float("-inf"), float("nan"), 0.0]
    values = torch.cat([torch.tensor(special), torch.randn(52, generator=torch.Generator().manual_seed(12))])
    values = values.reshape(8, 8).to(kernel_device)
    table = torch.zeros(8, 8, device=kernel_device)
    exp_avg = torch.zeros(8, 8, dtype=torch.bfloat16, device=kernel_device)
    exp_avg_sq = torch.zeros(8, device=kernel_device)
    dense_step_triton(table, exp_avg, exp_avg_sq, torch.arange(8, device=kernel_device), values, step=1, lr=1e-3,
                      beta1=0.0, beta2=0.5, eps=1e-8, weight_decay=0.0)
    nan = values.isnan()  # any NaN will do (torch's CPU cast writes 0xFFFF, the kernel the canonical 0x7FC0)
    assert torch.equal(exp_avg.isnan(), nan)
    assert torch.equal(exp_avg[~nan].view(torch.int16), values[~nan].to(torch.bfloat16).view(torch.int16))


def test_compact_state_memory_round_trip_and_refusal():
    generator = torch.Generator().manual_seed(13)
    num_rows, d = 25, 4
    init = torch.randn(num_rows, d, generator=generator)
    grads = [step_grads(generator, num_rows, d, step) for step in range(8)]

    straight = torch.nn.Parameter(init.clone())
    run_steps(straight, TableAdamW([straight], mode="sparse", backend="torch", moments="compact", **HYPER), grads)
    first = torch.nn.Parameter(init.clone())
    opt_first = TableAdamW([first], mode="sparse", backend="torch", moments="compact", **HYPER)
    run_steps(first, opt_first, grads[:4])
    state = opt_first.state[first]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg"].shape == (num_rows, d)
    assert state["exp_avg_sq"].dtype == torch.float32 and state["exp_avg_sq"].shape == (num_rows,)
    assert state["row_step"].dtype == torch.int64 and state["row_step"].shape == (num_rows,)
    buffer = io.BytesIO()
    torch.save({"table": first.data, "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = torch.nn.Parameter(saved["table"].clone())
    opt_resumed = TableAdamW([resumed], mode="sparse", backend="torch", moments="compact", **HYPER)
    opt_resumed.load_state_dict(saved["optimizer"])
    loaded = opt_resumed.state[resumed]
    assert loaded["exp_avg"].dtype == torch.bfloat16 and loaded["exp_avg_sq"].shape == (num_rows,)
    assert opt_resumed.param_groups[0]["moments"] == "compact"
    run_steps(resumed, opt_resumed, grads[4:])
    assert torch.equal(resumed.data, straight.data)

    full = TableAdamW([torch.nn.Parameter(init.clone())], mode="sparse", **HYPER)
    with pytest.raises(ValueError, match="moments 'compact'.*moments 'full'"):
        full.load_state_dict(saved["optimizer"])
    full_state = TableAdamW([first], mode="sparse", backend="torch", **HYPER)
    run_steps(first, full_state, grads[:1])
    compact = TableAdamW([torch.nn.Parameter(init.clone())], mode="sparse", moments="compact", **HYPER)
    with pytest.raises(ValueError, match="moments 'full'.*moments 'compact'"):
        compact.load_state_dict(full_state.state_dict())
    legacy = full_state.state_dict()  # saved before the option existed: no "moments" key, read as full
    for group in legacy["param_groups"]:
        del group["moments"]
    TableAdamW([torch.nn.Parameter(init.clone())], mode="sparse", **HYPER).load_state_dict(legacy)
    with pytest.raises(ValueError, match="moments 'full'.*moments 'compact'"):
        compact.load_state_dict(legacy)


# ----------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_state_round_trips_through_torch_save_weights_only(mode):
    generator = torch.Generator().manual_seed(7)
    init = torch.randn(25, 4, generator=generator)
    grads = [step_grads(generator, 25, 4, step) for step in range(8)]

    straight = torch.nn.Parameter(init.clone())
    opt = TableAdamW([straight], mode=mode, backend="torch", **HYPER)
    run_steps(straight, opt, grads)

    first = torch.nn.Parameter(init.clone())
    opt_first = TableAdamW([first], mode=mode, backend="torch", **HYPER)
    run_steps(first, opt_first, grads[:4])
    buffer = io.BytesIO()
    torch.save({"table": first.data, "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = torch.nn.Parameter(saved["table"].clone())
    opt_resumed = TableAdamW([resumed], mode=mode, backend="torch", **HYPER)
    opt_resumed.load_state_dict(saved["optimizer"])
    state = opt_resumed.state[resumed]
    assert state["exp_avg"].dtype == torch.float32 and state["step"] == 4
    if mode == "sparse":
        assert state["row_step"].dtype == torch.int64
    run_steps(resumed, opt_resumed, grads[4:])
    assert torch.equal(resumed.data, straight.data)

    other = "dense" if mode == "sparse" else "sparse"
    with pytest.raises(ValueError, match="mode"):
        TableAdamW([torch.nn.Parameter(init.clone())], mode=other, **HYPER).load_state_dict(saved["optimizer"])


def test_bad_arguments_are_refused():
    table = torch.nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="mode"):
        TableAdamW([table], mode="lazy")
    with pytest.raises(ValueError, match="moments"):
        TableAdamW([table], moments="bf16")
    with pytest.raises(ValueError, match="2-D"):
        TableAdamW([torch.nn.Parameter(torch.zeros(4))])


# ----------------------------------------------------------------------------------------------------------
# Trainer wiring
# ----------------------------------------------------------------------------------------------------------
def test_clipping_includes_the_sparse_gradients(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # merge with the PyTorch twin, as the trainer on CPU
    generator = torch.Generator().manual_seed(8)
    weight = torch.nn.Parameter(torch.randn(3, 3, generator=generator))
    table = torch.nn.Parameter(torch.randn(10, 2, generator=generator))
    weight.grad = torch.randn(3, 3, generator=generator)
    table.sparse_grads = [random_row_grad(generator, 10, 2, touchable=10, count=4) for _ in range(2)]
    dense_table = sum(to_dense(g, 10) for g in table.sparse_grads)
    expected_norm = torch.cat([weight.grad.flatten(), dense_table.flatten()]).norm()
    expected_weight = weight.grad * 0.5 / (expected_norm + 1e-6)
    expected_table = dense_table * 0.5 / (expected_norm + 1e-6)

    norm = clip_gradients([weight, table], [table], max_norm=0.5)
    torch.testing.assert_close(norm, expected_norm)
    assert len(table.sparse_grads) == 1  # merged in place
    torch.testing.assert_close(weight.grad, expected_weight)
    torch.testing.assert_close(to_dense(table.sparse_grads[0], 10), expected_table)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_text_corpus(root / "train", 40, seed=1, sentences=40)
    write_text_corpus(root / "val", 3, seed=2, sentences=40)
    return root


@pytest.fixture()
def trainer_env(corpus, monkeypatch):
    monkeypatch.setenv("EMBSCALE_CACHE", str(corpus / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the trainer on CPU runs the PyTorch twins
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield corpus
    torch.set_num_threads(threads)


def ne_run(corpus: Path, results: Path, **training) -> dict:
    return {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "dense_hidden": 64, "max_seq_len": 64,
                  "ngram": {"n": 3, "k": 2, "ratio": 1.0}},
        "training": {"steps": 20, "batch_tokens": 256, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2,
                     "eval_every": 0, "eval_tokens": 256, "checkpoint_every": 0, "device": "cpu", **training},
        "data": {"corpus": str(corpus / "train"), "val_paths": {"held": str(corpus / "val")}, "vocab_size": 300},
        "output": {"root": str(results), "sweep": "t"},
    }


def test_run_config_records_the_choice_and_keeps_default_ids(tmp_path):
    base = RunConfig.from_dict(ne_run(tmp_path, tmp_path))
    explicit = RunConfig.from_dict(ne_run(tmp_path, tmp_path, table_optimizer="adamw", ngram_backend="torch"))
    assert base.run_id == explicit.run_id and "table_optimizer" not in base.identity()["training"]
    sparse = RunConfig.from_dict(ne_run(tmp_path, tmp_path, table_optimizer="sparse"))
    assert sparse.run_id != base.run_id and sparse.identity()["training"]["table_optimizer"] == "sparse"
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(ne_run(tmp_path, tmp_path, table_optimizer="lazy"))
    assert "table_optimizer" in str(error.value.field)
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(ne_run(tmp_path, tmp_path, ngram_backend="cuda"))
    assert "ngram_backend" in str(error.value.field)


def test_run_config_table_optimizer_moments(tmp_path):
    base = RunConfig.from_dict(ne_run(tmp_path, tmp_path, table_optimizer="sparse"))
    explicit = RunConfig.from_dict(ne_run(tmp_path, tmp_path, table_optimizer="sparse",
                                          table_optimizer_moments="full"))
    assert base.run_id == explicit.run_id and "table_optimizer_moments" not in base.identity()["training"]
    compact = RunConfig.from_dict(ne_run(tmp_path, tmp_path, table_optimizer="sparse",
                                         table_optimizer_moments="compact"))
    assert compact.run_id != base.run_id
    assert compact.identity()["training"]["table_optimizer_moments"] == "compact"
    for bad in ({"table_optimizer": "sparse", "table_optimizer_moments": "bf16"},
                {"table_optimizer_moments": "compact"}):  # compact with the default adamw: nothing to apply to
        with pytest.raises(ConfigError) as error:
            RunConfig.from_dict(ne_run(tmp_path, tmp_path, **bad))
        assert error.value.field == "training.table_optimizer_moments"
    assert "adamw" in str(error.value)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_training_with_a_table_optimizer_lowers_the_loss(trainer_env, tmp_path, mode):
    summary = train_run(RunConfig.from_dict(ne_run(trainer_env, tmp_path, table_optimizer=mode)))
    frame = pd.read_parquet(Path(summary["run_dir"]) / "metrics.parquet")
    assert summary["state"] == "completed"
    assert frame["train_loss"].iloc[-3:].mean() < frame["train_loss"].iloc[:3].mean() - 0.5
    state = torch.load(list_checkpoints(Path(summary["run_dir"]))[-1][1], weights_only=True)
    table_state = state["table_optimizer"]["state"][0]
    assert table_state["step"] == 20 and ("row_step" in table_state) == (mode == "sparse")
    assert table_state["exp_avg"].abs().sum() > 0


def test_training_with_compact_moments_lowers_the_loss(trainer_env, tmp_path):
    data = ne_run(trainer_env, tmp_path, table_optimizer="sparse", table_optimizer_moments="compact")
    summary = train_run(RunConfig.from_dict(data))
    frame = pd.read_parquet(Path(summary["run_dir"]) / "metrics.parquet")
    assert summary["state"] == "completed"
    assert frame["train_loss"].iloc[-3:].mean() < frame["train_loss"].iloc[:3].mean() - 0.5
    state = torch.load(list_checkpoints(Path(summary["run_dir"]))[-1][1], weights_only=True)
    table_state = state["table_optimizer"]["state"][0]
    assert table_state["exp_avg"].dtype == torch.bfloat16 and table_state["exp_avg_sq"].ndim == 1
    assert table_state["exp_avg"].abs().sum() > 0 and table_state["row_step"].max() > 0


def test_sparse_table_optimizer_resumes_bit_for_bit(trainer_env, tmp_path):
    data = ne_run(trainer_env, tmp_path / "straight", steps=12, checkpoint_every=4, table_optimizer="sparse")
    straight = train_run(RunConfig.from_dict(data))
    expected = pd.read_parquet(Path(straight["run_dir"]) / "metrics.parquet")

    data["output"]["root"] = str(tmp_path / "resumed")
    cfg = RunConfig.from_dict(data)
    first = train_run(cfg)
    run_dir = Path(first["run_dir"])
    for path in run_dir.glob("checkpoints/step_00000012.pt*"):  # back to the step-8 checkpoint
        path.unlink()
    write_status(run_dir, "running", step=8, total_steps=12)
    resumed = train_run(cfg)
    assert resumed["state"] == "completed" and resumed["step"] == 12
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    assert frame["step"].tolist() == list(range(1, 13))
    assert frame["train_loss"].tolist() == expected["train_loss"].tolist()
    assert frame["grad_norm"].tolist() == expected["grad_norm"].tolist()


def test_table_optimizer_needs_ngram_tables(trainer_env, tmp_path):
    data = ne_run(trainer_env, tmp_path, table_optimizer="sparse", steps=2)
    data["model"].pop("ngram")
    with pytest.raises(ConfigError, match="no model.ngram") as error:
        train_run(RunConfig.from_dict(data))
    assert error.value.field == "training.table_optimizer"
    assert not (tmp_path / "t").exists()


def test_dense_table_optimizer_tracks_plain_adamw(trainer_env, tmp_path):
    """``dense`` is AdamW on the tables, so the run follows the default run up to rounding."""
    curves = {}
    for mode in ("adamw", "dense"):
        summary = train_run(RunConfig.from_dict(ne_run(trainer_env, tmp_path / mode, table_optimizer=mode)))
        curves[mode] = pd.read_parquet(Path(summary["run_dir"]) / "metrics.parquet")
    for column in ("train_loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(curves["dense"][column].values),
                                   torch.tensor(curves["adamw"][column].values), rtol=1e-4, atol=0)
