"""Exact parameter and FLOP accounting, from the config alone (nothing is allocated; torch is not imported).

Groups (every parameter of the model lands in exactly one):
``embedding`` (the ``V0 x D`` token table), ``ngram_tables``, ``ngram_projections``, ``per_layer_tables``
(per-layer token or N-gram tables), ``per_layer_projections``, ``attention`` (all attention matrices),
``dense`` (dense SwiGLU MLPs; an MLP fed by a per-layer embedding has no up-projection), ``experts`` (all
routed experts), ``shared_experts``, ``router``, ``norms`` (every norm gain/bias, MLA's inner norms and the
embedding LayerNorm included), ``lm_head`` (0 when tied to the token table).

Activated parameters per token (BRIEF section 3): everything a token's forward multiplies by, i.e. all
groups except the lookup tables (``embedding``, ``ngram_tables``, ``per_layer_tables``) and the routed
experts, plus the LM head (also when it is tied, so ``V0 x D`` even though its group is 0) plus the routed
experts the token actually uses. A token routes ``top_k`` slots over ``n_experts`` real and
``n_zero_experts`` zero experts:

- ``activated_min``: as many slots as possible go to zero experts, ``max(0, top_k - n_zero_experts)`` real;
- ``activated_max``: ``min(top_k, n_experts)`` real experts;
- ``activated`` (expected at uniform routing over all router outputs): ``top_k * E / (E + Z)`` real experts
  (an int when that is whole, else a float).

Training FLOPs per token (torchtitan's convention, ``6 N + 12 L H d T`` generalised)::

    flops_per_token(T) = 6 * (activated - norms) + 6 * n_attention_modules * n_heads * (d_qk + d_v) * T

where ``n_attention_modules = n_layers * attentions_per_layer`` (two per shortcut layer), ``d_qk``/``d_v`` are
the per-head query-key and value widths (``head_dim`` for both in standard attention;
``qk_nope_head_dim + qk_rope_head_dim`` and ``v_head_dim`` in MLA) and ``T`` the sequence length. As in
torchtitan the attention term counts the full ``T x T`` score matrix (no halving for causality).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embscale.models.config import ModelConfig

GROUPS = (
    "embedding", "ngram_tables", "ngram_projections", "per_layer_tables", "per_layer_projections",
    "attention", "dense", "experts", "shared_experts", "router", "norms", "lm_head",
)
# Lookup tables: only the looked-up rows are touched, so they never count as activated.
LOOKUP_GROUPS = ("embedding", "ngram_tables", "per_layer_tables")


@dataclass(frozen=True)
class Accounting:
    total: int
    activated: int | float
    activated_min: int
    activated_max: int
    groups: dict[str, int] = field(default_factory=dict)
    attention_flops_coefficient: int = 0  # attention FLOPs per token per unit of sequence length

    @property
    def ratio(self) -> float:
        """total / activated (expected)."""
        return self.total / self.activated

    @property
    def ne_share(self) -> float:
        """(N-gram tables + projections + per-layer tables + projections) / total."""
        g = self.groups
        ne = g["ngram_tables"] + g["ngram_projections"] + g["per_layer_tables"] + g["per_layer_projections"]
        return ne / self.total

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token at sequence length ``seq_len``."""
        matmul = self.activated - self.groups["norms"]
        flops = 6 * matmul + self.attention_flops_coefficient * seq_len
        return int(flops) if float(flops).is_integer() else float(flops)

    def to_dict(self, seq_len: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "total": self.total,
            "activated": self.activated,
            "activated_min": self.activated_min,
            "activated_max": self.activated_max,
            "ratio": self.ratio,
            "ne_share": self.ne_share,
            "groups": dict(self.groups),
            "attention_flops_coefficient": self.attention_flops_coefficient,
        }
        if seq_len is not None:
            out["seq_len"] = seq_len
            out["flops_per_token"] = self.flops_per_token(seq_len)
        return out


# ----- module sizes (must mirror the modules in models/) -----
def attention_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(matrix parameters, norm parameters) of one attention module."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention == "mha":
        hd = cfg.head_dim
        return d * h * hd + 2 * d * cfg.kv_heads * hd + h * hd * d, 0
    mla = cfg.mla
    if mla.q_lora_rank > 0:
        q, q_norm = d * mla.q_lora_rank + mla.q_lora_rank * h * mla.qk_head_dim, mla.q_lora_rank
    else:
        q, q_norm = d * h * mla.qk_head_dim, 0
    kv = d * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank * h * (
        mla.qk_nope_head_dim + mla.v_head_dim)
    out = h * mla.v_head_dim * d
    return q + kv + out, q_norm + mla.kv_lora_rank


