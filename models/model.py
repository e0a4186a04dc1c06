"""The decoder-only language model: embedding, a stack of layers, final norm, LM head.

Embedding: a plain ``TokenEmbedding`` when ``cfg.ngram`` is None, else the hashed N-gram Embedding
(``embscale.models.ngram.NgramEmbedding``); both expose the ``V0 x D`` table as ``.token``. With ``cfg.per_layer``
the per-layer embeddings (``embscale.models.per_layer.build_per_layer_embeddings``, keyed ``"{layer}_{mlp}"``)
feed the dense MLPs that have no up-projection. The LM head is tied to ``embed.token.weight`` when ``tie_embeddings``.

Initialisation (GPT-2 style, applied to the modules built here; the N-gram and per-layer embeddings keep their
own): every weight matrix and embedding table ~ N(0, init_std); output projections that write into the
residual stream (attention ``wo``, MLP and expert ``w_down``) ~ N(0, init_std / sqrt(2 * n_blocks)), where
``n_blocks = n_layers * attentions_per_layer`` counts a shortcut layer as two attention+MLP blocks; the router
~ N(0, init_std) (small, so the first routing decisions are not all ties); norm gains 1, LayerNorm bias 0.

Decoding (:meth:`LanguageModel.forward_cached`) runs the same modules over a step's new tokens with a
:class:`~embscale.models.kv_cache.KVCache` (:meth:`LanguageModel.new_cache`); the N-gram row ids of the new tokens
come from outside (the N-gram cache of ``embscale.inference``), since a step alone cannot see their look-back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embscale.kernels.cross_entropy import cross_entropy
from embscale.models.config import ModelConfig
from embscale.models.kv_cache import KVCache
from embscale.models.layers import build_layer
from embscale.models.moe import MoE
from embscale.models.norm import RMSNorm
from embscale.models.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # mean token cross-entropy (fp32), None without targets
    aux_loss: torch.Tensor  # scalar; zero when no auxiliary loss is used


class TokenEmbedding(nn.Module):
    """``nn.Embedding(V0, D)`` (attribute ``token``) with an optional amplification of its output.

    ``none``: as is. ``sqrt_d``: times ``sqrt(D)``. ``layernorm``: LayerNorm(D) with affine parameters.
    ``sqrt_count``: divide by ``sqrt(S + 1)``; a plain embedding has ``S = 0`` sub-tables, so this is the
    identity (kept so that one option name works for both the plain and the N-gram embedding).
    """

    def __init__(self, vocab_size: int, width: int, amplification: str = "none", norm_eps: float = 1e-6):
        super().__init__()
        self.amplification = amplification
        self.token = nn.Embedding(vocab_size, width)
        self.norm = nn.LayerNorm(width, eps=norm_eps) if amplification == "layernorm" else None
        self.scale = math.sqrt(width) if amplification == "sqrt_d" else 1.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token(ids)  # (B, T, D)
        if self.norm is not None:
            return self.norm(x)
        return x * self.scale if self.scale != 1.0 else x


def _rotary_dim(cfg: ModelConfig) -> int:
    return cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim


_OUTPUT_PROJECTIONS = ("wo", "w_down")


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """The initialisation described in the module docstring, applied to ``module`` and its children."""
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layers * cfg.attentions_per_layer)
    for name, child in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(child, MoE):
            child.reset_parameters(std, out_std)
        elif isinstance(child, nn.Linear):
            nn.init.normal_(child.weight, 0.0, out_std if leaf in _OUTPUT_PROJECTIONS else std)
        elif isinstance(child, nn.Embedding):
            nn.init.normal_(child.weight, 0.0, std)
        elif isinstance(child, (RMSNorm, nn.LayerNorm)):
            if child.weight is not None:
                nn.init.ones_(child.weight)
            if getattr(child, "bias", None) is not None:
                nn.init.zeros_(child.bias)


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.ngram is None:
            self.embed = TokenEmbedding(cfg.vocab_size, cfg.d_model, cfg.embedding_amplification,
                                        cfg.norm_eps)
        else:
            from embscale.models.ngram import NgramEmbedding

            self.embed = NgramEmbedding(cfg.ngram, vocab_size=cfg.vocab_size, width=cfg.d_model,
                                        eos_token_id=cfg.eos_token_id, init_std=cfg.init_std,
                                        norm_eps=cfg.norm_eps)
        if cfg.per_layer is not None:
            from embscale.models.per_layer import build_per_layer_embeddings

            self.per_layer = build_per_layer_embeddings(cfg)
        else:
            self.per_layer = None
        self.rope = RotaryEmbedding(_rotary_dim(cfg), cfg.rope_theta)
        self.layers = nn.ModuleList(build_layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

        for module in (self.layers, self.norm, self.lm_head):
            if module is not None:
                init_weights(module, cfg)
        if isinstance(self.embed, TokenEmbedding):
            init_weights(self.embed, cfg)

        self._record_norms = False
        self._embedding_norm: torch.Tensor | None = None

    # ----- forward -----
    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """``ids`` (B, T) int64; ``targets`` (B, T) int64, positions with -100 ignored."""
        B, T = ids.shape
        x = self.embed(ids)  # (B, T, D)
        if self._record_norms:
            self._embedding_norm = x.detach().float().pow(2).mean().sqrt()
        rope = self.rope(T, device=ids.device)
        aux_losses = []
        per_layer_rows = self._per_layer_rows(ids)
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, rope, self._gate_inputs(i, ids, per_layer_rows))
            if aux is not None:
                aux_losses.append(aux)
        x = self.norm(x)
        head = self.embed.token.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head)  # (B, T, V)
        loss = None
        if targets is not None:
            # on CUDA a fused kernel: no fp32 copy of the (B*T, V) logits (kernels/cross_entropy.py)
            loss = cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else torch.zeros((), device=ids.device)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss)

    # ----- decoding -----
    def new_cache(self, batch: int, capacity: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` tokens (on the model's device and
        in its dtype unless given)."""
        weight = self.norm.weight
        shapes = [layer.attention_caches() for layer in self.layers]
        return KVCache(shapes, batch, capacity, device=device or weight.device, dtype=dtype or weight.dtype)

    def forward_cached(self, ids: torch.Tensor, cache: KVCache, n_new: torch.Tensor | None = None, *,
                       embed_rows: torch.Tensor | None = None, per_layer_rows: torch.Tensor | None = None,
                       plain_embedding: bool = False) -> torch.Tensor:
        """One decoding step: logits ``(B, T, V)`` of ``T`` new tokens per sequence after those in ``cache``.

        ``ids`` (B, T): the new tokens, right-padded; ``n_new`` (B,) int64: how many of each row are real (all
        ``T`` when None); the padding's logits are meaningless. The cache takes the real tokens' keys.
        ``embed_rows`` (B, T, S) / ``per_layer_rows`` (B, T, S'): the new tokens' N-gram row ids for the N-gram
        Embedding / the per-layer N-gram embeddings (needed when the model has them). ``plain_embedding``: read
        ``finish(E0(t))`` instead, with no N-gram lookup at all (a draft made of this model's trunk).
        """
        B, T = ids.shape
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.int64, device=ids.device)
        step = cache.begin(n_new, T)
        x = self._embed_step(ids, embed_rows, plain_embedding)  # (B, T, D)
        rope = self.rope.at(step.positions)  # each (B, 1, T, rotary_dim / 2)
        for i, layer in enumerate(self.layers):
            gate_inputs = self._gate_inputs_step(i, ids, per_layer_rows, plain_embedding)
            x, _ = layer(x, rope, gate_inputs, kv=cache.layers[i])
        cache.commit(n_new)
        x = self.norm(x)
        head = self.embed.token.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)  # (B, T, V)

    def _embed_step(self, ids: torch.Tensor, rows: torch.Tensor | None, plain: bool) -> torch.Tensor:
        if isinstance(self.embed, TokenEmbedding):
            return self.embed(ids)
        if plain:
            return self.embed.token_only(ids)
        if rows is None:
            raise ValueError("this model has an N-gram Embedding: pass embed_rows (the N-gram cache's row ids) "
                             "or plain_embedding=True")
        return self.embed(ids, rows)

    def _gate_inputs_step(self, layer: int, ids: torch.Tensor, rows: torch.Tensor | None,
                          plain: bool) -> dict[int, torch.Tensor] | None:
        if self.per_layer is None:
            return None
        inputs = {}
        for mlp in self.cfg.per_layer_mlp_indices:
            module = self.per_layer[f"{layer}_{mlp}"]
            if not hasattr(module, "row_ids"):  # PLE: a token table, no look-back
                inputs[mlp] = module(ids)
            elif plain:
                inputs[mlp] = module.token_only(ids)
            elif rows is None:
                raise ValueError("this model has per-layer N-gram embeddings: pass per_layer_rows "
                                 "or plain_embedding=True")
            else:
                inputs[mlp] = module(ids, rows)
        return inputs

    def ngram_specs(self) -> dict[str, nn.Module]:
        """The hash specs decoding must keep N-gram caches for: ``embed`` (the N-gram Embedding) and
        ``per_layer`` (PLNE; every slot shares one spec), each the ``NgramEmbedding`` whose ``plan`` and
        ``eos_token_id`` define the rows."""
        specs: dict[str, nn.Module] = {}
        if not isinstance(self.embed, TokenEmbedding):
            specs["embed"] = self.embed
        if self.per_layer is not None and len(self.per_layer) > 0:
            first = next(iter(self.per_layer.values()))
            if hasattr(first, "row_ids"):
                specs["per_layer"] = first
        return specs

    def _per_layer_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """PLNE: every per-layer N-gram embedding shares one hash spec, so hash the ids once."""
        if self.per_layer is None or len(self.per_layer) == 0:
            return None
        first = next(iter(self.per_layer.values()))
        return first.row_ids(ids) if hasattr(first, "row_ids") else None

    def _gate_inputs(self, layer: int, ids: torch.Tensor,
                     rows: torch.Tensor | None) -> dict[int, torch.Tensor] | None:
        """Per-layer embedding outputs for this layer's dense MLPs, keyed by MLP index."""
        if self.per_layer is None:
            return None
        inputs = {}
        for mlp in self.cfg.per_layer_mlp_indices:
            module = self.per_layer[f"{layer}_{mlp}"]
            inputs[mlp] = module(ids) if rows is None else module(ids, rows)
        return inputs

    # ----- N-gram tables -----
    def ngram_embeddings(self) -> list[nn.Module]:
        """Every ``NgramEmbedding`` of the model: the N-gram Embedding and the per-layer n-gram embeddings."""
        from embscale.models.ngram import NgramEmbedding

        return [m for m in self.modules() if isinstance(m, NgramEmbedding)]

    def ngram_tables(self) -> list[nn.Parameter]:
        """``tables.weight`` of every ``NgramEmbedding``, once each (empty without N-gram tables)."""
        tables: dict[int, nn.Parameter] = {}
        for module in self.ngram_embeddings():
            tables.setdefault(id(module.tables.weight), module.tables.weight)
        return list(tables.values())

    def set_ngram_backend(self, backend: str, sparse_grad: bool = False) -> list[nn.Parameter]:
        """Run every ``NgramEmbedding``'s lookup on ``backend`` (``torch`` or ``triton``), with the tables'
        gradients as touched rows when ``sparse_grad`` (for a table optimizer); returns the tables."""
        for module in self.ngram_embeddings():
            module.set_backend(backend, sparse_grad=sparse_grad)
        return self.ngram_tables()

    # ----- MoE balancing and statistics -----
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def router_load_counts(self) -> list[torch.Tensor]:
        """Each MoE layer's expert loads counted since its last bias update (int64 buffers, updated in place by
        the forward): what :meth:`update_router_biases` balances on. Under data parallelism sum them over the
        ranks in place first, so every rank balances alike."""
        return [moe.pending_counts for moe in self.moe_layers()]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Auxiliary-loss-free balancing step of every MoE layer; call after each optimizer step."""
        for moe in self.moe_layers():
            moe.update_bias()

    def load_stats(self) -> dict[str, float]:
        """Mean over MoE layers of the last forward's ``moe_imbalance``, ``zero_expert_fraction``,
        ``distinct_experts``; NaN for a model without routed experts."""
        stats = [moe.load_stats() for moe in self.moe_layers()]
        keys = ("moe_imbalance", "zero_expert_fraction", "distinct_experts")
        if not stats:
            return {key: float("nan") for key in keys}
        return {key: sum(s[key] for s in stats) / len(stats) for key in keys}

    # ----- output norms -----
    @property
    def record_norms(self) -> bool:
        return self._record_norms

    @record_norms.setter
    def record_norms(self, value: bool) -> None:
        self._record_norms = bool(value)
        for layer in self.layers:
            layer.record_norms = bool(value)
            layer.norms = {}
        self._embedding_norm = None

    def output_norms(self) -> dict[str, float]:
        """RMS of the embedding output (``embedding``) and of every sub-layer output (``layer{i}.attn0``,
        ``layer{i}.mlp0``, ``layer{i}.moe``, ``layer{i}.attn1``, ``layer{i}.mlp1``) of the last forward run
        with ``record_norms = True``; empty otherwise."""
        norms: dict[str, float] = {}
        if self._embedding_norm is not None:
            norms["embedding"] = float(self._embedding_norm)
        for i, layer in enumerate(self.layers):
            for name, value in layer.norms.items():
                norms[f"layer{i}.{name}"] = float(value)
        return norms


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> LanguageModel:
    """Build and initialise the model directly on ``device`` (``"meta"`` allocates nothing)."""
    if device is None:
        return LanguageModel(cfg)
    with torch.device(device):
        return LanguageModel(cfg)
