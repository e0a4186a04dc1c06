"""One training run: ``embscale train RUN.yaml`` or :func:`train_run` (the sweep engine's entry point).

What a run does, in order:

1. Validates everything before writing anything: the run file, the batch against the world size, the corpus
   (path, format, text column, emptiness), the tokenizer, the model against the tokenizer, and an existing
   run folder against this config. Bad input raises ``ConfigError`` / ``UserError`` (exit code 2) and leaves
   no results folder behind. Tokenizer and shards come from the shared cache (built on a miss).
2. Creates ``<results>/<sweep>/<run_id>/`` with ``run.json`` (resolved config, accounting, corpus
   fingerprint, tokenizer) and ``status.json``, or resumes the run found there from its newest intact
   checkpoint: model, optimizer, data position, step and every RNG (python, numpy, torch, CUDA), with
   ``metrics.parquet`` cut back to the checkpoint's step. On CPU a resumed run reproduces the uninterrupted
   loss curve bit for bit.
3. Trains: AdamW (no weight decay on norms, biases and lookup tables -- token embedding, N-gram and per-layer
   tables -- unless ``training.table_weight_decay``), cosine or WSD schedule, gradient clipping, gradient
   accumulation to ``batch_tokens``, bf16 autocast on GPU (fp32 on CPU), optional ``torch.compile``, the MoE
   auxiliary loss added to the loss and ``update_router_biases()`` after every optimizer step. Under
   ``torchrun`` the model is wrapped in DDP (NCCL on GPU, gloo on CPU); MoE load counts are summed over ranks
   before the bias update so every rank balances alike; only rank 0 writes.
   ``training.table_optimizer`` ``dense`` / ``sparse`` (opt-in; default ``adamw`` is the above): every
   ``NgramEmbedding`` of the model (the N-gram embedding and per-layer n-gram tables) gets
   ``sparse_grad = True`` after the model is built (a plain attribute of the module), so its
   ``tables.weight`` receives ``sparse_grads`` (touched rows) instead of a dense ``.grad``; those tables leave
   the AdamW groups and are trained by ``kernels.table_optim.TableAdamW`` in that mode (weight decay only with
   ``table_weight_decay``), with the same learning rate schedule and ``training.table_optimizer_moments``
   (``full`` fp32 moments, or ``compact``: bf16 first moment, fp32 second moment per row). Gradient clipping
   takes the global norm over the dense gradients and the merged sparse ones (``norm^2 = sum ||dense||^2 + sum
   ||values||^2``; the sparse gradients' padding slots are zero) and scales both. Checkpoints hold the table
   optimizer's state under ``table_optimizer``. Under DDP the tables are left out of DDP's reducer
   (``sweeps.table_ddp.exclude_from_ddp``) and, after the step's last backward and before clipping, each
   table's sparse gradient is averaged over the ranks (``all_gather`` of the touched rows, re-reduced in rank
   order: ``sweeps.table_ddp.all_reduce_table_grads``), identical on every rank, so the tables stay in sync.
   ``training.ngram_backend`` sets every ``NgramEmbedding``'s ``backend`` (``torch`` or ``triton``).
4. Evaluates every ``eval_every`` steps and at the end on every validation split with ``eval_tokens`` tokens,
   writes one metrics row per step, checkpoints every ``checkpoint_every`` steps and at the end.

Run states and exit codes of ``embscale train``: ``completed`` 0; ``failed`` (an exception; traceback, status
``failed`` with the error) 1; bad input 2; ``diverged`` (loss NaN/inf, or above ``spike_factor`` times its
running mean) 3; ``interrupted`` (SIGTERM, SIGINT, SIGUSR1 or SIGUSR2: the step in progress finishes, then a
checkpoint, metrics and status are written) 75 (``EX_TEMPFAIL``: run the same command again to resume).
A completed or diverged run is not trained again; ``train_run`` returns its stored summary.

MFU uses the accounting's training FLOPs per token and a peak FLOP/s per device: ``EMBSCALE_PEAK_FLOPS`` if
set, else a table of known GPUs (bf16 dense), else NaN (CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import ConfigError
from sweeps.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from sweeps.data import CorpusShards, TrainBatches, eval_batches, eval_starts, prepare_data
from sweeps.progress import Progress, log
from sweeps.run_config import RunConfig, TrainingConfig
from sweeps.status import TERMINAL_STATES, atomic_write_bytes, atomic_write_json, read_status, write_status

EXIT_CODES = {"completed": 0, "failed": 1, "diverged": 3, "interrupted": 75}
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
SPIKE_MIN_STEPS = 10  # the spike test needs a running mean of some length
SPIKE_EMA = 0.95  # running mean of the loss: about the last 20 steps
STATUS_INTERVAL_S = 0.25
METRICS_INTERVAL_S = 30.0
BASE_COLUMNS = ("step", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s", "mfu", "moe_imbalance",
                "zero_expert_fraction")
# bf16 dense peak FLOP/s by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS = (
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
)


# ----------------------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainingConfig) -> float:
    """Learning rate of the optimizer step that follows ``step`` completed steps."""
    total = cfg.total_steps
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = round(cfg.warmup_fraction * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    decay = round(cfg.decay_fraction * total)
    decay_start = total - decay
    if step < decay_start:
        return peak
    return peak + (floor - peak) * (step - decay_start + 1) / decay


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device (``EMBSCALE_PEAK_FLOPS`` overrides); NaN when unknown."""
    env = os.environ.get("EMBSCALE_PEAK_FLOPS")
    if env:
        try:
            return float(env)
        except ValueError:
            from sweeps.cli import UserError

            raise UserError(f"EMBSCALE_PEAK_FLOPS must be a number of FLOP/s, got {env!r}") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS:
            if key in name:
                return value
    return float("nan")


