"""One training run: :func:`train_run` (what ``embscale train`` and every sweep job call), as a :class:`Trainer`
whose steps a reader can hold in mind one at a time:

1. :meth:`Trainer.build` validates everything before anything is written: the batch against the world size, the
   corpus and tokenizer (from the shared cache, built on a miss), the model against the tokenizer, and an existing
   run folder against this config. Bad input raises ``ConfigError`` / ``UserError`` (exit code 2) and leaves no
   results folder behind. Then it builds the model (seeded), the optimizers (:mod:`.optim`) and the batches.
   Under ``training.parallel`` ``fsdp`` / ``hsdp`` on several ranks the model is never whole on every rank
   (:func:`.parallelize.build_sharded_model`): rank 0 builds it with its initialisation in host memory, every rank
   builds it on the ``meta`` device and shards it (:func:`.parallelize.parallelize`, before the optimizers:
   sharding replaces the parameters), then materialises only its shards and receives their values from rank 0,
   whose whole copy is freed at once (``Trainer.sharded_build`` records the bytes each rank held).
2. :meth:`Trainer.restore` resumes from the newest intact checkpoint, if there is one: model, optimizers, data
   position, step and every RNG, with the metrics cut back to the checkpoint's step. On CPU a resumed run
   reproduces the uninterrupted loss curve bit for bit.
3. :meth:`Trainer.begin` writes ``run.json`` (resolved config, accounting, corpus fingerprint, tokenizer, and the
   planned keys the sweep engine gave) for a new run, and status ``running``. On CUDA, float32 matrix products
   use TF32 while the run trains (:func:`tf32_matmuls`), and the process's setting is put back afterwards; with
   ``training.deterministic`` the run's CUDA kernels are the deterministic ones (:func:`deterministic_kernels`).
4. :meth:`Trainer.step` is one optimizer step: gradient accumulation over the micro-batches (bf16 autocast on GPU,
   fp32 on CPU), the MoE auxiliary loss added, row-sparse table gradients averaged over the ranks, gradients
   clipped (one global norm over dense and sparse ones), the optimizers stepped, and the router biases updated on
   the load counts of the whole global batch. :meth:`Trainer.evaluate` takes ``eval_tokens`` of every validation
   split and the sub-layer output norms of one batch; :meth:`Trainer.checkpoint` saves; :meth:`Trainer.run` is
   the loop that calls them on their cadence and watches for divergence and signals.
5. :meth:`Trainer.finish` writes the final checkpoint, metrics and status with the run's summary.

With ``output.tracking``, rank 0 also sends the metrics rows to live-curve trackers (:mod:`.tracking`: TensorBoard
event files, a W&B offline run) from :class:`~.metrics.Metrics`, the one place rows are recorded.

Run states: ``completed``; ``failed`` (an exception: status ``failed`` with the error and traceback, re-raised);
``diverged`` (loss NaN/inf, or above ``spike_factor`` times its running mean); ``interrupted`` (SIGTERM, SIGINT,
SIGUSR1 or SIGUSR2: the step in progress finishes, then a checkpoint, metrics and status are written; train again
to resume). A completed or diverged run is not trained again: :func:`train_run` returns its stored summary.

Start-up is timed (:class:`StartupClock`): seconds to imports done, data ready, model built and first step done, from
the process's start (``train_run(..., started_at=process_started_at())``, as ``embscale train`` and sweep jobs
call it) or from the call; rank 0 logs them in one line and adds them to run.json (``startup``).

MFU uses the accounting's training FLOPs per token and a peak FLOP/s per device: ``EMBSCALE_PEAK_FLOPS`` if set,
else a table of known GPUs (bf16 dense), else NaN (CPU).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embscale.base import rundir
from embscale.base.errors import UserError
from embscale.base.progress import Progress, log
from embscale.training.checkpoint import checkpoint_payload, seed_everything
from embscale.training.config import RunConfig
from embscale.training.data.batches import TrainBatches, eval_batches, eval_starts
from embscale.training.data.shards import CorpusShards, prepare_data
from embscale.training.distributed import Distributed, resolve_device, wants_cuda, wrap_data_parallel
from embscale.training.metrics import Metrics
from embscale.training.optim import build_optimizers, clip_gradients, learning_rate
from embscale.training.parallelize import (
    ShardedBuild,
    build_mesh,
    build_sharded_model,
    clip_sharded_gradients,
    is_sharded,
    parallelize,
)
from embscale.training.table_shard import reduce_row_grads, shard_groups_of
from embscale.training.tracking import Tracker, open_trackers

EXIT_CODES = {"completed": 0, "failed": 1, "diverged": 3, "interrupted": 75}
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
SPIKE_MIN_STEPS = 10  # the spike test needs a running mean of some length
SPIKE_EMA = 0.95  # running mean of the loss: about the last 20 steps
STATUS_INTERVAL_S = 0.25
METRICS_INTERVAL_S = 30.0
# bf16 dense peak FLOP/s by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS = (
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
)


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device (``EMBSCALE_PEAK_FLOPS`` overrides); NaN when unknown."""
    env = os.environ.get("EMBSCALE_PEAK_FLOPS")
    if env:
        try:
            return float(env)
        except ValueError:
            raise UserError(f"EMBSCALE_PEAK_FLOPS must be a number of FLOP/s, got {env!r}") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS:
            if key in name:
                return value
    return float("nan")


