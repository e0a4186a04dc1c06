"""Per-Layer Embedding (PLE) and Per-Layer N-gram Embedding (PLNE), BRIEF section 2.

A per-layer embedding replaces the up-projection output of a layer's dense SwiGLU MLP::

    FFN_l(x) = W_d( SiLU(W_g x) * E_l(t) )

``E_l`` maps the token ids to ``dense_hidden`` features: for ``ple`` a per-layer token table ``E0_l``
(``nn.Embedding(V0, dense_hidden)``), for ``plne`` a per-layer :class:`~embscale.models.ngram.NgramEmbedding` of width
``dense_hidden`` (its own token table, sub-tables and projection). Only dense MLPs receive it; which ones of
a shortcut layer is ``per_layer.targets`` (``first`` = MLP 0, ``second`` = MLP 1, ``both``). A dense standard
layer has one MLP (index 0), so it takes ``targets: first`` only.

Initialisation (the paper is silent): the PLE token tables are ``N(0, init_std^2)`` like every embedding
table; PLNE uses NgramEmbedding's initialisation with ``init_std``, and its ``per_layer.ngram.amplification``.
"""

from __future__ import annotations

import torch
from torch import nn

from embscale.models.config import ModelConfig
from embscale.models.ngram import NgramEmbedding
from embscale.models.sizes import per_layer_parameter_counts, per_layer_slots  # noqa: F401  (re-exported)


def per_layer_key(layer_index: int, mlp_index: int) -> str:
    """The ``ModuleDict`` key of one slot: ``"{layer_index}_{mlp_index}"``."""
    return f"{layer_index}_{mlp_index}"


def build_per_layer_embeddings(cfg: ModelConfig, device: torch.device | str | None = None,
                               dtype: torch.dtype | None = None) -> nn.ModuleDict:
    """One module per slot, keyed ``"{layer_index}_{mlp_index}"``, each mapping ids ``(B, T)`` to
    ``(B, T, dense_hidden)``. Empty without ``cfg.per_layer``."""
    modules = nn.ModuleDict()
    if cfg.per_layer is None:
        return modules
    for layer, mlp in per_layer_slots(cfg):
        if cfg.per_layer.kind == "ple":
            module: nn.Module = nn.Embedding(cfg.vocab_size, cfg.dense_hidden, device=device, dtype=dtype)
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
        else:
            module = NgramEmbedding(cfg.per_layer.ngram, cfg.vocab_size, cfg.dense_hidden, cfg.eos_token_id,
                                    init_std=cfg.init_std, device=device, dtype=dtype)
        modules[per_layer_key(layer, mlp)] = module
    return modules


__all__ = ["build_per_layer_embeddings", "per_layer_key", "per_layer_parameter_counts", "per_layer_slots"]
