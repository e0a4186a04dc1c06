"""The MoE gather-sum kernel (kernels/slot_sum.py) against its PyTorch twin, bit for bit: ragged token counts,
non-power-of-two widths, k from 1 to 12, with and without the zero-expert mask (masked slots pointing at garbage
rows), bf16, fp16 and fp32; and the MoE's Combine forward and Dispatch backward routed through it. The kernel runs
compiled on CUDA tensors when a GPU is there, otherwise in Triton's CPU interpreter (conftest.py; the
``kernel_device`` fixture), so the shapes are small."""

from __future__ import annotations

import pytest
import torch

from embscale.kernels import moe_dispatch
from embscale.kernels import slot_sum as ks

pytestmark = [pytest.mark.skipif(ks.triton is None, reason="Triton is not installed"),
              pytest.mark.usefixtures("one_thread")]


def inputs(tokens: int, k: int, width: int, dtype: torch.dtype, seed: int = 0, mask: bool = False,
           device: torch.device | str = "cpu"):
    """Random ``rows (M, D)`` (``M = tokens * k`` plus one garbage row of NaN), a random permutation of slots as
    ``slot_pos (T, k)``, and (``mask``) ``slot_real (T, k)`` about a third False, every masked slot pointing at the
    NaN row, one token with all its slots masked (drawn on the CPU generator: the same values on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    m = tokens * k
    rows = torch.cat([torch.randn(m, width, generator=gen), torch.full((1, width), float("nan"))]).to(dtype)
    slot_pos = torch.randperm(m, generator=gen).view(tokens, k)
    slot_real = None
    if mask:
        slot_real = torch.rand(tokens, k, generator=gen) > 0.35
        slot_real[tokens // 2] = False
        slot_pos = torch.where(slot_real, slot_pos, m)  # a zero expert's slot: its row is never read
        slot_real = slot_real.to(device)
    return rows.to(device), slot_pos.to(device), slot_real


SHAPES = [(1, 1, 24), (37, 8, 96), (130, 3, 160), (16, 12, 8), (5, 2, 1030)]


def same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit where the kernel is compiled. Triton's CPU interpreter rounds fp32 to bf16 or fp16 toward zero
    (a compiled kernel, like PyTorch, to nearest), so there the two may differ by one unit in the last place of
    the output dtype; the fp32 sums themselves are checked bit for bit by the float32 cases."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_cuda or actual.dtype == torch.float32:
        assert torch.equal(actual, expected)
    else:
        ulp = torch.finfo(actual.dtype).eps  # one unit in the last place at magnitude 1, relative
        torch.testing.assert_close(actual.float(), expected.float(), rtol=ulp, atol=0)


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "k", "width"), SHAPES)
def test_kernel_equals_twin_bit_for_bit(tokens, k, width, dtype, mask, kernel_device):
    rows, slot_pos, slot_real = inputs(tokens, k, width, dtype, seed=tokens * k + width, mask=mask,
                                       device=kernel_device)
    out = ks.sum_slots(rows, slot_pos, slot_real)
    expected = ks.reference_sum_slots(rows, slot_pos, slot_real)
    assert out.dtype == dtype and out.shape == (tokens, width)
    same(out, expected)  # the same fp32 additions in the same order, one rounding
    assert not out.isnan().any()  # the masked slots' NaN row was never added
    if mask:
        assert torch.all(out[tokens // 2] == 0)


@pytest.mark.parametrize(("block_t", "block_d"), [(1, 16), (4, 32), (8, 64)])
def test_chunked_tiles_equal_twin(block_t, block_d, kernel_device):
    """Tiles narrower than D (the loop over column chunks, a ragged last chunk) and ragged token blocks."""
    rows, slot_pos, slot_real = inputs(37, 4, 100, torch.bfloat16, seed=block_d, mask=True, device=kernel_device)
    out = ks.sum_slots(rows, slot_pos, slot_real, block_t=block_t, block_d=block_d)
    same(out, ks.reference_sum_slots(rows, slot_pos, slot_real))


def test_strided_rows_empty_and_bad_input(kernel_device):
    rows, slot_pos, _ = inputs(20, 3, 24, torch.float32, seed=3, device=kernel_device)
    wide = torch.randn(rows.shape[0], 40).to(kernel_device)
    wide[:, :24] = rows
    assert torch.equal(ks.sum_slots(wide[:, :24], slot_pos), ks.reference_sum_slots(rows, slot_pos, None))
    none = torch.empty(0, 3, dtype=torch.int64, device=kernel_device)
    assert ks.sum_slots(rows, none).shape == (0, 24)
    with pytest.raises(ValueError, match="float64"):
        ks.sum_slots(rows.double(), slot_pos)
    with pytest.raises(ValueError, match="slot_real"):
        ks.sum_slots(rows, slot_pos, torch.ones(20, 2, dtype=torch.bool, device=kernel_device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_and_dispatch_through_the_kernel(monkeypatch, dtype, kernel_device):
    """The MoE's Combine forward and Dispatch backward routed to the kernel (by themselves on CUDA, as the layer
    runs there; on the CPU the default is the twin, so the call is routed here) give the twin path's results."""
    calls = []
    kernel = ks.sum_slots
    monkeypatch.setattr(ks, "sum_slots", lambda *a: calls.append("kernel") or kernel(*a))
    moe_dispatch.sum_slots(*inputs(3, 2, 8, dtype, device=kernel_device)[:2], None)
    assert calls == (["kernel"] if kernel_device.type == "cuda" else [])  # CPU: the twin, even interpreted
    monkeypatch.undo()
    tokens, k, width = 29, 4, 48
    rows, slot_pos, _ = inputs(tokens, k, width, dtype, seed=11, device=kernel_device)
    _, _, slot_real = inputs(tokens, k, width, dtype, seed=11, mask=True, device=kernel_device)
    rows = rows[:-1].clone()  # (M, D): every row is some token's slot, as after the experts
    token_of_row = torch.empty(tokens * k, dtype=torch.int64, device=kernel_device)
    token_of_row[slot_pos.flatten()] = torch.arange(tokens, device=kernel_device).repeat_interleave(k)

    def run(route_to_kernel: bool):
        if route_to_kernel and kernel_device.type != "cuda":
            monkeypatch.setattr(moe_dispatch, "sum_slots", lambda r, p, m: ks.sum_slots(r, p, m))
        elif not route_to_kernel:
            monkeypatch.setattr(moe_dispatch, "sum_slots", lambda r, p, m: ks.reference_sum_slots(r, p, m))
        expert_rows = rows.clone().requires_grad_(True)
        combined = moe_dispatch.Combine.apply(expert_rows, token_of_row, slot_pos, slot_real)
        x = combined.detach().clone().requires_grad_(True)
        dispatched = moe_dispatch.Dispatch.apply(x, token_of_row, slot_pos, slot_real)
        dispatched.backward(expert_rows.detach())
        monkeypatch.undo()
        return combined.detach(), x.grad

    kernel_combined, kernel_grad = run(route_to_kernel=True)
    twin_combined, twin_grad = run(route_to_kernel=False)
    same(kernel_combined, twin_combined)
    same(kernel_grad, twin_grad)