class StopFlag:
    """Turns SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 into a flag the training loop reads after each step.

    A second SIGINT raises KeyboardInterrupt (the user insists). Handlers are installed from the main thread only
    and restored by :meth:`restore`.
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


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """TF32 for the float32 matrix products of a run on CUDA (the model's compute is bf16 under autocast), put
    back as it was afterwards: the switch is global to the process, and a caller that trains a run in-process
    must not find its own float32 products changed."""
    if device.type != "cuda":
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


#: cuBLAS's workspace for bitwise-repeatable products (NVIDIA's cuBLAS docs, "Results reproducibility")
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_kernels(device: torch.device, on: bool):
    """``training.deterministic`` on CUDA: ``torch.use_deterministic_algorithms`` (each operation its
    deterministic form, or an error naming the operation that has none), cuDNN deterministic and not autotuned,
    and cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, kept if the environment sets one: cuBLAS reads it
    when the process first uses it, so :func:`train_run` sets it before building anything). The process's
    settings are put back afterwards, as :func:`tf32_matmuls` does; nothing changes on CPU or when ``on`` is
    false."""
    if not on or device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def process_started_at() -> float | None:
    """When this process started, in seconds since the epoch (10 ms resolution), from its start time in
    ``/proc/self/stat`` (clock ticks since boot); None where there is no /proc."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat[stat.rfind(")") + 2 :].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age if age >= 0 else None


class StartupClock:
    """How long one attempt of a run took to start, in phases: ``imports`` (process start to ``train_run``),
    ``data`` (process group, corpus, tokenizer and shards), ``model`` (device, model, optimizers, batches) and
    ``first_step`` (checkpoint restore, run.json, data-parallel wrap, and the first optimizer step with its
    compilation and kernel builds). Started by ``train_run`` with the process's start time, or without one (a
    run trained inside a longer-lived process), when the phases count from the call and ``imports`` is 0, or with
    the moment a warm worker took the run (``since`` "warm worker task": its imports were done before)."""

    PHASES = ("imports", "data", "model", "first_step")

    def __init__(self, started_at: float | None = None, since: str | None = None):
        now = time.time()
        self.from_process = started_at is not None and started_at <= now
        self.origin = started_at if self.from_process else now
        self.marks: dict[str, float] = {"imports": now}
        # what ``started_at`` was, when not the process's start (a warm worker's "warm worker task")
        self.since = (since or "process start") if self.from_process else "train_run call"

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.time()

    def record(self) -> dict[str, Any]:
        """The phases marked so far in seconds, with ``total_s`` (origin to the last mark), ``since`` (``process
        start`` or ``train_run call``) and ``origin`` (seconds since the epoch)."""
        out: dict[str, Any] = {"since": self.since, "origin": round(self.origin, 3)}
        previous = self.origin
        for phase in self.PHASES:
            if phase in self.marks:
                out[f"{phase}_s"] = round(self.marks[phase] - previous, 3)
                previous = self.marks[phase]
        out["total_s"] = round(previous - self.origin, 3)
        return out

    def describe(self) -> str:
        record = self.record()
        phases = ", ".join(f"{phase.replace('_', ' ')} {record[f'{phase}_s']:.2f}s" for phase in self.PHASES
                           if f"{phase}_s" in record)
        return f"start-up {record['total_s']:.2f}s since {record['since']}: {phases}"


