"""Peak GPU memory of a planned run, per GPU, from its config alone (nothing is allocated; torch is not imported).

:func:`estimate_memory` adds up what one GPU holds while the trainer (:mod:`embscale.training.trainer`) runs its
steps: bf16 autocast over fp32 parameters, fused AdamW, the optional table optimizer
(:mod:`embscale.kernels.table_optim`), the fused cross-entropy (no fp32 copy of the logits).

Per GPU, with ``s`` the shard degree (1: DDP, every rank holds the whole model) and ``P`` the parameters
(exact counts by group from :mod:`embscale.models.accounting`):

- parameters: 4 bytes (fp32) each;
- gradients: 4 bytes per parameter trained by AdamW (the N-gram tables too when ``training.table_optimizer`` is
  ``adamw``: their gradient is dense). Tables trained by the table optimizer get no table-sized gradient, only
  row gradients: ``table width x 4 + 8`` bytes per lookup, for every micro-batch of the step;
- optimizer state: AdamW 8 bytes per parameter (two fp32 moments); table optimizer ``full`` 8 bytes per table
  element, ``compact`` 2 bytes per element plus 4 per row, plus 8 per row (``row_step``) in ``sparse`` mode;
- DDP on several GPUs: its gradient buckets, another 4 bytes per parameter it reduces (gradient_as_bucket_view
  is off);
- activations of one micro-batch (``micro_batch_size x seq_len`` tokens): :func:`activation_bytes_per_token`,
  the tensors autograd saves, module by module, plus the bf16 copies of the weights that autocast and the
  grouped expert GEMM make and save for the backward (2 bytes per matrix parameter) and the bf16 gradient of
  the logits at the start of the backward.

Phases: the backward of a micro-batch holds parameters, optimizer state, activations and, when the step
accumulates several micro-batches, the whole gradient of the previous ones; the optimizer step holds
parameters, gradients, state and the last micro-batch's bf16 logits (the trainer keeps its output until the
next micro-batch). :attr:`MemoryEstimate.peak` is the larger, in steady state (optimizer state exists from the
first step on); :attr:`MemoryEstimate.first_step_peak` is the same before the optimizer state exists (what a
one-step probe measures).

Sharding (``s > 1``; the trainer's FSDP is modelled, not read): parameters, gradients and optimizer state of
everything but the N-gram tables are divided by ``s``. The N-gram tables of a table optimizer stay replicated
under ``training.table_sharding: replicate`` (the default); under ``rows`` (:mod:`embscale.training.table_shard`)
their parameters and the table optimizer's state are divided by ``s`` too (each GPU owns ``1/s`` of the rows; its
row gradients are still counted per lookup: the owner receives about a rank's worth of rows). The model assumes
FSDP2 with bf16 all-gathers that reshard after the forward: instead of bf16 weight copies of the whole model, one
GPU holds two layers' worth of unsharded bf16 weights (the layer and the prefetched next one) and one layer's
unsharded fp32 gradient before its reduce-scatter.

Checks (tests/test_memory_plan.py): on one H200, the MoE points of sweeps/paper_280m.yaml at ratio 8, 16, 24, 30
(one training step, micro-batch 4 x 4096 tokens: within 0.3% of :attr:`MemoryEstimate.first_step_peak`) and the
whole-model steps of BENCHMARKS.md (steady state: within 5% of :attr:`MemoryEstimate.peak`); on the CPU, the
activation model against the tensors autograd saves (within 5%, CPU-only differences added). Not measured: MLA
with unequal head widths on CUDA, FSDP (modelled), ``torch.compile`` (lower by about 7% in BENCHMARKS.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from embscale.base.errors import ConfigError
from embscale.models.config import ModelConfig
from embscale.training.config import TrainingConfig

GIB = 1 << 30
BF16, FP32, INDEX = 2, 4, 8
# Memory of a GPU that a run's tensors cannot use: the CUDA context, cuBLAS and NCCL workspaces, and the caching
# allocator's fragmentation (the estimate, like the measurements it is checked against, counts allocated tensors).
HEADROOM = 2 * GIB

_UNITS = {"tib": 1 << 40, "gib": 1 << 30, "mib": 1 << 20, "tb": 10**12, "gb": 10**9, "mb": 10**6}
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*$")


def parse_memory(value: Any, where: str) -> int:
    """Bytes from ``80GiB``, ``141 GiB``, ``80GB``, ``81920MiB`` (units TiB, GiB, MiB, TB, GB, MB; case-insensitive).
    ConfigError naming ``where`` when the value is not a positive size with a unit."""
    match = _MEMORY.match(str(value)) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(where, f"must be a memory size with a unit, e.g. 80GiB, 141GiB, 80GB or 24576MiB; "
                                 f"got {value!r}")
    size = float(match.group(1)) * _UNITS[unit]
    if not size > 0:
        raise ConfigError(where, f"must be positive, got {value!r}")
    return int(size)


def gib(size: float) -> str:
    """Bytes as ``34.8 GiB``."""
    return f"{size / GIB:.1f} GiB"


# ----- activations --------------------------------------------------------------------------------------------
def _attention_bytes(cfg: ModelConfig) -> float:
    """Saved bytes per token of one attention module with its pre-norm: the fp32 residual the norm saves, the
    bf16 inputs of each projection (autocast casts per projection), MLA's latent (fp32 copy its norm saves, bf16
    result), what SDPA (flash) saves (q, k, v, output, log-sum-exp; MLA's rotated q and k are concatenations, its
    v a view of the up-projected keys and values) and the output projection's input. The rotary embedding saves
    only its tables."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention == "mha":
        dq, dkv = h * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        return FP32 * d + 3 * BF16 * d + BF16 * (dq + 2 * dkv) + BF16 * dq + FP32 * h + BF16 * dq
    mla = cfg.mla
    qk, nope, v, r = mla.qk_head_dim, mla.qk_nope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    q_path = BF16 * d + ((FP32 + BF16) * mla.q_lora_rank if mla.q_lora_rank > 0 else 0)
    return (FP32 * d + q_path + BF16 * d + (FP32 + BF16) * r + BF16 * h * qk * 2 + BF16 * h * (nope + v)
            + BF16 * h * v * 2 + FP32 * h)


