"""Run configuration: what one training run trains, on what data, and where its results go.

A run file is YAML with four sections::

    model:     # a ModelConfig (models/config.py); vocab_size and eos_token_id may be omitted
    training:  # TrainingConfig: steps or tokens, batch, optimizer, schedule, evaluation, checkpoints
    data:      # DataConfig: corpus (builtin, site, a path of text or token ids), validation splits, tokenizer
    output:    # OutputConfig: results root, sweep name, live-curve trackers (does not enter the run id)

Vocabulary: ``model.vocab_size`` omitted (the usual case) is filled with the tokenizer's size;
given, it must be at least the tokenizer's size (a larger value pads the embedding, e.g. to a multiple of 64).
``model.eos_token_id`` omitted is filled with the tokenizer's end-of-sequence id; given, it must equal it.
Pre-tokenised data has no tokenizer: ``data.vocab_size`` and ``data.eos_token_id`` stand in for its size and id.

``run_id`` is a short hash (10 hex digits) of the model, training and data sections with every default filled
in, so the same run written two ways gets the same id, and the output section (where results go) does not
change it. Opt-in fields added later (training's ``table_optimizer``, ``table_optimizer_moments``,
``ngram_backend``, ``parallel``, ``shard_degree``, ``activation_checkpointing``, ``table_sharding``; data's
``token_column``, ``eos_token_id``) enter the hash only when they differ from their defaults, so existing run ids
are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embscale.base.datafile import build_dataclass, load_config_file
from embscale.base.errors import ConfigError
from embscale.models.config import ModelConfig

SCHEDULES = ("cosine", "wsd")
TABLE_OPTIMIZERS = ("adamw", "dense", "sparse")
TABLE_OPTIMIZER_MOMENTS = ("full", "compact")
# The training fields that concern N-gram tables only: a model without tables trains the same with any of them
# (the sweep engine leaves them out of such a model's run, so they do not split its run id).
TABLE_FIELDS = ("table_optimizer", "table_optimizer_moments", "table_sharding")
NGRAM_BACKENDS = ("torch", "triton")
# Training fields added after runs were recorded: left out of the run id at their default, so the ids of
# earlier runs (and of runs that do not use them) stay what they were.
_OPT_IN_TRAINING_DEFAULTS = {"table_optimizer": "adamw", "table_optimizer_moments": "full", "ngram_backend": "torch",
                             "parallel": "ddp", "shard_degree": 0, "activation_checkpointing": False,
                             "table_sharding": "replicate", "deterministic": False}
PARALLEL_MODES = ("ddp", "fsdp", "hsdp")  # training.parallel (training/parallelize.py)
TABLE_SHARDINGS = ("replicate", "rows")  # training.table_sharding (training/table_shard.py)
DEVICES = ("auto", "cpu", "cuda")
TEXT_FORMATS = ("dir", "jsonl", "parquet")
TOKEN_FORMATS = ("npy", "bin", "arrow", "parquet_tokens")  # embscale.training.data.tokens.TOKEN_FORMATS
FORMATS = ("auto", *TEXT_FORMATS, *TOKEN_FORMATS)
NAMED_CORPORA = ("builtin", "site", "system")
# Data fields added after runs were recorded: left out of the run id at their default (as the training ones).
_OPT_IN_DATA_DEFAULTS = {"token_column": "input_ids", "eos_token_id": None}
TRACKERS = ("tensorboard", "wandb")  # output.tracking: live curves besides metrics.parquet (training/tracking.py)
SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Placeholder sizes for validating a model section before the tokenizer is known.
_PROVISIONAL_VOCAB = 1 << 20


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(field_name, message)


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and bookkeeping of one run. Exactly one of ``steps`` and ``tokens`` is set.

    ``batch_tokens`` is the global batch in tokens per optimizer step; it must be a multiple of
    ``seq_len * micro_batch_size * world_size``, the quotient being the gradient-accumulation steps.
    Schedules: ``cosine`` (linear warmup over ``warmup_fraction`` of the steps, cosine decay to
    ``lr * min_lr_ratio``) and ``wsd`` (warmup, constant, then linear decay to ``lr * min_lr_ratio`` over the
    last ``decay_fraction`` of the steps). ``eval_every`` / ``checkpoint_every`` of 0 mean only at the end.
    ``keep_checkpoints`` of 0 writes no checkpoint at all (a throughput measurement of a model whose checkpoint
    would not fit the disk; such a run cannot resume: trained again, it starts over).
    ``table_optimizer``: ``adamw`` trains the N-gram tables in the ordinary AdamW with dense gradients;
    ``dense`` / ``sparse`` give every ``NgramEmbedding``'s ``tables.weight`` row-sparse gradients and train
    it with ``kernels.table_optim.TableAdamW`` in that mode (``dense``: exactly AdamW; ``sparse``: lazy
    Adam on the touched rows; single process only). ``table_optimizer_moments``: that optimizer's state,
    ``full`` (fp32 moments per element: AdamW's) or ``compact`` (bf16 first moment per element, fp32 second
    moment per row: partial row-wise Adam, a different optimizer, for tables whose fp32 moments do not fit);
    only with ``table_optimizer`` ``dense`` or ``sparse``. ``ngram_backend``: the N-gram gather, ``torch`` or
    ``triton`` (``kernels.ngram``).
    ``parallel``: data parallelism over several ranks (``training/parallelize.py``): ``ddp`` (every rank holds the
    whole model), ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded over all ranks, one FSDP unit
    per block; bf16 parameters and fp32 gradient reductions on CUDA, fp32 on CPU) or ``hsdp`` (sharded within
    groups of ``shard_degree`` ranks, replicated across the groups). ``shard_degree``: ranks per shard group under
    ``hsdp``, 0 for the ranks of one node (``LOCAL_WORLD_SIZE``); under ``fsdp`` 0 or the world size; must be 0
    under ``ddp``. One process trains the whole model whatever ``parallel`` says. ``table_sharding``: where the
    N-gram tables of a table optimizer live under ``fsdp`` / ``hsdp``: ``replicate`` (the default: whole on every
    rank outside the FSDP units, their row gradients all-gathered, as under DDP) or ``rows`` (each rank of a
    shard group owns a contiguous row range of every table, lookups go to the owners and back, the table
    optimizer steps only the local rows; ``training/table_shard.py``); ``rows`` needs ``parallel`` fsdp or hsdp
    and ``table_optimizer`` dense or sparse. ``compile`` under ``fsdp`` / ``hsdp`` compiles
    each block. ``activation_checkpointing``: recompute each block's activations in the backward (less memory,
    about one more forward of compute; any ``parallel``).
    ``deterministic``: on CUDA, kernels that give the same bits on every run (``torch.use_deterministic_algorithms``,
    cuDNN without autotuning, cuBLAS with a fixed workspace; :func:`embscale.training.trainer.deterministic_kernels`),
    so that the same run trained twice gives the same curve; slower where a kernel's deterministic form is, and a
    run whose model needs an operation without one fails at its first step, naming it. Off by default: on a GPU two
    trainings of one run then differ in the order of their floating-point sums (up to 0.25 in final loss in
    REPRODUCTION.md's repeated runs). CPU runs are deterministic either way.
    A run has diverged when its loss is NaN/inf or exceeds ``spike_factor`` times the running mean
    (exponential, over about 20 steps; 0 turns the spike test off).
    """

    steps: int = 0
    tokens: int = 0
    batch_tokens: int = 16384
    micro_batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    table_weight_decay: bool = False
    eval_every: int = 0
    eval_tokens: int = 65536
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    compile: bool = False
    spike_factor: float = 4.0
    device: str = "auto"
    table_optimizer: str = "adamw"
    table_optimizer_moments: str = "full"
    ngram_backend: str = "torch"
    parallel: str = "ddp"
    shard_degree: int = 0
    activation_checkpointing: bool = False
    table_sharding: str = "replicate"
    deterministic: bool = False

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "steps", f"must be non-negative, got {self.steps}")
        _require(self.tokens >= 0, "tokens", f"must be non-negative, got {self.tokens}")
        _require((self.steps > 0) != (self.tokens > 0), "steps",
                 "set exactly one of training.steps and training.tokens (a positive number)")
        for name in ("batch_tokens", "micro_batch_size", "seq_len", "eval_tokens"):
            value = getattr(self, name)
            _require(value > 0, name, f"must be positive, got {value}")
        _require(self.keep_checkpoints >= 0, "keep_checkpoints",
                 f"must be non-negative (0: no checkpoint at all), got {self.keep_checkpoints}")
        _require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.schedule in SCHEDULES, "schedule",
                 f"unknown value {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        _require(0 <= self.warmup_fraction < 1, "warmup_fraction",
                 f"must be in [0, 1), got {self.warmup_fraction}")
        _require(0 <= self.decay_fraction <= 1, "decay_fraction",
                 f"must be in [0, 1], got {self.decay_fraction}")
        if self.schedule == "wsd":
            _require(self.warmup_fraction + self.decay_fraction <= 1, "decay_fraction",
                     "warmup_fraction + decay_fraction must not exceed 1")
        _require(self.weight_decay >= 0, "weight_decay", f"must be non-negative, got {self.weight_decay}")
        betas = self.betas
        _require(isinstance(betas, (list, tuple)) and len(betas) == 2
                 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas),
                 "betas", f"must be a pair of numbers, got {betas!r}")
        _require(all(0 <= b < 1 for b in betas), "betas", f"must be in [0, 1), got {list(betas)}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        _require(self.eps > 0, "eps", f"must be positive, got {self.eps}")
        _require(self.grad_clip >= 0, "grad_clip",
                 f"must be non-negative (0 turns clipping off), got {self.grad_clip}")
        _require(self.eval_every >= 0, "eval_every", f"must be non-negative, got {self.eval_every}")
        _require(self.checkpoint_every >= 0, "checkpoint_every",
                 f"must be non-negative, got {self.checkpoint_every}")
        _require(self.spike_factor == 0 or self.spike_factor > 1, "spike_factor",
                 f"must be 0 (off) or above 1, got {self.spike_factor}")
        _require(self.device in DEVICES, "device",
                 f"unknown value {self.device!r}; expected one of {', '.join(DEVICES)}")
        _require(self.table_optimizer in TABLE_OPTIMIZERS, "table_optimizer",
                 f"unknown value {self.table_optimizer!r}; expected one of {', '.join(TABLE_OPTIMIZERS)}")
        _require(self.table_optimizer_moments in TABLE_OPTIMIZER_MOMENTS, "table_optimizer_moments",
                 f"unknown value {self.table_optimizer_moments!r}; expected one of "
                 f"{', '.join(TABLE_OPTIMIZER_MOMENTS)}")
        _require(self.table_optimizer_moments == "full" or self.table_optimizer != "adamw",
                 "table_optimizer_moments",
                 f"{self.table_optimizer_moments!r} moments belong to the table optimizer "
                 "(kernels.table_optim.TableAdamW), and training.table_optimizer is 'adamw'; set "
                 "training.table_optimizer to dense or sparse, or leave table_optimizer_moments at full")
        _require(self.ngram_backend in NGRAM_BACKENDS, "ngram_backend",
                 f"unknown value {self.ngram_backend!r}; expected one of {', '.join(NGRAM_BACKENDS)}")
        _require(self.parallel in PARALLEL_MODES, "parallel",
                 f"unknown value {self.parallel!r}; expected one of {', '.join(PARALLEL_MODES)}")
        _require(isinstance(self.shard_degree, int) and not isinstance(self.shard_degree, bool)
                 and self.shard_degree >= 0, "shard_degree",
                 f"must be a non-negative number of ranks (0: a node's), got {self.shard_degree!r}")
        _require(self.shard_degree == 0 or self.parallel != "ddp", "shard_degree",
                 "shards belong to training.parallel fsdp or hsdp; under ddp every rank holds the whole model")
        _require(isinstance(self.activation_checkpointing, bool), "activation_checkpointing",
                 f"must be true or false, got {self.activation_checkpointing!r}")
        _require(isinstance(self.deterministic, bool), "deterministic",
                 f"must be true or false, got {self.deterministic!r}")
        _require(self.table_sharding in TABLE_SHARDINGS, "table_sharding",
                 f"unknown value {self.table_sharding!r}; expected one of {', '.join(TABLE_SHARDINGS)}")
        if self.table_sharding == "rows":
            _require(self.parallel != "ddp", "table_sharding",
                     "rows shards the N-gram tables over a shard group: set training.parallel to fsdp or hsdp "
                     "(under ddp every rank holds the whole model)")
            _require(self.table_optimizer != "adamw", "table_sharding",
                     "rows shards the tables of the table optimizer: set training.table_optimizer to dense or "
                     "sparse (under adamw the tables are FSDP parameters, sharded with the rest)")
        self.accumulation_steps(1)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps > 0 else math.ceil(self.tokens / self.batch_tokens)

    @property
    def sequences_per_step(self) -> int:
        return self.batch_tokens // self.seq_len

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step; ConfigError when the batch does not divide."""
        per_micro = self.seq_len * self.micro_batch_size * world_size
        _require(self.batch_tokens % per_micro == 0, "batch_tokens",
                 f"{self.batch_tokens} tokens do not divide into micro-batches of seq_len * micro_batch_size"
                 f" * world_size = {self.seq_len} * {self.micro_batch_size} * {world_size} = {per_micro}"
                 " tokens")
        return self.batch_tokens // per_micro


def training_identity(training: TrainingConfig) -> dict[str, Any]:
    """The training section as it enters the run id: every field, except the opt-in ones at their defaults
    (``embscale.sweeps.expand`` hashes the same mapping)."""
    return _identity(training, _OPT_IN_TRAINING_DEFAULTS)


def _identity(section: Any, opt_in_defaults: dict[str, Any]) -> dict[str, Any]:
    """``asdict(section)`` without the fields added after runs were recorded, where they hold their default."""
    identity = dataclasses.asdict(section)
    for name, default in opt_in_defaults.items():
        if identity[name] == default:
            del identity[name]
    return identity


@dataclass(frozen=True)
class DataConfig:
    """The corpus, and the tokenizer or the vocabulary of pre-tokenised data.

    ``corpus``, by name or path:

    - ``builtin``: the Python standard library's sources as code plus its bundled documentation as prose
      (validation splits ``code`` and ``prose``); about 31 MB, the demo's corpus.
    - ``site``: the installed packages' sources (every ``*.py`` under the interpreter's site-packages, files over
      1 MB left out) as code and their module docstrings as prose, split like ``builtin``: a larger corpus that
      needs no download (100 to 200 MB of sources where torch is installed).
    - a path (a file, a folder, or for token files a glob such as ``data/fineweb_train_*.bin``).

    ``format`` of a path (``auto``, the default, tells them apart by file names, and Parquet by its columns):

    - text, tokenised by the tokenizer: ``dir`` (every non-hidden file under the folder is one document),
      ``jsonl`` or ``parquet`` (a file, or a folder of such files, with the text in ``text_column``);
    - token ids already (no tokenizer is trained or loaded): ``npy`` (1-D integer ``.npy`` arrays, concatenated
      in sorted path order), ``bin`` (llm.c / nanoGPT FineWeb shards: a 256-int32 header with magic 20240520,
      version 1 and the token count, then uint16 tokens), ``arrow`` (a Hugging Face ``datasets`` folder written
      by ``save_to_disk``) and ``parquet_tokens`` (Parquet); ``arrow`` and ``parquet_tokens`` rows are documents
      whose ids are a list in ``token_column`` (default ``input_ids``). ``npy`` and ``bin`` are memory-mapped where
      they lie; ``arrow`` and ``parquet_tokens`` are flattened once into the shard cache (read, not tokenised).

    Validation: ``val_paths`` maps split names to validation files or folders in the same format. Without it,
    text corpora and ``arrow`` / ``parquet_tokens`` hold out 2% of the documents (by a hash of their key) as
    split ``val``; ``npy`` / ``bin`` streams hold out their last 1% of tokens, cut just after an end-of-document
    id, as split ``val``. Validation tokens are never trained on.

    Tokenizer (text): a byte-level BPE of ``vocab_size`` trained on ``tokenizer_sample_bytes`` of the training
    split, or the ``tokenizer.json`` at ``tokenizer_path`` (its EOS token named by ``eos_token`` or found).

    Token ids: ``vocab_size`` is the model's vocabulary and must exceed every id in the files (checked when a file
    is first read); ``eos_token_id`` (required) is the end-of-document id: the model's end-of-sequence id, and
    appended after each ``arrow`` / ``parquet_tokens`` row that does not already end with it (``npy`` / ``bin``
    streams are used as they are). ``tokenizer_path`` and ``eos_token`` do not apply.
    """

    corpus: str = "builtin"
    format: str = "auto"
    text_column: str = "text"
    val_paths: dict[str, str] | None = None
    vocab_size: int = 8192
    tokenizer_path: str | None = None
    eos_token: str | None = None
    tokenizer_sample_bytes: int = 8_000_000
    token_column: str = "input_ids"
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        _require(self.corpus != "", "corpus", "must be 'builtin', 'site', 'system' or a path")
        _require(self.format in FORMATS, "format",
                 f"unknown value {self.format!r}; expected one of {', '.join(FORMATS)}")
        named = self.corpus in NAMED_CORPORA
        _require(not named or self.format == "auto", "format",
                 f"the {self.corpus} corpus has no format; leave data.format out")
        _require(self.text_column != "", "text_column", "must not be empty")
        _require(self.token_column != "", "token_column", "must not be empty")
        if self.val_paths is not None:
            _require(isinstance(self.val_paths, dict) and len(self.val_paths) > 0, "val_paths",
                     "must be a mapping of split name to path, e.g. {web: data/val.jsonl}")
            _require(not named, "val_paths", f"the {self.corpus} corpus brings its own validation splits (code, "
                                             "prose)")
            for name, path in self.val_paths.items():
                _require(isinstance(name, str) and SPLIT_NAME.match(name) is not None, f"val_paths.{name}",
                         "split names are lowercase identifiers (letters, digits, _), e.g. web or code")
                _require(isinstance(path, str) and path != "", f"val_paths.{name}",
                         f"must be a path, got {path!r}")
            object.__setattr__(self, "val_paths", dict(sorted(self.val_paths.items())))
        tokens = self.format in TOKEN_FORMATS
        if tokens:
            what = f"pre-tokenised data (format {self.format})"
            _require(self.tokenizer_path is None, "tokenizer_path",
                     f"{what} is read as token ids and no tokenizer is used; leave data.tokenizer_path out")
            _require(self.eos_token is None, "eos_token",
                     f"{what} has no tokenizer; name the end-of-document id with data.eos_token_id instead")
            _require(self.eos_token_id is not None, "eos_token_id",
                     f"is required for {what}: the id that ends (or, as in llm.c's FineWeb shards, starts) each "
                     "document, e.g. 50256 for GPT-2 tokens")
        elif self.format != "auto" or named:
            _require(self.eos_token_id is None, "eos_token_id",
                     "is for pre-tokenised data (a token format); a tokenizer's end-of-sequence token is named by "
                     "data.eos_token")
        if self.eos_token_id is not None:
            _require(self.eos_token_id >= 0, "eos_token_id", f"must be a token id (>= 0), got {self.eos_token_id}")
            _require(self.eos_token_id < self.vocab_size, "eos_token_id",
                     f"{self.eos_token_id} is not below data.vocab_size = {self.vocab_size}")
        if tokens or self.eos_token_id is not None:  # token ids: any vocabulary that holds them
            _require(self.vocab_size >= 1, "vocab_size", f"must be positive, got {self.vocab_size}")
        elif self.tokenizer_path is None:
            from embscale.training.data.tokenizer import check_vocab_size

            check_vocab_size(self.vocab_size, "vocab_size")
        _require(self.tokenizer_sample_bytes > 0, "tokenizer_sample_bytes",
                 f"must be positive, got {self.tokenizer_sample_bytes}")


def data_identity(data: DataConfig) -> dict[str, Any]:
    """The data section as it enters the run id: every field, except the opt-in ones at their defaults
    (``token_column``, ``eos_token_id``), so runs recorded before they existed keep their ids
    (``embscale.sweeps.expand`` hashes the same mapping)."""
    return _identity(data, _OPT_IN_DATA_DEFAULTS)


@dataclass(frozen=True)
class OutputConfig:
    """Where results go: ``<root>/<sweep>/<run_id>/``. ``log_interval_s``: seconds between plain log lines.

    ``tracking``: live curves besides ``metrics.parquet``, fed the same rows (nothing is required to train
    without them). ``tensorboard`` writes TensorBoard event files to ``<run_dir>/tensorboard/`` (embscale writes
    them itself: TensorBoard is needed only to view them, e.g. ``tensorboard --logdir results/<sweep>``);
    ``wandb`` logs to a Weights & Biases offline run in ``<run_dir>/wandb/`` (project = sweep, name = run id;
    needs ``pip install wandb``; ``wandb sync`` uploads it). Scalars are tagged ``train/<column>``,
    ``val/<column>`` and ``norm/<column>`` after the metrics columns, at each step.
    """

    root: str = "results"
    sweep: str = "default"
    log_interval_s: float = 10.0
    tracking: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(self.root != "", "root", "must be a folder path")
        _require(re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", self.sweep) is not None, "sweep",
                 f"must be a plain folder name (letters, digits, '.', '_', '-'), got {self.sweep!r}")
        _require(self.log_interval_s > 0, "log_interval_s", f"must be positive, got {self.log_interval_s}")
        object.__setattr__(self, "tracking", check_tracking(self.tracking))


def check_tracking(value: Any, field_name: str = "tracking") -> tuple[str, ...]:
    """``output.tracking`` as a tuple of known tracker names (a single name is a list of one, null is none, repeats
    are dropped). ConfigError naming the field for an unknown name, or for ``wandb`` when the ``wandb`` package is
    not installed."""
    names = [value] if isinstance(value, str) else [] if value is None else value
    _require(isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names), field_name,
             f"must be a list of tracker names ({', '.join(TRACKERS)}), got {value!r}")
    for name in names:
        _require(name in TRACKERS, field_name, f"unknown tracker {name!r}; expected any of {', '.join(TRACKERS)}")
    if "wandb" in names:
        import importlib.util

        _require(importlib.util.find_spec("wandb") is not None, field_name,
                 "wandb is not installed: `pip install wandb` (embscale logs to an offline run in the run "
                 "folder; `wandb sync` uploads it), or leave wandb out of output.tracking")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``model`` is the ModelConfig mapping, resolved against the tokenizer by
    :meth:`resolve_model`."""

    model: dict[str, Any]
    training: TrainingConfig
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.model, dict), "model", "must be a mapping of ModelConfig fields")
        self.provisional_model()  # validates every model field now, with field paths under "model."
        _require(self.training.seq_len <= self.provisional_model().max_seq_len, "training.seq_len",
                 f"must not exceed model.max_seq_len {self.provisional_model().max_seq_len}")

    def provisional_model(self) -> ModelConfig:
        """The model config with placeholder vocabulary and EOS where omitted (no tokenizer yet)."""
        data = dict(self.model)
        data.setdefault("vocab_size", _PROVISIONAL_VOCAB)
        data.setdefault("eos_token_id", 0)
        try:
            return build_dataclass(ModelConfig, data)
        except ConfigError as exc:
            raise exc.under("model") from None

    def resolve_model(self, vocab_size: int, eos_token_id: int) -> ModelConfig:
        """The model config for a tokenizer of ``vocab_size`` entries and end-of-sequence ``eos_token_id``."""
        data = dict(self.model)
        if "vocab_size" in data:
            given = data["vocab_size"]
            _require(given >= vocab_size, "model.vocab_size",
                     f"{given} is smaller than the tokenizer's vocabulary ({vocab_size}); omit it to use the"
                     " tokenizer's size")
        else:
            data["vocab_size"] = vocab_size
        if "eos_token_id" in data:
            _require(data["eos_token_id"] == eos_token_id, "model.eos_token_id",
                     f"{data['eos_token_id']} is not the tokenizer's end-of-sequence id {eos_token_id};"
                     " omit it")
        else:
            data["eos_token_id"] = eos_token_id
        try:
            return build_dataclass(ModelConfig, data)
        except ConfigError as exc:
            raise exc.under("model") from None

    # ----- identity -----
    def identity(self) -> dict[str, Any]:
        """Everything that determines the run's results, with defaults filled in (except the opt-in training
        fields ``table_optimizer``, ``table_optimizer_moments``, ``ngram_backend``, ``parallel``, ``shard_degree``,
        ``activation_checkpointing``, ``table_sharding`` and ``deterministic`` and the opt-in data fields
        ``token_column`` and ``eos_token_id``, present only when not at their defaults)."""
        model = self.provisional_model().to_dict()
        for omitted in ("vocab_size", "eos_token_id"):
            if omitted not in self.model:
                model[omitted] = None
        return {"model": model, "training": training_identity(self.training), "data": data_identity(self.data)}

    @property
    def run_id(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]

    # ----- (de)serialisation -----
    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "training": dataclasses.asdict(self.training),
                "data": dataclasses.asdict(self.data), "output": dataclasses.asdict(self.output)}

    @classmethod
    def from_dict(cls, data: Any) -> RunConfig:
        return build_dataclass(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return load_config_file(path, cls.from_dict, "run file")

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with whole sections or section fields changed: ``replace(training={"steps": 10})``."""
        data = self.to_dict()
        for name, value in sections.items():
            if isinstance(value, dict) and name != "model":
                data[name] = {**data[name], **value}
            else:
                data[name] = value
        return RunConfig.from_dict(data)


__all__ = ["DataConfig", "OutputConfig", "RunConfig", "TrainingConfig", "DEVICES", "FORMATS", "NGRAM_BACKENDS",
           "PARALLEL_MODES",
           "SCHEDULES", "TABLE_FIELDS", "TABLE_OPTIMIZERS", "TOKEN_FORMATS", "data_identity", "training_identity"]