def run_dir_for(run_cfg: RunConfig) -> Path:
    """``<output.root>/<output.sweep>/<run_id>``."""
    return Path(run_cfg.output.root) / run_cfg.output.sweep / run_cfg.run_id


def train_run(run_cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = True,
              planned: dict[str, Any] | None = None, *, started_at: float | None = None,
              startup_since: str | None = None) -> dict[str, Any]:
    """Train (or resume, or return the stored result of) one run; returns its summary.

    The summary has ``run_id``, ``run_dir``, ``state`` (completed, diverged, interrupted), ``step``,
    ``total_steps``, ``tokens``, ``train_loss`` (mean of the last 10 steps), ``val_<split>_loss`` (last
    evaluation), ``wall_s``, ``tokens_per_s`` and, where it applies, ``diverged_at`` and ``signal``. ``planned``:
    the sweep engine's planned run.json record, whose keys the trainer's run.json keeps. ``started_at``: when the
    process that trains only this run started (:func:`process_started_at`), so start-up counts from there;
    ``startup_since`` names that moment when it is not the process's start (a warm worker's later run). Raises
    ConfigError / UserError on bad input (nothing written), re-raises training errors after writing status
    ``failed``.
    """
    startup = StartupClock(started_at, startup_since)
    if run_cfg.training.deterministic and wants_cuda(run_cfg.training.device):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)  # before cuBLAS starts
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(run_cfg)
    dist = Distributed("cuda" if wants_cuda(run_cfg.training.device) else "cpu")
    trainer = None
    try:
        trainer = Trainer.build(run_cfg, run_dir, resume, dist, planned, startup=startup)
        if trainer.stored_summary is not None:
            summary = trainer.stored_summary
        else:
            with tf32_matmuls(trainer.device), deterministic_kernels(trainer.device, run_cfg.training.deterministic):
                trainer.restore()
                trainer.begin()
                summary = trainer.run()
        # every rank leaves together before the group is destroyed: a gloo rank destroying its group while
        # another still writes its last files can abort ("terminate called without an active exception")
        dist.barrier()
        return summary
    finally:
        if dist.enabled:
            # free the trainer (sharded modules, optimizer state, the collectives' pending work objects, held in
            # reference cycles) while the interpreter is whole: gloo work objects that are first freed at
            # interpreter shutdown abort the process (SIGABRT, "terminate called without an active exception")
            del trainer
            gc.collect()
        dist.close()


@dataclass
class StepResult:
    """What one optimizer step measured (the step's metrics row is built from it)."""

    train_loss: float
    aux_loss: float
    grad_norm: float
    seconds: float
    load: dict[str, float]
    stop_votes: float  # ranks that got a stop signal


