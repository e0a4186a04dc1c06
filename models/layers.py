"""Transformer layers: the standard pre-norm block and LongCat-Flash's shortcut-connected MoE layer.

``standard``::

    h   = x + Attn0(Norm(x))
    out = h + FFN(Norm(h))          # FFN = MoE if n_experts > 0, else the dense SwiGLU MLP0

``shortcut`` (LongCat-Flash; BRIEF section 3)::

    h   = x + Attn0(Norm(x));  u = Norm(h);  moe = MoE(u);  h = h + MLP0(u)
    h   = h + Attn1(Norm(h));  out = h + MLP1(Norm(h)) + moe

The MoE reads the same normalised input as MLP0 and joins the residual stream only at the end of the layer,
so its all-to-all can overlap the second attention/MLP pair. A shortcut layer with ``n_experts == 0`` has
no MoE term. Dense MLPs listed in ``per_layer_mlps`` (``cfg.per_layer_mlp_indices``) have no up-projection;
their multiplier comes in ``gate_inputs[index]`` (Per-Layer Embedding).

``forward(x, rope, gate_inputs=None, kv=None)`` returns ``(out, aux_loss)``, ``aux_loss`` None unless the MoE has
one. With ``record_norms`` set, each sub-layer's output RMS is kept in ``norms`` (keys ``attn0``, ``mlp0``,
``moe``, ``attn1``, ``mlp1``) as detached tensors. Decoding passes ``kv``, the layer's attention caches in
order (``attn0``, then ``attn1``; :class:`~embscale.models.kv_cache.KVCache`), and ``attention_caches()`` says what
each attention module keeps per token.
"""

from __future__ import annotations

import torch
from torch import nn

from embscale.models.attention import build_attention
from embscale.models.config import ModelConfig
from embscale.models.kv_cache import AttentionCache
from embscale.models.mlp import SwiGLU
from embscale.models.moe import MoE
from embscale.models.norm import RMSNorm

Rope = tuple[torch.Tensor, torch.Tensor]
GateInputs = dict[int, torch.Tensor] | None
LayerOutput = tuple[torch.Tensor, torch.Tensor | None]
LayerCaches = list[AttentionCache] | None


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().pow(2).mean().sqrt()


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.record_norms = False
        self.norms: dict[str, torch.Tensor] = {}

    def _seen(self, name: str, y: torch.Tensor) -> torch.Tensor:
        if self.record_norms:
            self.norms[name] = _rms(y)
        return y

    @staticmethod
    def _kv(kv: LayerCaches, index: int) -> AttentionCache | None:
        return None if kv is None else kv[index]

    def attention_caches(self) -> list[dict[str, tuple[int, ...]]]:
        """Per attention module, in order: the cache buffers one token needs (name -> shape)."""
        return [attn.cache_shapes() for attn in (getattr(self, "attn0", None), getattr(self, "attn1", None))
                if attn is not None]

    @staticmethod
    def _gate(gate_inputs: GateInputs, index: int) -> torch.Tensor | None:
        return None if gate_inputs is None else gate_inputs.get(index)


class StandardLayer(_Layer):
    def __init__(self, cfg: ModelConfig, per_layer_mlps: tuple[int, ...] = ()):
        super().__init__()
        if any(i != 0 for i in per_layer_mlps):
            raise ValueError(f"a standard layer has only dense MLP 0, got per-layer targets {per_layer_mlps}")
        self.attn0_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn0 = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoE(cfg) if cfg.is_moe else None
        has_up = 0 not in per_layer_mlps
        self.mlp0 = None if cfg.is_moe else SwiGLU(cfg.d_model, cfg.dense_hidden, has_up=has_up)

    def forward(self, x: torch.Tensor, rope: Rope, gate_inputs: GateInputs = None,
                kv: LayerCaches = None) -> LayerOutput:
        h = x + self._seen("attn0", self.attn0(self.attn0_norm(x), rope, self._kv(kv, 0)))
        u = self.ffn_norm(h)
        if self.moe is not None:
            y, aux = self.moe(u)
            return h + self._seen("moe", y), aux
        return h + self._seen("mlp0", self.mlp0(u, self._gate(gate_inputs, 0))), None


class ShortcutLayer(_Layer):
    def __init__(self, cfg: ModelConfig, per_layer_mlps: tuple[int, ...] = ()):
        super().__init__()
        d, eps = cfg.d_model, cfg.norm_eps
        self.attn0_norm = RMSNorm(d, eps)
        self.attn0 = build_attention(cfg)
        self.ffn0_norm = RMSNorm(d, eps)
        self.mlp0 = SwiGLU(d, cfg.dense_hidden, has_up=0 not in per_layer_mlps)
        self.moe = MoE(cfg) if cfg.is_moe else None
        self.attn1_norm = RMSNorm(d, eps)
        self.attn1 = build_attention(cfg)
        self.mlp1_norm = RMSNorm(d, eps)
        self.mlp1 = SwiGLU(d, cfg.dense_hidden, has_up=1 not in per_layer_mlps)

    def forward(self, x: torch.Tensor, rope: Rope, gate_inputs: GateInputs = None,
                kv: LayerCaches = None) -> LayerOutput:
        h = x + self._seen("attn0", self.attn0(self.attn0_norm(x), rope, self._kv(kv, 0)))
        u = self.ffn0_norm(h)
        moe, aux = self.moe(u) if self.moe is not None else (None, None)
        h = h + self._seen("mlp0", self.mlp0(u, self._gate(gate_inputs, 0)))
        h = h + self._seen("attn1", self.attn1(self.attn1_norm(h), rope, self._kv(kv, 1)))
        out = h + self._seen("mlp1", self.mlp1(self.mlp1_norm(h), self._gate(gate_inputs, 1)))
        if moe is not None:
            out = out + self._seen("moe", moe)
        return out, aux


def build_layer(cfg: ModelConfig) -> _Layer:
    per_layer_mlps = cfg.per_layer_mlp_indices
    if cfg.layer_type == "shortcut":
        return ShortcutLayer(cfg, per_layer_mlps)
    return StandardLayer(cfg, per_layer_mlps)
