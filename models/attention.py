"""Causal self-attention: standard multi-head (optionally grouped-query) and Multi-head Latent Attention.

Both use ``F.scaled_dot_product_attention(is_causal=True)`` and take the rotary tables ``(cos, sin)`` of the
current sequence from the model. No biases anywhere.

Decoding passes ``kv``, the module's :class:`~embscale.models.kv_cache.AttentionCache`: the new tokens' keys (or
MLA's latent and rotary key) are written into it and the queries attend to every cached slot through the step's
mask instead of ``is_causal``; ``rope`` then holds per-sequence tables ``(B, 1, T, dim/2)``. Without ``kv`` the
forward is the training one, unchanged. ``cache_shapes()`` says what one token costs in the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embscale.models.config import ModelConfig
from embscale.models.kv_cache import AttentionCache
from embscale.models.norm import RMSNorm
from embscale.models.rope import apply_rotary


class MultiHeadAttention(nn.Module):
    """Standard attention; ``n_kv_heads < n_heads`` shares each key/value head among a group of query
    heads (grouped-query attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per token: the rotated key and the value of every key/value head."""
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: AttentionCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        grouped = self.n_kv_heads != self.n_heads
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)  # (B, H, T, hd)
        else:
            cached = kv.append(k=k.transpose(1, 2), v=v.transpose(1, 2))  # each (B, C, Hkv, hd), C = capacity
            k, v = cached["k"].transpose(1, 2), cached["v"].transpose(1, 2)  # (B, Hkv, C, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv.step.attn_mask, enable_gqa=grouped)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2, LongCat-Flash).

    Queries: ``W_qb(RMSNorm(W_qa x))`` when ``q_lora_rank > 0``, else ``W_q x``; each head gets
    ``qk_nope_head_dim + qk_rope_head_dim``. Keys and values: ``W_kva x = [c_kv | k_rope]`` with the
    latent ``c_kv`` (``kv_lora_rank``) normalised and expanded by ``W_kvb`` into per-head ``k_nope`` and
    ``v``, and one ``k_rope`` (``qk_rope_head_dim``) shared by all heads. Rotary applies to the rope parts
    only. The inner norms (``q_norm``, ``kv_norm``) are parameters.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mla = cfg.mla
        assert mla is not None
        self.n_heads = cfg.n_heads
        self.nope_dim = mla.qk_nope_head_dim
        self.rope_dim = mla.qk_rope_head_dim
        self.qk_head_dim = mla.qk_head_dim
        self.v_head_dim = mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        q_out = self.n_heads * self.qk_head_dim
        if mla.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.d_model, mla.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(mla.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(mla.q_lora_rank, q_out, bias=False)
            self.wq = None
        else:
            self.wq = nn.Linear(cfg.d_model, q_out, bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, mla.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(mla.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, cfg.d_model, bias=False)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per token: the normalised latent ``c_kv`` and the rotated key ``k_rope`` shared by all heads."""
        return {"latent": (self.kv_lora_rank,), "k_rope": (self.rope_dim,)}

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: AttentionCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        cos, sin = rope
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split((self.nope_dim, self.rope_dim), dim=-1)

        c_kv, k_rope = self.wkv_a(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        latent = self.kv_norm(c_kv)  # (B, T, kv_lora_rank): what the cache keeps
        k_rope = apply_rotary(k_rope.unsqueeze(1), cos, sin)  # (B, 1, T, rope): one key rope for all heads
        q_rope = apply_rotary(q_rope, cos, sin)
        if kv is not None:  # keys and values of every cached token: S = capacity slots, masked per step
            cached = kv.append(latent=latent, k_rope=k_rope.squeeze(1))
            latent, k_rope = cached["latent"], cached["k_rope"].unsqueeze(1)  # (B, S, r), (B, 1, S, rope)
        S = latent.shape[1]
        kv_heads = self.wkv_b(latent).view(B, S, H, self.nope_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv_heads.split((self.nope_dim, self.v_head_dim), dim=-1)  # (B, H, S, nope), (B, H, S, v)

        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope_dim)), dim=-1)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, v_head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv.step.attn_mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.v_head_dim))


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "mla":
        return MultiHeadLatentAttention(cfg)
    return MultiHeadAttention(cfg)
