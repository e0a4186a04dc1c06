"""Model configuration: frozen, validated dataclasses.

Everything a model is built from lives here. Derived sizes (head dimension, number of n-gram sub-tables,
sub-table width, ...) are properties, never fields, so they cannot disagree with the fields they come from.
Every invalid value raises :class:`ConfigError`, whose ``field`` names the offending field by its dotted path
(``ngram.k``, ``mla.kv_lora_rank``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embscale.base.datafile import build_dataclass, load_config_file
from embscale.base.errors import ConfigError

LAYER_TYPES = ("standard", "shortcut")
ATTENTION_TYPES = ("mha", "mla")
AMPLIFICATIONS = ("none", "sqrt_d", "layernorm", "sqrt_count")
SIZING_POLICIES = ("paper", "prime", "exact")
PER_LAYER_KINDS = ("ple", "plne")
PER_LAYER_TARGETS = ("first", "second", "both")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the ready configs that ship with embscale


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(field, message)


def _positive(value: float, field: str) -> None:
    _require(value > 0, field, f"must be positive, got {value}")


def _non_negative(value: float, field: str) -> None:
    _require(value >= 0, field, f"must be non-negative, got {value}")


def _one_of(value: str, choices: tuple[str, ...], field: str) -> None:
    _require(value in choices, field, f"unknown value {value!r}; expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention sizes (DeepSeek-V2 / LongCat-Flash).

    ``q_lora_rank = 0`` means queries are projected at full rank (no query compression).
    """

    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32

    def __post_init__(self) -> None:
        _non_negative(self.q_lora_rank, "q_lora_rank")
        _positive(self.kv_lora_rank, "kv_lora_rank")
        _positive(self.qk_nope_head_dim, "qk_nope_head_dim")
        _positive(self.qk_rope_head_dim, "qk_rope_head_dim")
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotary pairs)")
        _positive(self.v_head_dim, "v_head_dim")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class NgramConfig:
    """Hashed N-gram Embedding (BRIEF section 1).

    ``n`` is the highest n-gram order, ``k`` the number of sub-tables per order, ``ratio`` the table size in
    units of the base vocabulary (``m = round(ratio * V0)``), ``sizing`` the modulus policy:
    ``paper`` (``M_idx = m + 2*idx + 1``, as the released code), ``prime`` (the next prime at or above that),
    ``exact`` (``M = m`` for every table).
    """

    n: int = 4
    k: int = 4
    ratio: float = 8.0
    sizing: str = "paper"
    amplification: str = "none"

    def __post_init__(self) -> None:
        _require(2 <= self.n <= 8, "n", f"must be between 2 and 8, got {self.n}")
        _require(1 <= self.k <= 8, "k", f"must be between 1 and 8, got {self.k}")
        _require(math.isfinite(self.ratio) and self.ratio > 0, "ratio", f"must be positive, got {self.ratio}")
        _one_of(self.sizing, SIZING_POLICIES, "sizing")
        _one_of(self.amplification, AMPLIFICATIONS, "amplification")

    @property
    def num_tables(self) -> int:
        """S = (N-1) K sub-tables."""
        return (self.n - 1) * self.k

    def table_width(self, width: int) -> int:
        """Sub-table width d = width / S (the caller has validated divisibility)."""
        return width // self.num_tables

    def base_rows(self, vocab_size: int) -> int:
        """m = round(ratio * V0)."""
        return int(round(self.ratio * vocab_size))


@dataclass(frozen=True)
class PerLayerConfig:
    """Per-Layer Embedding (``ple``) or Per-Layer N-gram Embedding (``plne``), BRIEF section 2.

    Each layer's dense MLP computes ``W_d(SiLU(W_g x) * E_l(t))``: the per-layer embedding replaces the
    up-projection output. ``targets`` picks which dense MLP of a shortcut layer receives it.
    ``ngram`` sizes the per-layer N-gram Embedding of ``plne``.
    """

    kind: str = "ple"
    targets: str = "first"
    ngram: NgramConfig | None = None

    def __post_init__(self) -> None:
        _one_of(self.kind, PER_LAYER_KINDS, "kind")
        _one_of(self.targets, PER_LAYER_TARGETS, "targets")
        if self.kind == "plne":
            _require(self.ngram is not None, "ngram", "plne needs an ngram section (n, k, ratio, sizing)")
        else:
            _require(self.ngram is None, "ngram", "only plne takes an ngram section")