def _swiglu_bytes(d: int, hidden: int, has_up: bool, with_norm: bool = True) -> float:
    """A dense SwiGLU MLP: its norm's fp32 input, bf16 inputs of the gate (and up) projections, gate output,
    SiLU output, up output, product (a per-layer MLP's multiplier is counted with its embedding)."""
    return (FP32 * d if with_norm else 0) + (2 if has_up else 1) * BF16 * d + (4 if has_up else 3) * BF16 * hidden


def _moe_bytes(cfg: ModelConfig) -> float:
    """The routed experts of one layer (its norm is the dense MLP's, counted there): the router's bf16 input and
    fp32 scores, per routed slot the dispatched bf16 row, gate/up output, weighted hidden and index tensors, the
    fp32 copy the zero experts multiply, and the shared experts."""
    d, k, hidden = cfg.d_model, cfg.top_k, cfg.expert_hidden
    per_slot = BF16 * d + 3 * BF16 * hidden + 3 * INDEX + FP32
    zero = FP32 * d if cfg.n_zero_experts else 0
    shared = cfg.n_shared_experts * _swiglu_bytes(d, hidden, True, with_norm=False)
    return BF16 * d + 3 * FP32 * cfg.n_router_outputs + k * per_slot + zero + shared


def activation_bytes_per_token(cfg: ModelConfig) -> float:
    """Bytes autograd holds per token of a micro-batch at the start of its backward (eager mode, bf16 autocast),
    the bf16 logits and their gradient included; weights' bf16 copies are not (see :func:`estimate_memory`)."""
    d = cfg.d_model
    per_layer = cfg.attentions_per_layer * _attention_bytes(cfg)
    up = [i not in cfg.per_layer_mlp_indices for i in range(cfg.dense_mlps_per_layer)]
    per_layer += sum(_swiglu_bytes(d, cfg.dense_hidden, has_up) for has_up in up)
    if cfg.is_moe:
        per_layer += _moe_bytes(cfg) + (0 if cfg.dense_mlps_per_layer else FP32 * d)
    if cfg.per_layer is not None:  # each per-layer MLP's fp32 multiplier; PLNE: its gathered rows (bf16), keys
        multiplier = FP32 * cfg.dense_hidden
        if cfg.per_layer.kind == "plne" and cfg.per_layer.ngram is not None:
            multiplier += BF16 * cfg.dense_hidden + INDEX * cfg.per_layer.ngram.num_tables
        per_layer += multiplier * len(cfg.per_layer_mlp_indices)
    embedding = 0.0
    if cfg.ngram is not None:  # gathered fp32 rows, hashed keys, projection input, norm input
        embedding = FP32 * d + INDEX * cfg.ngram.num_tables + BF16 * d + FP32 * d
    elif cfg.embedding_amplification == "layernorm":
        embedding = FP32 * d
    head = FP32 * d + BF16 * d + 2 * BF16 * cfg.vocab_size  # final norm, head input, logits and their gradient
    return cfg.n_layers * per_layer + embedding + head