def attention_head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(query-key width, value width) per head."""
    if cfg.attention == "mla":
        return cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    return cfg.head_dim, cfg.head_dim


def swiglu_parameters(d_model: int, hidden: int, has_up: bool = True) -> int:
    return (3 if has_up else 2) * d_model * hidden


def count_parameters(cfg: ModelConfig) -> Accounting:
    """Exact counts for ``cfg`` (see the module docstring for groups and conventions)."""
    d, v, n_layers = cfg.d_model, cfg.vocab_size, cfg.n_layers
    # sweep expansion counts tens of thousands of candidates: plain locals, one dict built at the end
    embedding = ngram_tables = ngram_projections = per_layer_tables = per_layer_projections = norms = 0

    # embeddings
    if cfg.ngram is None:
        embedding = v * d
        if cfg.embedding_amplification == "layernorm":
            norms += 2 * d
    else:
        from embscale.models.sizes import ngram_parameter_counts

        ne = ngram_parameter_counts(cfg.ngram, v, d)
        embedding = ne["token"]
        ngram_tables = ne["tables"]
        ngram_projections = ne["projections"]
        norms += ne["norm"]
    if cfg.per_layer is not None:
        from embscale.models.sizes import per_layer_parameter_counts

        pl = per_layer_parameter_counts(cfg)
        per_layer_tables = pl["tables"]
        per_layer_projections = pl["projections"]
        norms += pl.get("norm", 0)

    # layers
    n_attn = n_layers * cfg.attentions_per_layer
    attn_matrices, attn_norms = attention_parameters(cfg)
    attention = n_attn * attn_matrices
    norms += n_attn * attn_norms + n_layers * d * (4 if cfg.layer_type == "shortcut" else 2)
    is_moe = cfg.is_moe
    dense = 0
    n_dense = cfg.dense_mlps_per_layer
    if n_dense:
        per_layer_mlps = cfg.per_layer_mlp_indices
        for index in range(n_dense):
            dense += n_layers * swiglu_parameters(d, cfg.dense_hidden, has_up=index not in per_layer_mlps)
    per_expert = swiglu_parameters(d, cfg.expert_hidden) if is_moe else 0
    experts = n_layers * cfg.n_experts * per_expert if is_moe else 0
    router = n_layers * d * cfg.n_router_outputs if is_moe else 0
    shared_experts = n_layers * cfg.n_shared_experts * swiglu_parameters(d, cfg.expert_hidden)

    # head
    norms += d
    lm_head = 0 if cfg.tie_embeddings else v * d

    groups = {
        "embedding": embedding, "ngram_tables": ngram_tables, "ngram_projections": ngram_projections,
        "per_layer_tables": per_layer_tables, "per_layer_projections": per_layer_projections,
        "attention": attention, "dense": dense, "experts": experts, "shared_experts": shared_experts,
        "router": router, "norms": norms, "lm_head": lm_head,
    }
    total = (embedding + ngram_tables + ngram_projections + per_layer_tables + per_layer_projections + attention
             + dense + experts + shared_experts + router + norms + lm_head)
    # what every token runs through: every group but the lookups (LOOKUP_GROUPS), the routed experts and the
    # head's parameters, plus the output projection's v * d (computed for every token, tied or not)
    always = ngram_projections + per_layer_projections + attention + dense + shared_experts + router + norms + v * d
    if is_moe:
        e, z, k = cfg.n_experts, cfg.n_zero_experts, cfg.top_k
        real_min, real_max = max(0, k - z), min(k, e)
        # expected real experts per token k e / (e + z): the activated count as one exact fraction, an int when
        # it divides (int / int rounds correctly, as float(Fraction) does)
        numerator, denominator = always * (e + z) + n_layers * per_expert * k * e, e + z
    else:
        real_min = real_max = 0
        numerator, denominator = always, 1
    qk_dim, v_dim = attention_head_dims(cfg)
    return Accounting(
        total=total,
        activated=numerator // denominator if numerator % denominator == 0 else numerator / denominator,
        activated_min=always + n_layers * per_expert * real_min,
        activated_max=always + n_layers * per_expert * real_max,
        groups=groups,
        attention_flops_coefficient=6 * n_attn * cfg.n_heads * (qk_dim + v_dim),
    )


def parameter_group(name: str) -> str:
    """The accounting group of a parameter of ``embscale.models.model.LanguageModel``, by its qualified name.

    Relies on the parameter names of ``embscale.models.ngram.NgramEmbedding`` (``token``, ``tables``,
    ``projection``, ``norm``) and of ``embscale.models.per_layer`` (``per_layer.{layer}_{mlp}`` holding an
    ``nn.Embedding`` or an ``NgramEmbedding``).
    """
    parts = name.split(".")
    if name == "embed.token.weight":
        return "embedding"
    if parts[0] == "embed":
        return {"tables": "ngram_tables", "projection": "ngram_projections", "norm": "norms"}[parts[1]]
    if parts[0] == "per_layer":
        if len(parts) == 3:  # PLE: per_layer.{key}.weight, a token table
            return "per_layer_tables"
        return {"token": "per_layer_tables", "tables": "per_layer_tables",
                "projection": "per_layer_projections", "norm": "norms"}[parts[2]]
    if parts[0] == "lm_head":
        return "lm_head"
    if parts[0] == "norm":
        return "norms"
    if parts[0] == "layers":
        sub = parts[2:]
        if any(p.endswith("norm") for p in sub[:-1]):
            return "norms"
        if sub[0].startswith("attn"):
            return "attention"
        if sub[0].startswith("mlp"):
            return "dense"
        if sub[0] == "moe":
            return {"router": "router", "shared": "shared_experts"}.get(sub[1], "experts")
    raise KeyError(f"no accounting group for parameter {name!r}")