@functools.cache
def _model_field_names() -> tuple[str, ...]:
    """:class:`ModelConfig`'s field names, in order (looked up once: ``dataclasses.fields`` per hash was most of
    the hash's cost)."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only language model: backbone, MoE, and optional embedding scaling.

    ``dense_hidden`` is the hidden size of dense SwiGLU MLPs (the two per shortcut layer, or the FFN of a
    standard layer without routed experts). With ``n_experts > 0`` a standard layer's FFN is the MoE.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    layer_type: str = "standard"
    attention: str = "mha"
    n_kv_heads: int | None = None
    mla: MLAConfig | None = None
    dense_hidden: int = 0
    n_experts: int = 0
    n_zero_experts: int = 0
    n_shared_experts: int = 0
    expert_hidden: int = 0
    top_k: int = 0
    routed_scaling_factor: float = 1.0
    router_bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0
    tie_embeddings: bool = False
    embedding_amplification: str = "none"
    ngram: NgramConfig | None = None
    per_layer: PerLayerConfig | None = None
    eos_token_id: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 2, "vocab_size", f"must be at least 2, got {self.vocab_size}")
        _positive(self.d_model, "d_model")
        _positive(self.n_layers, "n_layers")
        _positive(self.n_heads, "n_heads")
        _one_of(self.layer_type, LAYER_TYPES, "layer_type")
        _one_of(self.attention, ATTENTION_TYPES, "attention")
        _one_of(self.embedding_amplification, AMPLIFICATIONS, "embedding_amplification")
        _require(0 <= self.eos_token_id < self.vocab_size, "eos_token_id",
                 f"must be a token id below vocab_size {self.vocab_size}, got {self.eos_token_id}")
        _positive(self.rope_theta, "rope_theta")
        _positive(self.norm_eps, "norm_eps")
        _positive(self.init_std, "init_std")
        _positive(self.max_seq_len, "max_seq_len")

        if self.attention == "mha":
            _require(self.d_model % self.n_heads == 0, "n_heads",
                     f"must divide d_model {self.d_model}, got {self.n_heads}")
            _require((self.d_model // self.n_heads) % 2 == 0, "n_heads",
                     f"head dimension d_model/n_heads = {self.d_model // self.n_heads} must be even (rotary)")
            if self.n_kv_heads is not None:
                _positive(self.n_kv_heads, "n_kv_heads")
                _require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                         f"must divide n_heads {self.n_heads}, got {self.n_kv_heads}")
            _require(self.mla is None, "mla", "only attention: mla takes an mla section")
        else:
            _require(self.n_kv_heads is None, "n_kv_heads",
                     "grouped-query heads apply to attention: mha only")
            if self.mla is None:
                object.__setattr__(self, "mla", MLAConfig())

        _non_negative(self.dense_hidden, "dense_hidden")
        _non_negative(self.n_experts, "n_experts")
        _non_negative(self.n_zero_experts, "n_zero_experts")
        _non_negative(self.n_shared_experts, "n_shared_experts")
        _non_negative(self.expert_hidden, "expert_hidden")
        _non_negative(self.top_k, "top_k")
        _non_negative(self.router_bias_update_rate, "router_bias_update_rate")
        _non_negative(self.aux_loss_coef, "aux_loss_coef")
        _positive(self.routed_scaling_factor, "routed_scaling_factor")
        if self.n_experts > 0:
            _positive(self.expert_hidden, "expert_hidden")
            _require(self.top_k >= 1, "top_k", "must be at least 1 when there are routed experts")
            _require(self.top_k <= self.n_experts + self.n_zero_experts, "top_k",
                     f"must not exceed the expert count {self.n_experts + self.n_zero_experts} "
                     f"(n_experts + n_zero_experts), got {self.top_k}")
        else:
            _require(self.n_zero_experts == 0, "n_zero_experts",
                     "zero experts need routed experts (n_experts > 0)")
            _require(self.top_k == 0, "top_k", "top_k needs routed experts (n_experts > 0)")
        if self.n_shared_experts > 0:
            _positive(self.expert_hidden, "expert_hidden")
        if self.layer_type == "shortcut" or self.n_experts == 0:
            _positive(self.dense_hidden, "dense_hidden")

        if self.ngram is not None:
            _require(self.embedding_amplification == "none", "embedding_amplification",
                     "applies to the plain token embedding; with an ngram section, set "
                     "ngram.amplification instead")
            s = self.ngram.num_tables
            _require(self.d_model % s == 0, "ngram.k",
                     f"sub-table width d_model/((N-1)K) = {self.d_model}/{s} is not an integer")
        if self.per_layer is not None:
            _require(self.dense_hidden > 0 and (self.layer_type == "shortcut" or self.n_experts == 0),
                     "per_layer",
                     "needs a dense MLP in every layer (a shortcut layer, or a dense standard layer)")
            _require(self.layer_type == "shortcut" or self.per_layer.targets == "first", "per_layer.targets",
                     f"a standard layer has one dense MLP, so only 'first' applies; "
                     f"got {self.per_layer.targets!r}")
            if self.per_layer.kind == "plne":
                s = self.per_layer.ngram.num_tables
                _require(self.dense_hidden % s == 0, "per_layer.ngram.k",
                         f"sub-table width dense_hidden/((N-1)K) = {self.dense_hidden}/{s} is not an integer")

    def __hash__(self) -> int:
        # Configs key the caches of sweep expansion (tens of thousands of lookups); hashing ~30 fields, nested
        # ones too, each time was a fifth of its time, so the hash is computed once per (immutable) config.
        cached = self.__dict__.get("_hash")
        if cached is None:
            values = self.__dict__
            cached = hash(tuple([values[name] for name in _model_field_names()]))
            object.__setattr__(self, "_hash", cached)
        return cached

    # ----- derived sizes -----
    @property
    def head_dim(self) -> int:
        """Per-head width of standard attention."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads of standard attention (``n_heads`` unless grouped-query)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def n_router_outputs(self) -> int:
        """Router logits: real experts followed by zero-computation experts."""
        return self.n_experts + self.n_zero_experts

    @property
    def dense_mlps_per_layer(self) -> int:
        """Dense SwiGLU MLPs in one layer: 2 in a shortcut layer, 1 in a dense standard layer."""
        if self.layer_type == "shortcut":
            return 2
        return 0 if self.is_moe else 1

    @property
    def attentions_per_layer(self) -> int:
        return 2 if self.layer_type == "shortcut" else 1

    @property
    def per_layer_mlp_indices(self) -> tuple[int, ...]:
        """Dense MLPs of each layer (0 = MLP0, 1 = MLP1) fed by the per-layer embedding; () without one."""
        if self.per_layer is None:
            return ()
        return {"first": (0,), "second": (1,), "both": (0, 1)}[self.per_layer.targets]

    # ----- (de)serialisation -----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return build_dataclass(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """A model config file, or the ``model:`` section of a run file."""
        def model_section(data: Any) -> ModelConfig:
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                data = data["model"]
            return cls.from_dict(data)

        return load_config_file(path, model_section, "model config file")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)


__all__ = [
    "AMPLIFICATIONS",
    "ATTENTION_TYPES",
    "ConfigError",
    "LAYER_TYPES",
    "MLAConfig",
    "ModelConfig",
    "NgramConfig",
    "PER_LAYER_KINDS",
    "PER_LAYER_TARGETS",
    "PerLayerConfig",
    "SIZING_POLICIES",
]
