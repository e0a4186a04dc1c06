"""TableAdamW (kernels/table_optim.py): the dense mode equals torch's AdamW, the sparse mode a per-row lazy
Adam reference, the Triton kernels (under TRITON_INTERPRET=1) their PyTorch twins; state round-trips through
torch.save / torch.load(weights_only=True); and the trainer's opt-in wiring (clipping over sparse gradients,
training with each mode, exact resume with the sparse mode, the DDP refusal)."""

from __future__ import annotations

import os

# Before any Triton kernel is decorated: kernels.table_optim decorates at first launch, under this switch.
os.environ["TRITON_INTERPRET"] = "1"

import io  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_data import write_text_corpus  # noqa: E402

from kernels.table_optim import (  # noqa: E402
    RowGrad,
    TableAdamW,
    dense_step_torch,
    dense_step_triton,
    merge_row_grads,
    sparse_step_torch,
    sparse_step_triton,
)
from models.config import ConfigError  # noqa: E402
from sweeps.checkpoint import list_checkpoints  # noqa: E402
from sweeps.run_config import RunConfig  # noqa: E402
from sweeps.status import write_status  # noqa: E402
from sweeps.train import clip_gradients, train_run  # noqa: E402

HYPER = {"lr": 3e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def random_row_grad(generator: torch.Generator, num_rows: int, d: int, touchable: int, count: int) -> RowGrad:
    """``count`` distinct rows among the first ``touchable`` (the rest are never touched), random values."""
    rows = torch.randperm(touchable, generator=generator)[:count].sort().values
    return RowGrad(rows, torch.randn(count, d, generator=generator))


def to_dense(grad: RowGrad, num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, grad.values.shape[1]).index_copy_(0, grad.rows, grad.values)


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
# Triton kernels (interpreter) against the twins
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_rows,d,block_rows", [(37, 5, 4), (19, 130, 8)])
def test_dense_kernel_matches_the_twin(num_rows, d, block_rows):
    generator = torch.Generator().manual_seed(4)
    beta1, beta2 = HYPER["betas"]
    tensors = [torch.randn(num_rows, d, generator=generator) for _ in range(2)]
    tensors.append(torch.rand(num_rows, d, generator=generator))  # exp_avg_sq >= 0
    twin = [t.clone() for t in tensors]
    for step in range(1, 4):
        count = [7, 0, num_rows][step - 1]  # some rows, none, all
        grad = random_row_grad(generator, num_rows, d, touchable=num_rows, count=count)
        kw = {"step": step, "lr": 1e-2, "beta1": beta1, "beta2": beta2, "eps": 1e-8, "weight_decay": 0.1}
        dense_step_triton(*tensors, grad.rows, grad.values, block_rows=block_rows, **kw)
        dense_step_torch(*twin, grad.rows, grad.values, **kw)
        for got, want in zip(tensors, twin, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sparse_kernel_matches_the_twin():
    generator = torch.Generator().manual_seed(5)
    num_rows, d = 41, 6
    beta1, beta2 = HYPER["betas"]
    tensors = [torch.randn(num_rows, d, generator=generator), torch.randn(num_rows, d, generator=generator),
               torch.rand(num_rows, d, generator=generator), torch.zeros(num_rows, dtype=torch.int64)]
    twin = [t.clone() for t in tensors]
    for _ in range(4):
        grad = random_row_grad(generator, num_rows, d, touchable=num_rows - 3, count=11)
        kw = {"lr": 1e-2, "beta1": beta1, "beta2": beta2, "eps": 1e-8, "weight_decay": 0.1}
        sparse_step_triton(*tensors, grad.rows, grad.values, block_touched=4, **kw)
        sparse_step_torch(*twin, grad.rows, grad.values, **kw)
    for got, want in zip(tensors, twin, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(tensors[3], twin[3]) and tensors[3].sum() > 0


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_optimizer_on_the_triton_backend_matches_the_torch_backend(mode):
    generator = torch.Generator().manual_seed(6)
    init = torch.randn(30, 5, generator=generator)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_a = TableAdamW([a], mode=mode, backend="triton", **HYPER)
    opt_b = TableAdamW([b], mode=mode, backend="torch", **HYPER)
    for step in range(6):
        # Merged beforehand with the PyTorch twin: this compares the update kernels, not kernels.ngram's merge
        # (whose interpreted kernel needs TRITON_INTERPRET set before anything imports triton).
        grads = [merge_row_grads(step_grads(generator, 30, 5, step), use_triton=False)]
        a.sparse_grads, b.sparse_grads = list(grads), list(grads)
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_state_round_trips_through_torch_save_weights_only(mode):
    generator = torch.Generator().manual_seed(7)
    init = torch.randn(25, 4, generator=generator)
    grads = [step_grads(generator, 25, 4, step) for step in range(8)]

    def train(table, optimizer, steps):
        for step_grads_ in steps:
            table.sparse_grads = list(step_grads_)
            optimizer.step()
            optimizer.zero_grad()

    straight = torch.nn.Parameter(init.clone())
    opt = TableAdamW([straight], mode=mode, backend="torch", **HYPER)
    train(straight, opt, grads)

    first = torch.nn.Parameter(init.clone())
    opt_first = TableAdamW([first], mode=mode, backend="torch", **HYPER)
    train(first, opt_first, grads[:4])
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
    train(resumed, opt_resumed, grads[4:])
    assert torch.equal(resumed.data, straight.data)

    other = "dense" if mode == "sparse" else "sparse"
    with pytest.raises(ValueError, match="mode"):
        TableAdamW([torch.nn.Parameter(init.clone())], mode=other, **HYPER).load_state_dict(saved["optimizer"])


def test_bad_arguments_are_refused():
    table = torch.nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="mode"):
        TableAdamW([table], mode="lazy")
    with pytest.raises(ValueError, match="2-D"):
        TableAdamW([torch.nn.Parameter(torch.zeros(4))])


# ----------------------------------------------------------------------------------------------------------
# Trainer wiring
# ----------------------------------------------------------------------------------------------------------
def test_clipping_includes_the_sparse_gradients(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # merge with the PyTorch twin (as the trainer does on CPU)
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
    monkeypatch.delenv("TRITON_INTERPRET")  # the trainer on CPU runs the PyTorch twins
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


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_training_with_a_table_optimizer_lowers_the_loss(trainer_env, tmp_path, mode):
    summary = train_run(RunConfig.from_dict(ne_run(trainer_env, tmp_path, table_optimizer=mode)))
    frame = pd.read_parquet(Path(summary["run_dir"]) / "metrics.parquet")
    assert summary["state"] == "completed"
    assert frame["train_loss"].iloc[-3:].mean() < frame["train_loss"].iloc[:3].mean() - 0.5
    state = torch.load(list_checkpoints(Path(summary["run_dir"]) / "checkpoints")[-1][1], weights_only=True)
    table_state = state["table_optimizer"]["state"][0]
    assert table_state["step"] == 20 and ("row_step" in table_state) == (mode == "sparse")
    assert table_state["exp_avg"].abs().sum() > 0


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
    write_status(run_dir, "running", 8, 12)
    resumed = train_run(cfg)
    assert resumed["state"] == "completed" and resumed["step"] == 12
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    assert frame["step"].tolist() == list(range(1, 13))
    assert frame["train_loss"].tolist() == expected["train_loss"].tolist()
    assert frame["grad_norm"].tolist() == expected["grad_norm"].tolist()


def test_table_optimizer_needs_ngram_tables_and_one_process(trainer_env, tmp_path, monkeypatch):
    data = ne_run(trainer_env, tmp_path, table_optimizer="sparse", steps=2)
    data["model"].pop("ngram")
    with pytest.raises(ConfigError, match="no model.ngram"):
        train_run(RunConfig.from_dict(data))
    assert not (tmp_path / "t").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no process group needed
    with pytest.raises(ConfigError, match="DDP") as error:
        train_run(RunConfig.from_dict(ne_run(trainer_env, tmp_path, table_optimizer="dense", steps=2)))
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