class Trainer:
    """One run's training; see the module docstring for its steps. Build it with :meth:`build`."""

    def __init__(self, run_cfg: RunConfig, run_dir: Path, dist: Distributed):
        self.run_cfg = run_cfg
        self.cfg = run_cfg.training
        self.run_dir = run_dir
        self.dist = dist
        self.run_id = run_cfg.run_id
        self.stored_summary: dict[str, Any] | None = None
        self.startup: StartupClock | None = None
        self.step_count = 0
        self.loss_ema: float | None = None
        self.wall_before = 0.0
        self.last_val: dict[str, float] = {}
        self.last_checkpoint_step = -1
        self.sharded = False  # the model sharded with FSDP2 (training.parallel fsdp / hsdp on several ranks)
        self.table_groups = None  # process groups of row-sharded N-gram tables (training.table_sharding rows)
        self.sharded_build: ShardedBuild | None = None  # how a sharded model was built on this rank

    # ------------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, run_cfg: RunConfig, run_dir: Path, resume: bool, dist: Distributed,
              planned: dict[str, Any] | None = None, startup: StartupClock | None = None) -> Trainer:
        """Validate everything, writing nothing; then build the model, optimizers and batches (seeded)."""
        from embscale.models.accounting import count_parameters
        from embscale.models.model import build_model

        self = cls(run_cfg, run_dir, dist)
        cfg = self.cfg
        self.planned = planned
        self.startup = startup
        self.device = resolve_device(cfg.device, dist.local_rank)
        self.accumulation = cfg.accumulation_steps(dist.world_size)
        self.tokenizer, self.shards = prepare_data(run_cfg.data, report=log if dist.is_main else None)
        self.model_cfg = run_cfg.resolve_model(self.tokenizer.vocab_size, self.tokenizer.eos_token_id)
        _check_splits(self.shards, cfg.seq_len, cfg.eval_tokens)
        if startup is not None:
            startup.mark("data")
        self.accounting = count_parameters(self.model_cfg)
        self.existing = _check_existing_run(run_dir, run_cfg, self.shards, self.tokenizer.fingerprint, resume)
        # every rank has looked at the folder before rank 0 writes to it, so they agree on whether the run is new
        dist.barrier()
        status = rundir.read_status(run_dir) if self.existing else None
        if status and status.get("state") in rundir.DONE_STATES and status.get("summary"):
            if dist.is_main:
                log(f"run {self.run_id} is already {status['state']} ({run_dir}); nothing to do")
            self.stored_summary = status["summary"]
            return self

        self.flops_per_token = self.accounting.flops_per_token(cfg.seq_len)
        self.peak = peak_flops(self.device) * dist.world_size
        seed_everything(cfg.seed)
        # sharding (training.parallel fsdp / hsdp) replaces the parameters: before the optimizers are built
        self.sharded = is_sharded(cfg, dist.world_size)
        if self.sharded:  # built on meta, sharded, each rank's shards filled from rank 0's one whole copy
            mesh = build_mesh(cfg, dist.world_size, dist.local_world_size, self.device)
            self.model, self.sharded_build = build_sharded_model(self.model_cfg, mesh, cfg, self.device)
            if dist.is_main:
                built = self.sharded_build
                log(f"[{self.run_id}] model built on rank 0 ({built.whole_copy_bytes / 2**30:.2f} GiB in host "
                    f"memory) and sharded over {dist.world_size} ranks ({built.local_bytes / 2**30:.2f} GiB on "
                    f"rank 0) in {built.seconds:.1f}s")
        else:
            self.model = build_model(self.model_cfg, device=self.device)
            table_params = self.model.ngram_tables() if cfg.table_optimizer != "adamw" else []
            parallelize(self.model, None, cfg, ignored=table_params)  # activation checkpointing
        self.table_groups = shard_groups_of(self.model)  # their process groups (None: tables replicated)
        self.optimizers, self.tables, self.group_counts = build_optimizers(self.model, cfg, self.device)
        self.batches = TrainBatches(self.shards.train.tokens(), cfg.seq_len, cfg.sequences_per_step,
                                    cfg.micro_batch_size, cfg.seed, dist.rank, dist.world_size)
        self.metrics = Metrics(run_dir, list(self.shards.val), enabled=dist.is_main)
        # one epoch is one pass over the training split's windows; a step takes sequences_per_step of them
        self.planned_epochs = cfg.total_steps * cfg.sequences_per_step / self.batches.n_windows
        if dist.is_main:
            _warn_about_data(self.run_id, self.shards, self.planned_epochs, cfg.eval_tokens)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        if startup is not None:
            startup.mark("model")
        return self

    # ------------------------------------------------------------------------------------------------- restore
    def restore(self) -> None:
        """Resume from the newest intact checkpoint of an existing run (rank 0 sets corrupt ones aside first)."""
        if self.existing is None:
            return
        dist = self.dist
        if dist.is_main:
            rundir.remove_partial_writes(self.run_dir)
        from embscale.training.sharded_checkpoint import restore_latest  # (DCP is imported only when resuming)

        found = restore_latest(self.run_dir, self.model, self.optimizers, self.device, dist, self.sharded)
        if found is not None:
            self.step_count, payload = found
            self.batches.load_state_dict(payload["data"])
            self.loss_ema = payload["loss_ema"]
            self.wall_before = float(payload.get("wall_s", 0.0))
            self.last_checkpoint_step = self.step_count if self.step_count > 0 else -1
            if dist.is_main:
                log(f"resuming run {self.run_id} from step {self.step_count} ({self.run_dir})")
        self.metrics.load(self.step_count)

    # ------------------------------------------------------------------------------------------------- begin
    def begin(self) -> None:
        """Write run.json (a new run) and status ``running``; wrap the model for data parallelism and compile it."""
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.existing is None:
                rundir.write_run_record(self.run_dir, rundir.with_planned(self._run_record(), self.planned))
            rundir.write_status(self.run_dir, "running", step=self.step_count, total_steps=cfg.total_steps)
        dist.barrier()
        if self.sharded:  # sharded in build (training/parallelize.py), each block compiled there
            self.forward_model = self.model
            return
        self.forward_model = wrap_data_parallel(self.model, dist, self.device, self.tables)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)

    def _run_record(self) -> dict[str, Any]:
        shards, tokenizer = self.shards, self.tokenizer
        return {
            "run_id": self.run_id, "config": self.run_cfg.to_dict(), "identity": self.run_cfg.identity(),
            "model": self.model_cfg.to_dict(), "accounting": self.accounting.to_dict(self.cfg.seq_len),
            "corpus": {"id": shards.corpus_id, "fingerprint": shards.corpus_fingerprint},
            "tokenizer": {k: v for k, v in tokenizer.to_dict().items() if k != "cache_hit"},
            "shards": {s.split: {"n_tokens": s.n_tokens, "n_documents": s.n_documents, "path": s.path}
                       for s in (shards.train, *shards.val.values())},
            "epochs": round(self.planned_epochs, 6),
            "total_steps": self.cfg.total_steps, "accumulation_steps": self.accumulation,
            "world_size": self.dist.world_size, "device": str(self.device),
            "parameter_groups": self.group_counts, "torch": torch.__version__,
            "python": sys.version.split()[0], "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # ------------------------------------------------------------------------------------------------- step
    def step(self, stop: StopFlag) -> StepResult:
        """One optimizer step over the global batch; see the module docstring."""
        started = time.monotonic()
        dist, model, device = self.dist, self.model, self.device
        lr = learning_rate(self.step_count, self.cfg)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        micro_batches = self.batches.next_step()
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        for i, (inputs, targets) in enumerate(micro_batches):
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            last = i == len(micro_batches) - 1
            # DDP all-reduces on the last micro-batch only; FSDP reduce-scatters every micro-batch's gradients
            # (skipping it would hold a whole unsharded gradient per rank)
            sync = (self.forward_model.no_sync() if dist.enabled and not last and not self.sharded
                    else contextlib.nullcontext())
            with sync:
                with self.autocast:
                    out = self.forward_model(inputs, targets)
                ((out.loss + out.aux_loss) / self.accumulation).backward()
            loss_sum += out.loss.detach().float()
            aux_sum += out.aux_loss.detach().float()
        # Load statistics of the step's last micro-batch: reading them syncs with the device, and a sync per
        # micro-batch would stall the launch queue.
        load = model.load_stats() if self.model_cfg.is_moe else {}
        if self.table_groups is not None:  # row-sharded tables: each rank's rows, averaged as FSDP does
            reduce_row_grads(self.tables, self.table_groups)
        elif self.tables and dist.enabled:  # before clipping: the norm is over the global batch's gradient
            from embscale.training.table_ddp import all_reduce_table_grads

            all_reduce_table_grads(self.tables)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.sharded:  # sharded gradients (and the tables' row-sparse ones): one global norm
            table_group = self.table_groups.shard_group if self.table_groups is not None else None
            grad_norm = clip_sharded_gradients(list(model.parameters()), self.tables, max_norm, table_group)
        elif self.tables:  # the tables' gradients are row-sparse: one global norm over both kinds
            grad_norm = clip_gradients(list(model.parameters()), self.tables, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        dist.sum_each_(model.router_load_counts())  # every rank balances on the loads of the whole global batch
        model.update_router_biases()
        # One reduction for the step's scalars: loss, auxiliary loss, and whether any rank got a signal.
        stop_flag = torch.tensor(1.0 if stop.signal is not None else 0.0, device=device)
        scalars = dist.sum_(torch.stack([loss_sum / self.accumulation, aux_sum / self.accumulation, stop_flag]))
        train_loss, aux_loss, stop_votes = (float(v) for v in scalars.tolist())
        self.step_count += 1
        return StepResult(train_loss=train_loss / dist.world_size, aux_loss=aux_loss / dist.world_size,
                          grad_norm=float(grad_norm), seconds=time.monotonic() - started, load=load,
                          stop_votes=stop_votes)

    def _metrics_row(self, result: StepResult, lr: float) -> dict[str, Any]:
        cfg = self.cfg
        tokens_per_s = cfg.batch_tokens / result.seconds if result.seconds > 0 else float("nan")
        nan = float("nan")
        row = {"step": self.step_count, "tokens": self.step_count * cfg.batch_tokens, "lr": lr,
               "train_loss": result.train_loss, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
               "mfu": self.flops_per_token * tokens_per_s / self.peak,
               "moe_imbalance": result.load["moe_imbalance"] if self.model_cfg.is_moe else nan,
               "zero_expert_fraction": result.load["zero_expert_fraction"] if self.model_cfg.n_zero_experts else nan,
               "aux_loss": result.aux_loss, "epoch": self.batches.epochs_done}
        row.update({column: nan for column in self.metrics.val_columns})
        return row

    # ------------------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], dict[str, float]]:
        """Mean token loss on every validation split (``eval_tokens`` each), and the output norms of one batch."""
        model, cfg, dist = self.model, self.cfg, self.dist
        model.eval()
        losses, norms = {}, {}
        try:
            for split_index, (split, shard) in enumerate(self.shards.val.items()):
                total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, token count)
                batches = eval_batches(shard.tokens(), cfg.seq_len, cfg.eval_tokens, cfg.micro_batch_size,
                                       dist.rank, dist.world_size)
                if self.sharded:  # every forward gathers parameters: each rank runs as many as the busiest
                    batches = list(batches)
                    self._run_idle_forwards(shard.n_tokens, len(batches))
                for batch_index, (inputs, targets) in enumerate(batches):
                    record = split_index == 0 and batch_index == 0
                    model.record_norms = record
                    with self.autocast:
                        out = model(inputs.to(self.device), targets.to(self.device))
                    if record:
                        norms = model.output_norms()
                        model.record_norms = False
                    total[0] += out.loss.double() * targets.numel()
                    total[1] += targets.numel()
                dist.sum_(total)
                losses[split] = float(total[0] / total[1])
        finally:
            model.train()
        return losses, norms

    @torch.no_grad()
    def _run_idle_forwards(self, n_tokens: int, own_batches: int) -> None:
        """Forwards of a sharded model, their results unused, that bring this rank's count of evaluation batches
        up to rank 0's (which holds the most windows): FSDP gathers the parameters in every forward, a
        collective each rank must join, so unequal counts would hang the run."""
        cfg, world_size = self.cfg, self.dist.world_size
        windows = len(eval_starts(n_tokens, cfg.seq_len, cfg.eval_tokens))
        most = math.ceil(math.ceil(windows / world_size) / cfg.micro_batch_size)
        idle = torch.zeros(1, cfg.seq_len, dtype=torch.int64, device=self.device)
        for _ in range(most - own_batches):
            with self.autocast:
                self.model(idle)

    # ------------------------------------------------------------------------------------------------- checkpoint
    def checkpoint(self) -> None:
        """Flush the metrics and save a checkpoint of the current step (rank 0 writes it; a sharded model's
        ranks each write their shards); every rank waits. ``training.keep_checkpoints`` 0: the metrics only."""
        self.metrics.flush()
        if self.cfg.keep_checkpoints == 0:
            pass
        elif self.sharded:
            from embscale.training.sharded_checkpoint import save_sharded_checkpoint

            state = {"run_id": self.run_id, "data": self.batches.state_dict(), "loss_ema": self.loss_ema,
                     "wall_s": self.wall_s()}
            save_sharded_checkpoint(self.run_dir, self.step_count, self.model, self.optimizers, state, self.device,
                                    self.dist, keep=self.cfg.keep_checkpoints)
        elif self.dist.is_main:
            payload = checkpoint_payload(self.step_count, self.run_id, self.model, self.optimizers,
                                         self.batches.state_dict(), self.device, self.loss_ema, self.wall_s())
            rundir.save_checkpoint(self.run_dir, self.step_count, payload, keep=self.cfg.keep_checkpoints)
        self.last_checkpoint_step = self.step_count
        self.dist.barrier()

    def wall_s(self) -> float:
        return self.wall_before + time.monotonic() - self.started

    # ------------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train to the end (or a signal, or divergence) and :meth:`finish`; returns the summary."""
        cfg, dist, total = self.cfg, self.dist, self.cfg.total_steps
        is_main = dist.is_main
        stop = StopFlag().install()
        progress = Progress(total, f"train {self.run_id}", unit="step", initial=self.step_count,
                            min_interval_s=self.run_cfg.output.log_interval_s) if is_main else None
        state, diverged_at, last_status = "running", None, 0.0
        self.started = time.monotonic()
        try:
            if is_main and self.run_cfg.output.tracking:
                self.metrics.attach(self._open_trackers())
            self.model.train()
            while self.step_count < total:
                lr = learning_rate(self.step_count, cfg)
                result = self.step(stop)
                if self.startup is not None and "first_step" not in self.startup.marks:
                    self._record_startup()
                step = self.step_count
                row = self._metrics_row(result, lr)
                self.metrics.add(row)
                if self._diverged(result.train_loss):
                    state, diverged_at = "diverged", step
                    if progress:
                        progress.write(f"[{self.run_id}] diverged at step {step}: loss {result.train_loss:.4g}"
                                       + (f" (running mean {self.loss_ema:.4g})" if self.loss_ema is not None
                                          else ""))
                    break
                ema = self.loss_ema
                loss = result.train_loss
                self.loss_ema = loss if ema is None else SPIKE_EMA * ema + (1 - SPIKE_EMA) * loss
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
                    values, norms = self.evaluate()
                    self.last_val = values
                    self.metrics.update_last({rundir.val_loss_column(k): v for k, v in values.items()})
                    self.metrics.update_last({f"norm_{k}": v for k, v in norms.items()})
                    if progress:
                        progress.write(f"[{self.run_id}] step {step}: train {result.train_loss:.4f} | "
                                       + " | ".join(f"{rundir.val_loss_column(k)[:-5]} {v:.4f}"
                                                    for k, v in values.items()))
                    self.metrics.flush()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    self.checkpoint()
                if progress:
                    progress.update(1, loss=result.train_loss, tok_s=row["tokens_per_s"])
                now = time.monotonic()
                if is_main and (now - last_status >= STATUS_INTERVAL_S or step == self.last_checkpoint_step):
                    rundir.write_status(self.run_dir, "running", step=step, total_steps=total)
                    last_status = now
                if is_main and now - self.metrics.last_flush >= METRICS_INTERVAL_S:
                    self.metrics.flush()
                if result.stop_votes > 0 and step < total:
                    state = "interrupted"
                    break
            else:
                state = "completed"
            stop.restore()
            if progress:
                progress.close()
                progress = None
            # inside the handler: a rank that dies during the last checkpoint's collectives fails the run here too
            return self.finish(state, diverged_at, stop.signal)
        except BaseException as exc:
            stop.restore()
            if progress:
                progress.close()
            if is_main:
                self.metrics.flush()
                error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                if isinstance(exc, KeyboardInterrupt):
                    error = "interrupted by the user (KeyboardInterrupt)"
                rundir.write_status(self.run_dir, "failed", step=self.step_count, total_steps=total, error=error,
                                    traceback=traceback.format_exc()[-4000:])
                self.metrics.close(ok=False)  # after the status: a tracker that fails to close loses nothing
            raise

    def _open_trackers(self) -> list[Tracker]:
        """This attempt's live-curve trackers (``output.tracking``), fed the metrics rows."""
        output = self.run_cfg.output
        return open_trackers(output.tracking, self.run_dir, self.run_id, output.sweep, self.run_cfg.to_dict())

    def _record_startup(self) -> None:
        """After this attempt's first step (its scalars were read back, so the device has finished it): the
        start-up phases into the log and run.json."""
        self.startup.mark("first_step")
        if self.dist.is_main:
            log(f"[{self.run_id}] {self.startup.describe()}")
            rundir.record_startup(self.run_dir, self.startup.record())

    def _diverged(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        factor = self.cfg.spike_factor
        return (factor > 0 and self.loss_ema is not None and self.step_count > SPIKE_MIN_STEPS
                and loss > factor * self.loss_ema)

    # ------------------------------------------------------------------------------------------------- finish
    def finish(self, state: str, diverged_at: int | None, signal_name: str | None) -> dict[str, Any]:
        """The last checkpoint (completed or interrupted), metrics and status; returns the run's summary."""
        step, total = self.step_count, self.cfg.total_steps
        if state in ("completed", "interrupted") and self.last_checkpoint_step != step:
            self.checkpoint()
        else:
            self.metrics.flush()
        self.metrics.close()
        rows = self.metrics.rows
        last_val = self.last_val or self.metrics.last_validation()  # resumed after the last evaluation
        summary: dict[str, Any] = {
            "run_id": self.run_id, "run_dir": str(self.run_dir), "state": state, "step": step,
            "total_steps": total, "tokens": step * self.cfg.batch_tokens, "epochs": self.batches.epochs_done,
            "train_loss": float(np.mean([r["train_loss"] for r in rows[-10:]] or [float("nan")])),
            "wall_s": self.wall_s(),
            "tokens_per_s": float(np.nanmean([r["tokens_per_s"] for r in rows[-50:]])) if rows else float("nan"),
            **{rundir.val_loss_column(k): v for k, v in last_val.items()},
        }
        if diverged_at is not None:
            summary["diverged_at"] = diverged_at
        if state == "interrupted":
            summary["signal"] = signal_name or "another rank's signal"
        if self.dist.is_main:
            extra: dict[str, Any] = {"summary": _json_safe(summary)}
            if diverged_at is not None:
                extra["diverged_at"] = diverged_at
            if state == "interrupted":
                extra["signal"] = summary["signal"]
            rundir.write_status(self.run_dir, state, step=step, total_steps=total,
                                error=f"diverged at step {diverged_at}" if diverged_at is not None else None, **extra)
            log(f"[{self.run_id}] {state} at step {step}/{total} in {summary['wall_s']:.1f}s ({self.run_dir})")
        return summary


def _warn_about_data(run_id: str, shards: CorpusShards, epochs: float, eval_tokens: int) -> None:
    """Log lines for a run that repeats its training data or evaluates on fewer tokens than it asks for."""
    if epochs > 1:
        log(f"[{run_id}] warning: this run repeats its training data: {epochs:.2f} epochs over the "
            f"{shards.train.n_tokens:,} tokens of the training split")
    for split, shard in shards.val.items():
        if shard.n_tokens < eval_tokens:
            log(f"[{run_id}] warning: validation split {split} has {shard.n_tokens:,} tokens, fewer than "
                f"training.eval_tokens = {eval_tokens:,}; its loss is measured on all of them")


def _check_splits(shards: CorpusShards, seq_len: int, eval_tokens: int) -> None:
    for split, shard in shards.val.items():
        if len(eval_starts(shard.n_tokens, seq_len, eval_tokens)) == 0:
            raise UserError(f"validation split {split} has {shard.n_tokens} tokens, fewer than seq_len + 1 = "
                            f"{seq_len + 1}; give more validation text or a shorter training.seq_len")
    if shards.train.n_tokens < seq_len + 1:
        raise UserError(f"the training split has {shards.train.n_tokens} tokens, fewer than seq_len + 1 = "
                        f"{seq_len + 1}")


def _check_existing_run(run_dir: Path, run_cfg: RunConfig, shards: CorpusShards, tokenizer_fp: str,
                        resume: bool) -> dict[str, Any] | None:
    """Validate a run folder that already exists against this run; returns its run.json (None if new)."""
    run_json = run_dir / rundir.RUN_FILE
    existing = None
    if run_json.is_file():
        try:
            existing = json.loads(run_json.read_text())
        except ValueError as exc:
            raise UserError(f"{run_json} is not valid JSON ({exc}); move the folder away to start over") from None
    if not rundir.written_by_trainer(existing):
        # A new run: an absent or empty folder, or one holding only a planned run.json / status.json.
        leftovers = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
        if leftovers - {rundir.RUN_FILE, rundir.STATUS_FILE}:
            raise UserError(f"{run_dir} exists and is not a run folder of this trainer (no trainer run.json); "
                            "choose another output")
        return None
    if existing.get("identity") != json.loads(json.dumps(run_cfg.identity())):
        raise UserError(f"{run_dir} holds a run of a different configuration; move it away or change output.root "
                        "/ output.sweep")
    if existing.get("corpus", {}).get("id") != shards.corpus_id:
        raise UserError(f"cannot resume {run_dir}: the corpus changed since the run started "
                        f"(corpus id {existing.get('corpus', {}).get('id')} then, {shards.corpus_id} now)")
    if existing.get("tokenizer", {}).get("fingerprint") != tokenizer_fp:
        raise UserError(f"cannot resume {run_dir}: the tokenizer changed since the run started")
    if not resume and rundir.list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already has checkpoints and resuming was turned off; move it away to start "
                        "over")
    return existing


def _json_safe(value: Any) -> Any:
    """NaN and inf as None, so status.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


__all__ = ["EXIT_CODES", "StartupClock", "StopFlag", "Trainer", "peak_flops", "process_started_at", "run_dir_for",
           "train_run"]