# ----- the estimate -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one run at shard degree ``shard`` on ``gpus`` GPUs (see the module docstring)."""

    gpus: int
    shard: int
    accumulation: int
    parameters: float
    gradients: float
    optimizer: float
    buckets: float  # DDP's gradient buckets
    activations: float  # saved activations of one micro-batch
    weight_copies: float  # bf16 copies of the weights saved for the backward (FSDP: the unsharded working set)
    logits: float  # the last micro-batch's bf16 logits, held through the optimizer step
    replicated_tables: float  # bytes of the above (parameters, gradients, state) owed to N-gram tables

    @property
    def backward_peak(self) -> float:
        grads = self.gradients if self.accumulation > 1 else 0.0
        return self.parameters + self.optimizer + self.buckets + grads + self.activations + self.weight_copies

    @property
    def optimizer_peak(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.buckets + self.logits

    @property
    def peak(self) -> float:
        """Steady-state peak per GPU (optimizer state present during every backward)."""
        return max(self.backward_peak, self.optimizer_peak)

    @property
    def first_step_peak(self) -> float:
        """Peak of the first step, before the optimizer state exists during a backward."""
        return max(self.backward_peak - self.optimizer, self.optimizer_peak)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(peak=self.peak, first_step_peak=self.first_step_peak)
        return out


def _ngram_tables(cfg: ModelConfig, groups: dict[str, int]) -> tuple[int, int, int]:
    """(elements, row width, lookups per token) of the N-gram sub-tables: the embedding's and, for PLNE, every
    per-layer N-gram Embedding's (their per-layer token tables are not N-gram tables)."""
    elements, width, lookups = groups.get("ngram_tables", 0), 1, 0
    if cfg.ngram is not None:
        width, lookups = cfg.ngram.table_width(cfg.d_model), cfg.ngram.num_tables
    per_layer = cfg.per_layer
    if per_layer is not None and per_layer.kind == "plne" and per_layer.ngram is not None:
        slots = cfg.n_layers * len(cfg.per_layer_mlp_indices)
        elements += groups.get("per_layer_tables", 0) - slots * cfg.vocab_size * cfg.dense_hidden
        lookups += slots * per_layer.ngram.num_tables
        if cfg.ngram is None:
            width = per_layer.ngram.table_width(cfg.dense_hidden)
    return elements, max(width, 1), lookups


def estimate_memory(cfg: ModelConfig, groups: dict[str, int], training: TrainingConfig, gpus: int = 1,
                    shard: int = 1, accumulation: int | None = None) -> MemoryEstimate:
    """Peak memory per GPU of a run of model ``cfg`` (``groups``: its exact parameter counts,
    ``count_parameters(cfg).groups``) trained with ``training`` on ``gpus`` GPUs, parameters sharded ``shard``
    ways (1: DDP). ``accumulation``: micro-batches per step per GPU; default from the batch and ``gpus``."""
    if shard < 1 or gpus < 1 or gpus % shard:
        raise ConfigError("shard", f"must divide the {gpus} GPU(s) of the run, got {shard}")
    if accumulation is None:
        per_micro = training.seq_len * training.micro_batch_size * gpus
        accumulation = max(1, math.ceil(training.batch_tokens / per_micro))
    total = sum(groups.values())
    tables, width, lookups_per_token = _ngram_tables(cfg, groups)
    table_optimizer = training.table_optimizer != "adamw" and tables > 0
    sharded = (total - tables) / shard  # AdamW's parameters but the tables: FSDP shards them
    adamw_tables = 0 if table_optimizer else tables  # the tables stay replicated whatever trains them
    if table_optimizer and shard > 1 and training.table_sharding == "rows":
        tables /= shard  # each GPU owns 1/s of every table's rows, and their optimizer state

    parameters = FP32 * (sharded + tables)
    gradients = FP32 * (sharded + adamw_tables)
    optimizer = 2 * FP32 * (sharded + adamw_tables)
    table_bytes = FP32 * tables + 3 * FP32 * adamw_tables
    tokens = training.seq_len * training.micro_batch_size
    if table_optimizer:
        rows = tables / width
        lookups = tokens * lookups_per_token
        row_grads = accumulation * lookups * (FP32 * width + INDEX)
        compact = training.table_optimizer_moments == "compact"
        state = (BF16 * tables + FP32 * rows) if compact else 2 * FP32 * tables
        if training.table_optimizer == "sparse":
            state += INDEX * rows
        gradients += row_grads
        optimizer += state
        table_bytes += state + row_grads
    # DDP's reducer holds a bucket copy of every gradient it averages (the table optimizer's tables stay out)
    buckets = FP32 * (total - tables + adamw_tables) if (shard == 1 and gpus > 1) else 0.0
    lookup = groups.get("embedding", 0) + groups.get("ngram_tables", 0) + groups.get("per_layer_tables", 0)
    matrices = total - lookup - groups.get("norms", 0) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    if shard == 1:
        weight_copies = BF16 * matrices
    else:
        layer_keys = ("attention", "dense", "experts", "shared_experts", "router")
        per_layer = sum(groups.get(key, 0) for key in layer_keys) / cfg.n_layers
        outside = matrices - per_layer * cfg.n_layers  # head and projections: gathered whole
        weight_copies = BF16 * (2 * per_layer + outside) + FP32 * per_layer
    return MemoryEstimate(
        gpus=gpus, shard=shard, accumulation=accumulation, parameters=parameters, gradients=gradients,
        optimizer=optimizer, buckets=buckets, activations=tokens * activation_bytes_per_token(cfg),
        weight_copies=weight_copies, logits=BF16 * tokens * cfg.vocab_size, replicated_tables=table_bytes)


def shard_degrees(gpus: int) -> list[int]:
    """The shard degrees a run on ``gpus`` GPUs can use: 1, 2, 4, ... up to ``gpus``, each dividing it."""
    degrees, s = [], 1
    while s <= gpus:
        if gpus % s == 0:
            degrees.append(s)
        s *= 2
    return degrees


def fits(estimate: MemoryEstimate, memory: float) -> bool:
    """Whether the peak and :data:`HEADROOM` fit in ``memory`` bytes per GPU."""
    return estimate.peak + HEADROOM <= memory


def smallest_fitting(cfg: ModelConfig, groups: dict[str, int], training: TrainingConfig, gpus: int,
                     memory: float) -> MemoryEstimate | None:
    """The estimate at the smallest shard degree that :func:`fits` in ``memory`` bytes, None if none does."""
    for shard in shard_degrees(gpus):
        estimate = estimate_memory(cfg, groups, training, gpus, shard)
        if fits(estimate, memory):
            return estimate
    return None


__all__ = ["GIB", "HEADROOM", "MemoryEstimate", "activation_bytes_per_token", "estimate_memory", "fits", "gib",
           "parse_memory", "shard_degrees", "smallest_fitting"]