def parameter_groups(model: torch.nn.Module, weight_decay: float, table_weight_decay: bool,
                     exclude: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()
                     ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """AdamW groups: decay on weight matrices; none on norms, biases and (unless asked) lookup tables.
    ``exclude``: parameters trained by another optimizer (left out of the groups and the counts)."""
    from models.accounting import LOOKUP_GROUPS, parameter_group

    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    excluded = {id(p) for p in exclude}
    decay, no_decay = [], []
    counts = {"decay": 0, "no_decay": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in excluded:
            continue
        try:
            group = parameter_group(name)
        except KeyError:
            group = "embedding" if id(param) in embedding_params else "other"
        table = group in LOOKUP_GROUPS
        if param.ndim < 2 or group == "norms" or (table and not table_weight_decay):
            no_decay.append(param)
            counts["no_decay"] += param.numel()
        else:
            decay.append(param)
            counts["decay"] += param.numel()
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]], counts


def ngram_tables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``tables.weight`` of every ``NgramEmbedding`` in ``model`` (embedding and per-layer), once each."""
    from models.ngram import NgramEmbedding

    tables: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, NgramEmbedding):
            tables.setdefault(id(module.tables.weight), module.tables.weight)
    return list(tables.values())


def configure_ngram(model: torch.nn.Module, tcfg: TrainingConfig) -> None:
    """Set every ``NgramEmbedding``'s ``backend`` and, for a table optimizer, its ``sparse_grad`` switch
    (plain module attributes: the model builder does not take them)."""
    from models.ngram import NgramEmbedding

    for module in model.modules():
        if isinstance(module, NgramEmbedding):
            module.backend = tcfg.ngram_backend
            if tcfg.table_optimizer != "adamw":
                module.sparse_grad = True


def clip_gradients(params: list[torch.Tensor], tables: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over the dense gradients of ``params`` and the row-sparse ones of ``tables``.

    Each table's ``sparse_grads`` (one per micro-batch) is merged in place into one entry first. The total
    norm is the 2-norm over every dense gradient and every merged ``values`` (the merged rows are unique and
    the padding slots' values are exactly zero, so ``||values||`` is the norm of the equivalent dense
    gradient; nothing here reads the number of touched rows, so there is no host sync for it); both kinds
    are scaled by ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does (scaling
    keeps the padding at zero)."""
    from kernels.table_optim import merge_row_grads

    dense = [p for p in params if p.grad is not None]
    sparse_values = []
    for table in tables:
        pending = getattr(table, "sparse_grads", None)
        if pending:
            merged = merge_row_grads(list(pending))
            pending[:] = [merged]
            sparse_values.append(merged.values)
    grads = [p.grad for p in dense] + sparse_values
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    if sparse_values:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(sparse_values, coef.to(sparse_values[0].device))
    return total


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every RNG state as tensors and plain types (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopFlag:
    """Turns SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 into a flag the training loop reads after each step.

    A second SIGINT raises KeyboardInterrupt (the user insists). Handlers are installed from the main thread
    only and restored by :meth:`restore`.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class Distributed:
    """Rank, world size and the process group (initialised here under torchrun, if not already)."""

    def __init__(self, device_kind: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device_kind == "cuda" else "gloo"
            if device_kind == "cuda":
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend=backend)
            self.owns_group = True

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum_(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(value)
        return value

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device", "cuda was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------
class Metrics:
    """Rows of ``metrics.parquet``, rewritten whole (temp file + rename) at each flush."""

    def __init__(self, path: Path, val_splits: list[str], enabled: bool):
        self.path = path
        self.val_columns = [f"val_{split}_loss" for split in val_splits]
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()

    def load(self, up_to_step: int) -> None:
        """Keep the rows of steps ``<= up_to_step`` from an earlier attempt (the checkpoint's steps)."""
        if not self.enabled or not self.path.is_file():
            return
        import pandas as pd

        frame = pd.read_parquet(self.path)
        frame = frame[frame["step"] <= up_to_step]
        self.rows = [{k: v for k, v in row.items() if not _is_missing(v) or k in BASE_COLUMNS}
                     for row in frame.to_dict("records")]

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def update_last(self, values: dict[str, Any]) -> None:
        self.rows[-1].update(values)

    def frame(self) -> Any:
        import pandas as pd

        columns = list(BASE_COLUMNS) + self.val_columns
        extra = sorted({k for row in self.rows for k in row} - set(columns))
        norms = [c for c in extra if c.startswith("norm_")]
        columns += [c for c in extra if c not in norms] + norms
        frame = pd.DataFrame.from_records(self.rows, columns=columns)
        for column in columns:
            if column in ("step", "tokens"):
                frame[column] = frame[column].astype("int64")
            else:
                frame[column] = frame[column].astype("float64")
        return frame

    def flush(self) -> None:
        if not self.enabled:
            return
        import io

        buffer = io.BytesIO()
        self.frame().to_parquet(buffer, index=False)
        atomic_write_bytes(self.path, buffer.getvalue())
        self.last_flush = time.monotonic()


def _is_missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def run_dir_for(run_cfg: RunConfig) -> Path:
    """``<output.root>/<output.sweep>/<run_id>``."""
    return Path(run_cfg.output.root) / run_cfg.output.sweep / run_cfg.run_id


def _check_existing_run(run_dir: Path, run_cfg: RunConfig, shards: CorpusShards, tokenizer_fp: str,
                        resume: bool) -> dict[str, Any] | None:
    """Validate a run folder that already exists against this run; returns its run.json (None if new)."""
    from sweeps.cli import UserError

    run_json = run_dir / "run.json"
    existing = None
    if run_json.is_file():
        try:
            existing = json.loads(run_json.read_text())
        except ValueError as exc:
            raise UserError(f"{run_json} is not valid JSON ({exc}); move the folder away to start over"
                            ) from None
    if not isinstance(existing, dict) or "identity" not in existing:
        # A new run: an absent or empty folder, or one holding only a planned run.json / status.json.
        leftovers = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
        if leftovers - {"run.json", "status.json"}:
            raise UserError(f"{run_dir} exists and is not a run folder of this trainer (no trainer "
                            "run.json); choose another output")
        return None
    if existing.get("identity") != json.loads(json.dumps(run_cfg.identity())):
        raise UserError(f"{run_dir} holds a run of a different configuration; move it away or change "
                        "output.root / output.sweep")
    if existing.get("corpus", {}).get("id") != shards.corpus_id:
        raise UserError(f"cannot resume {run_dir}: the corpus changed since the run started "
                        f"(corpus id {existing.get('corpus', {}).get('id')} then, {shards.corpus_id} now)")
    if existing.get("tokenizer", {}).get("fingerprint") != tokenizer_fp:
        raise UserError(f"cannot resume {run_dir}: the tokenizer changed since the run started")
    if not resume and list_checkpoints(run_dir / "checkpoints"):
        raise UserError(f"{run_dir} already has checkpoints and resuming was turned off; move it away to "
                        "start over")
    return existing


def train_run(run_cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = True) -> dict[str, Any]:
    """Train (or resume, or return the stored result of) one run; returns its summary.

    The summary has ``run_id``, ``run_dir``, ``state`` (completed, diverged, interrupted), ``step``,
    ``total_steps``, ``tokens``, ``train_loss`` (mean of the last 10 steps), ``val_<split>_loss`` (last
    evaluation), ``wall_s``, ``tokens_per_s`` and, where it applies, ``diverged_at`` and ``signal``.
    Raises ConfigError / UserError on bad input (nothing written), re-raises training errors after writing
    status ``failed``.
    """
    tcfg = run_cfg.training
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(run_cfg)
    wants_cuda = tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available())
    dist = Distributed("cuda" if wants_cuda else "cpu")
    try:
        summary = _train(run_cfg, run_dir, resume, dist)
        # every rank leaves together before the group is destroyed: a gloo rank destroying its group while
        # another still writes its last files was seen to abort (SIGABRT, "terminate called without an active
        # exception") once in six CPU runs of the DDP test
        dist.barrier()
        return summary
    finally:
        dist.close()


def _train(run_cfg: RunConfig, run_dir: Path, resume: bool, dist: Distributed) -> dict[str, Any]:
    from sweeps.cli import UserError

    tcfg = run_cfg.training
    # ----- validate everything; write nothing -----
    device = resolve_device(tcfg.device, dist.local_rank)
    accumulation = tcfg.accumulation_steps(dist.world_size)
    tokenizer, shards = prepare_data(run_cfg.data, report=log if dist.is_main else None)
    model_cfg = run_cfg.resolve_model(tokenizer.vocab_size, tokenizer.eos_token_id)
    for split, shard in shards.val.items():
        if len(eval_starts(shard.n_tokens, tcfg.seq_len, tcfg.eval_tokens)) == 0:
            raise UserError(f"validation split {split} has {shard.n_tokens} tokens, fewer than seq_len + 1 = "
                            f"{tcfg.seq_len + 1}; give more validation text or a shorter training.seq_len")
    if shards.train.n_tokens < tcfg.seq_len + 1:
        raise UserError(f"the training split has {shards.train.n_tokens} tokens, fewer than seq_len + 1 = "
                        f"{tcfg.seq_len + 1}")
    from models.accounting import count_parameters
    from models.model import build_model

    accounting = count_parameters(model_cfg)
    existing = _check_existing_run(run_dir, run_cfg, shards, tokenizer.fingerprint, resume)
    status = read_status(run_dir) if existing else None
    if status and status.get("state") in TERMINAL_STATES and status.get("summary"):
        if dist.is_main:
            log(f"run {run_cfg.run_id} is already {status['state']} ({run_dir}); nothing to do")
        return status["summary"]

    total_steps = tcfg.total_steps
    flops_per_token = accounting.flops_per_token(tcfg.seq_len)
    peak = peak_flops(device) * dist.world_size

    # ----- build (seeded), then restore a checkpoint if there is one -----
    seed_everything(tcfg.seed)
    raw_model = build_model(model_cfg, device=device)
    configure_ngram(raw_model, tcfg)
    tables = ngram_tables(raw_model) if tcfg.table_optimizer != "adamw" else []
    if tcfg.table_optimizer != "adamw" and not tables:
        raise ConfigError("training.table_optimizer",
                          f"{tcfg.table_optimizer!r} trains N-gram tables, and this model has none (no model.ngram"
                          " or n-gram per-layer embeddings); use adamw")
    groups, group_counts = parameter_groups(raw_model, tcfg.weight_decay, tcfg.table_weight_decay,
                                            exclude=tables)
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps,
                                  fused=device.type == "cuda")
    table_optimizer = None
    if tables:
        from kernels.table_optim import TableAdamW

        table_optimizer = TableAdamW(tables, lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps,
                                     weight_decay=tcfg.weight_decay if tcfg.table_weight_decay else 0.0,
                                     mode=tcfg.table_optimizer, moments=tcfg.table_optimizer_moments)
        group_counts["table_optimizer"] = sum(t.numel() for t in tables)
    optimizers = [optimizer] + ([table_optimizer] if table_optimizer is not None else [])
    batches = TrainBatches(shards.train.tokens(), tcfg.seq_len, tcfg.sequences_per_step,
                           tcfg.micro_batch_size, tcfg.seed, dist.rank, dist.world_size)

    is_main = dist.is_main
    metrics = Metrics(run_dir / "metrics.parquet", list(shards.val), enabled=is_main)
    ckpt_dir = run_dir / "checkpoints"
    start_step, loss_ema, wall_before = 0, None, 0.0
    if existing is not None:
        if is_main:  # temporary files of writes a killed attempt never finished
            for leftover in run_dir.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
        found = load_latest_checkpoint(ckpt_dir, map_location=device) if is_main else None
        if dist.enabled:  # rank 0 has set corrupt files aside; the others now load the same newest one
            dist.barrier()
            if not is_main:
                found = load_latest_checkpoint(ckpt_dir, map_location=device)
        if found is not None:
            start_step, state = found
            raw_model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if table_optimizer is not None:
                table_optimizer.load_state_dict(state["table_optimizer"])
            batches.load_state_dict(state["data"])
            restore_rng(state["rng"], device)
            loss_ema = state["loss_ema"]
            wall_before = float(state.get("wall_s", 0.0))
            if is_main:
                log(f"resuming run {run_cfg.run_id} from step {start_step} ({run_dir})")
        metrics.load(start_step)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if existing is None:
            atomic_write_json(run_dir / "run.json", {
                "run_id": run_cfg.run_id, "config": run_cfg.to_dict(), "identity": run_cfg.identity(),
                "model": model_cfg.to_dict(), "accounting": accounting.to_dict(tcfg.seq_len),
                "corpus": {"id": shards.corpus_id, "fingerprint": shards.corpus_fingerprint},
                "tokenizer": {k: v for k, v in tokenizer.to_dict().items() if k != "cache_hit"},
                "shards": {s.split: {"n_tokens": s.n_tokens, "n_documents": s.n_documents, "path": s.path}
                           for s in (shards.train, *shards.val.values())},
                "total_steps": total_steps, "accumulation_steps": accumulation, "world_size": dist.world_size,
                "device": str(device), "parameter_groups": group_counts, "torch": torch.__version__,
                "python": sys.version.split()[0], "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        write_status(run_dir, "running", start_step, total_steps)
    dist.barrier()

    # ----- the training loop -----
    model: torch.nn.Module = raw_model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        if tables:  # else DDP all-reduces a table-sized zero .grad for them each step (see sweeps.table_ddp)
            from sweeps.table_ddp import all_reduce_table_grads, exclude_from_ddp

            exclude_from_ddp(raw_model, tables)
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(raw_model, device_ids=device_ids, broadcast_buffers=False)
    if tcfg.compile:
        model = torch.compile(model)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    pending_counts = [m.pending_counts for m in raw_model.modules()
                      if isinstance(getattr(m, "pending_counts", None), torch.Tensor)] if dist.enabled else []
    run_id = run_cfg.run_id
    stop = StopFlag().install()
    progress = Progress(total_steps, f"train {run_id}", unit="step", initial=start_step,
                        min_interval_s=run_cfg.output.log_interval_s) if is_main else None
    state_name, diverged_at, step = "running", None, start_step
    last_status = 0.0
    last_val: dict[str, float] = {}
    started = time.monotonic()
    last_checkpoint_step = start_step if existing is not None and start_step > 0 else -1

    def checkpoint(at_step: int) -> None:
        nonlocal last_checkpoint_step
        metrics.flush()
        if is_main:
            payload = {
                "step": at_step, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "data": batches.state_dict(), "rng": capture_rng(device), "loss_ema": loss_ema,
                "wall_s": wall_before + time.monotonic() - started, "run_id": run_id,
            }
            if table_optimizer is not None:
                payload["table_optimizer"] = table_optimizer.state_dict()
            save_checkpoint(ckpt_dir, at_step, payload, keep=tcfg.keep_checkpoints)
        last_checkpoint_step = at_step
        dist.barrier()

    try:
        raw_model.train()
        while step < total_steps:
            step_start = time.monotonic()
            lr = learning_rate(step, tcfg)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            micro_batches = batches.next_step()
            loss_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            for i, (inputs, targets) in enumerate(micro_batches):
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                last = i == len(micro_batches) - 1
                sync = model.no_sync() if dist.enabled and not last else contextlib.nullcontext()
                with sync:
                    with autocast:
                        out = model(inputs, targets)
                    ((out.loss + out.aux_loss) / accumulation).backward()
                loss_sum += out.loss.detach().float()
                aux_sum += out.aux_loss.detach().float()
            # Load statistics of the step's last micro-batch: reading them syncs with the device, and a sync per
            # micro-batch would stall the launch queue (measured 25% of step time on an H100 for a 100M MoE).
            load = raw_model.load_stats() if raw_model.cfg.is_moe else {}
            if tables and dist.enabled:  # before clipping: the norm is over the global batch's gradient
                all_reduce_table_grads(tables)
            max_norm = tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf")
            if table_optimizer is None:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
            else:  # the tables' gradients are row-sparse: one global norm over both kinds
                grad_norm = clip_gradients(list(raw_model.parameters()), tables, max_norm)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if pending_counts:  # DDP: every rank balances on the loads of the whole global batch
                flat = dist.sum_(torch.cat(pending_counts))
                sizes = [c.numel() for c in pending_counts]
                for counts, summed in zip(pending_counts, flat.split(sizes), strict=True):
                    counts.copy_(summed)
            raw_model.update_router_biases()
            # One reduction for the step's scalars: loss, auxiliary loss, and whether any rank got a signal.
            stop_flag = torch.tensor(1.0 if stop.signal is not None else 0.0, device=device)
            scalars = dist.sum_(torch.stack([loss_sum / accumulation, aux_sum / accumulation, stop_flag]))
            train_loss, aux_loss, stop_votes = (float(v) for v in scalars.tolist())
            train_loss /= dist.world_size
            aux_loss /= dist.world_size
            step += 1
            elapsed = time.monotonic() - step_start
            tokens_per_s = tcfg.batch_tokens / elapsed if elapsed > 0 else float("nan")
            row = {"step": step, "tokens": step * tcfg.batch_tokens, "lr": lr, "train_loss": train_loss,
                   "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s,
                   "mfu": flops_per_token * tokens_per_s / peak,
                   "moe_imbalance": load["moe_imbalance"] if raw_model.cfg.is_moe else float("nan"),
                   "zero_expert_fraction": (load["zero_expert_fraction"] if raw_model.cfg.n_zero_experts
                                            else float("nan")),
                   "aux_loss": aux_loss, "epoch": batches.epochs_done}
            row.update({column: float("nan") for column in metrics.val_columns})
            metrics.add(row)

            # ----- divergence -----
            if not math.isfinite(train_loss):
                state_name, diverged_at = "diverged", step
            elif (tcfg.spike_factor > 0 and loss_ema is not None and step > SPIKE_MIN_STEPS
                  and train_loss > tcfg.spike_factor * loss_ema):
                state_name, diverged_at = "diverged", step
            if state_name == "diverged":
                if progress:
                    progress.write(f"[{run_id}] diverged at step {step}: loss {train_loss:.4g}"
                                   + (f" (running mean {loss_ema:.4g})" if loss_ema is not None else ""))
                break
            loss_ema = train_loss if loss_ema is None else SPIKE_EMA * loss_ema + (1 - SPIKE_EMA) * train_loss

            # ----- evaluation, checkpoint, status -----
            if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == total_steps:
                values, norms = evaluate(raw_model, shards, tcfg, device, dist, autocast)
                last_val = values
                metrics.update_last({f"val_{k}_loss": v for k, v in values.items()})
                metrics.update_last({f"norm_{k}": v for k, v in norms.items()})
                if progress:
                    progress.write(f"[{run_id}] step {step}: train {train_loss:.4f} | "
                                   + " | ".join(f"val_{k} {v:.4f}" for k, v in values.items()))
                metrics.flush()
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < total_steps:
                checkpoint(step)
            if progress:
                progress.update(1, loss=train_loss, tok_s=tokens_per_s)
            now = time.monotonic()
            if is_main and (now - last_status >= STATUS_INTERVAL_S or step == last_checkpoint_step):
                write_status(run_dir, "running", step, total_steps)
                last_status = now
            if is_main and now - metrics.last_flush >= METRICS_INTERVAL_S:
                metrics.flush()
            if stop_votes > 0 and step < total_steps:
                state_name = "interrupted"
                break
        else:
            state_name = "completed"
    except BaseException as exc:
        stop.restore()
        if progress:
            progress.close()
        if is_main:
            metrics.flush()
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            if isinstance(exc, KeyboardInterrupt):
                error = "interrupted by the user (KeyboardInterrupt)"
            write_status(run_dir, "failed", step, total_steps, error=error,
                         traceback=traceback.format_exc()[-4000:])
        raise
    stop.restore()
    if progress:
        progress.close()

    # ----- finish -----
    if state_name in ("completed", "interrupted") and last_checkpoint_step != step:
        checkpoint(step)
    else:
        metrics.flush()
    wall_s = wall_before + time.monotonic() - started
    recent = [r["train_loss"] for r in metrics.rows[-10:]] or [float("nan")]
    if not last_val:  # resumed after the last evaluation: take it from the metrics
        for row in reversed(metrics.rows):
            found = {c[4:-5]: row[c] for c in metrics.val_columns if not _is_missing(row.get(c, float("nan")))}
            if found:
                last_val = found
                break
    summary: dict[str, Any] = {
        "run_id": run_id, "run_dir": str(run_dir), "state": state_name, "step": step,
        "total_steps": total_steps, "tokens": step * tcfg.batch_tokens,
        "train_loss": float(np.mean(recent)), "wall_s": wall_s,
        "tokens_per_s": float(np.nanmean([r["tokens_per_s"] for r in metrics.rows[-50:]]))
        if metrics.rows else float("nan"),
        **{f"val_{k}_loss": v for k, v in last_val.items()},
    }
    if diverged_at is not None:
        summary["diverged_at"] = diverged_at
    if state_name == "interrupted":
        summary["signal"] = stop.signal or "another rank's signal"
    if is_main:
        extra = {"summary": _json_safe(summary)}
        if diverged_at is not None:
            extra["diverged_at"] = diverged_at
        if state_name == "interrupted":
            extra["signal"] = summary["signal"]
        write_status(run_dir, state_name, step, total_steps,
                     error=f"diverged at step {diverged_at}" if diverged_at is not None else None, **extra)
        log(f"[{run_id}] {state_name} at step {step}/{total_steps} in {wall_s:.1f}s ({run_dir})")
    return summary


def _json_safe(value: Any) -> Any:
    """NaN and inf as None, so status.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


@torch.no_grad()
def evaluate(raw_model: torch.nn.Module, shards: CorpusShards, tcfg: TrainingConfig, device: torch.device,
             dist: Distributed, autocast: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Mean token loss on every validation split (``eval_tokens`` each), and the output norms of one batch."""
    raw_model.eval()
    losses, norms = {}, {}
    try:
        for split_index, (split, shard) in enumerate(shards.val.items()):
            total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
            batches = eval_batches(shard.tokens(), tcfg.seq_len, tcfg.eval_tokens, tcfg.micro_batch_size,
                                   dist.rank, dist.world_size)
            for batch_index, (inputs, targets) in enumerate(batches):
                record = split_index == 0 and batch_index == 0 and hasattr(raw_model, "output_norms")
                if record:
                    raw_model.record_norms = True
                with autocast:
                    out = raw_model(inputs.to(device), targets.to(device))
                if record:
                    norms = raw_model.output_norms()
                    raw_model.record_norms = False
                total[0] += out.loss.double() * targets.numel()
                total[1] += targets.numel()
            dist.sum_(total)
            losses[split] = float(total[0] / total[1])
    finally:
        raw_model.train()
    return losses, norms


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_file", help="run file (YAML: model, training, data, output)")
    parser.add_argument("--results", metavar="DIR", help="results root (overrides output.root)")
    parser.add_argument("--sweep", metavar="NAME", help="sweep folder name (overrides output.sweep)")
    parser.add_argument("--no-resume", action="store_true",
                        help="refuse to continue a run that already has checkpoints (default: resume it)")
    parser.epilog = ("exit codes: 0 completed, 1 failed, 2 bad input, 3 diverged, 75 interrupted (signal; "
                     "run the same command again to resume)")


def run(args: argparse.Namespace) -> int:
    run_cfg = RunConfig.from_yaml(args.run_file)
    output = {}
    if args.results:
        output["root"] = args.results
    if args.sweep:
        output["sweep"] = args.sweep
    if output:
        run_cfg = run_cfg.replace(output=output)
    summary = train_run(run_cfg, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        values = " ".join(f"{k}={v:.4f}" for k, v in summary.items() if k.endswith("_loss") and v is not None)
        print(f"{summary['state']}: run {summary['run_id']} step {summary['step']}/{summary['total_steps']} "
              f"{values} -> {summary['run_dir']}")
    return EXIT_CODES.get(summary["state"], 1)


def main() -> int:
    from sweeps.cli import main as cli_main

    return cli_main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EXIT_CODES", "add_arguments", "clip_gradients", "configure_ngram", "evaluate", "learning_rate",
           "ngram_tables", "parameter_groups", "peak_flops", "run", "run_dir_for", "train_run"]
