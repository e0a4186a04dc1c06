"""Fine-grained Mixture-of-Experts with zero-computation experts (LongCat-Flash, BRIEF section 3).

Routing, for each token ``x`` (``E`` real experts, ``Z`` zero experts, top-``k``)::

    s      = softmax(router(x))                     # fp32, over all E + Z outputs
    chosen = topk(s + correction_bias, k)           # the bias only picks; it never weights
    y      = sum_{i in chosen} scale * s_i * f_i(x) # f_i = SwiGLU expert, or the identity for a zero expert
           + shared(x)                              # shared experts, always on

The weights are the softmax scores of the chosen experts, not renormalised, times ``routed_scaling_factor``.
Balancing is auxiliary-loss-free (DeepSeek-V3): after each optimizer step ``update_bias()`` moves every real
expert's bias by ``rate * sign(mean_load - load)``; zero-expert biases stay fixed. An optional switch-style
auxiliary loss ``coef * E * sum_i f_i P_i`` over the real experts is returned beside the output.

Dispatch (``MoE.forward``): the ``T*k`` (token, slot) pairs are sorted by expert id (stable ``argsort``);
zero experts have the largest ids, so their slots form a trailing group. Group offsets come from on-device
counts and end at the number of real slots, so the grouped products skip the zero slots while every shape stays
static (``T*k`` rows): no ``.item()``, no host sync, no Python loop over experts on the CUDA path. Rows past the
last offset are never computed; the steps that read them (combine, and the backward of the gather and of the
routing weight) mask them out. Zero-expert slots contribute ``x * weight`` directly in token space. The routing
weight multiplies the SwiGLU hidden (``H`` wide, before the down projection) rather than the ``D``-wide output, so
the combine is an unweighted gather-sum over each token's ``k`` slots. Expert weights: gate and up fused into one
``w_gate_up (E, 2H, D)``. How each step is made fast lives in :mod:`embscale.kernels.moe_dispatch`;
``forward_reference`` is the plain per-expert loop that defines the meaning, and tests compare the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embscale.kernels.moe_dispatch import (
    Combine,
    Dispatch,
    SwiGLUWeighted,
    accumulation_dtype,
    grouped_linear,
    sort_key_dtype,
    use_triton_routing,
)
from embscale.kernels.routing import count_ids, select_experts
from embscale.models.config import ModelConfig
from embscale.models.mlp import SwiGLU


class MoE(nn.Module):
    """Routed SwiGLU experts + zero experts + shared experts, with auxiliary-loss-free balancing.

    ``forward(x)`` returns ``(y, aux_loss)``; ``aux_loss`` is None unless ``aux_loss_coef > 0``.
    Parameters: ``router.weight (E+Z, D)``, ``w_gate_up (E, 2H, D)`` (rows ``[:H]`` gate, ``[H:]`` up),
    ``w_down (E, D, H)``, and ``shared`` (one SwiGLU of hidden ``n_shared * H``, which equals the sum of
    ``n_shared`` separate SwiGLU experts). Buffers: ``correction_bias`` (fp32, saved in checkpoints),
    ``pending_counts`` (loads since the last bias update) and ``last_counts`` (loads of the last forward).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.n_experts = cfg.n_experts
        self.n_zero_experts = cfg.n_zero_experts
        self.top_k = cfg.top_k
        self.hidden = cfg.expert_hidden
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.bias_update_rate = cfg.router_bias_update_rate
        self.aux_loss_coef = cfg.aux_loss_coef
        n_out = cfg.n_router_outputs

        self.router = nn.Linear(cfg.d_model, n_out, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(self.n_experts, 2 * self.hidden, cfg.d_model))
        self.w_down = nn.Parameter(torch.empty(self.n_experts, cfg.d_model, self.hidden))
        self.shared = (SwiGLU(cfg.d_model, cfg.n_shared_experts * cfg.expert_hidden)
                       if cfg.n_shared_experts > 0 else None)
        self.register_buffer("correction_bias", torch.zeros(n_out, dtype=torch.float32))
        self.register_buffer("pending_counts", torch.zeros(n_out, dtype=torch.int64), persistent=False)
        self.register_buffer("last_counts", torch.zeros(n_out, dtype=torch.int64), persistent=False)
        # The model re-initialises everything; this keeps a stand-alone MoE usable.
        residual_branches = 2 * cfg.n_layers * cfg.attentions_per_layer
        self.reset_parameters(cfg.init_std, cfg.init_std / math.sqrt(residual_branches))

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, 0.0, std)
        nn.init.normal_(self.w_gate_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, out_std)
        if self.shared is not None:
            for lin in (self.shared.w_gate, self.shared.w_up):
                nn.init.normal_(lin.weight, 0.0, std)
            nn.init.normal_(self.shared.w_down.weight, 0.0, out_std)

    def _apply(self, fn, recurse=True):
        # Keep the balancing bias in float32 when the module is cast (bf16 would swallow 1e-3 steps).
        bias = self.correction_bias
        super()._apply(fn, recurse)
        if self.correction_bias.dtype != torch.float32:
            self.correction_bias = bias.to(device=self.correction_bias.device, dtype=torch.float32)
        return self

    # ----- routing -----
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(scores (T, E+Z) fp32, chosen (T, k) int64, weights (T, k) fp32)``."""
        scores, chosen, weights, _ = self._route(x)
        return scores, chosen, weights

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`route` plus ``counts (E+Z,)`` int64, each expert's slots: on CUDA one Triton kernel picks the
        experts and counts them (:mod:`embscale.kernels.routing`), elsewhere ``topk`` and a scatter of ones."""
        scores = self.router(x).float().softmax(dim=-1)
        chosen, counts = select_experts(scores.detach(), self.correction_bias, self.top_k,
                                        use_triton=use_triton_routing(x))
        weights = scores.gather(1, chosen) * self.routed_scaling_factor
        return scores, chosen, weights, counts

    def _record(self, counts: torch.Tensor) -> None:
        self.last_counts.copy_(counts)
        if self.training:
            self.pending_counts.add_(counts)

    def _aux_loss(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        if self.aux_loss_coef <= 0:
            return None
        n_slots = scores.shape[0] * self.top_k
        fraction = counts[: self.n_experts].float() / n_slots  # f_i: share of routed slots, no gradient
        probability = scores[:, : self.n_experts].mean(0)  # P_i
        return self.aux_loss_coef * self.n_experts * (fraction * probability).sum()

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    # ----- forward -----
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        T, k, E = x.shape[0], self.top_k, self.n_experts
        scores, chosen, weights, counts = self._route(x)
        flat_choice = chosen.reshape(-1)  # (M,), slot s = t*k + j
        self._record(counts)

        # Sort slots by expert; zero experts have ids >= E, so their slots end up last. Narrow keys: a radix
        # sort makes one pass per key byte (uint8 keys for up to 256 experts; timings in BENCHMARKS.md).
        order = torch.argsort(flat_choice.to(sort_key_dtype(E + self.n_zero_experts)), stable=True)  # row -> slot
        position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        slot_pos = position.view(T, k)  # slot -> sorted row
        token_of_row = order // k
        offsets = counts[:E].cumsum(0).to(torch.int32)  # group ends; offsets[-1] = number of real slots
        if self.n_zero_experts > 0:
            slot_real = chosen < E  # (T, k)
            row_real = torch.arange(order.numel(), device=x.device) < offsets[-1]  # (M,)
        else:
            slot_real = row_real = None

        dtype = self._compute_dtype(x)
        xc = x.to(dtype)
        rows = Dispatch.apply(xc, token_of_row, slot_pos, slot_real)  # (M, D)
        gate_up = grouped_linear(rows, self.w_gate_up, offsets)  # (M, 2H)
        row_weight = weights.reshape(-1).index_select(0, order)  # (M,)
        hidden = SwiGLUWeighted.apply(gate_up, row_weight, row_real)  # (M, H), weighted
        expert_out = grouped_linear(hidden, self.w_down, offsets)  # (M, D)
        y = Combine.apply(expert_out, token_of_row, slot_pos, slot_real)  # (T, D)

        if self.n_zero_experts > 0:  # identity experts: x times their weight
            acc = accumulation_dtype(dtype)
            zero_weight = torch.where(slot_real, 0.0, weights).to(acc).sum(-1, keepdim=True)  # (T, 1)
            y = y + (xc.to(acc) * zero_weight).to(dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape[:-1] + (y.shape[-1],)), self._aux_loss(scores, counts)

    def forward_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same layer as a plain loop over experts (slow; defines the meaning for tests and
        benchmarks)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        E, H = self.n_experts, self.hidden
        scores, chosen, weights = self.route(x)
        counts = count_ids(chosen.reshape(-1), E + self.n_zero_experts)
        acc = accumulation_dtype(x.dtype)
        y = torch.zeros_like(x, dtype=acc)
        # unbind, not w_gate_up[e]: indexing's backward would zero-fill a full-size gradient for every expert
        # (quadratic in E; seconds for a thousand experts), unbind's stacks them once.
        w_gate_up, w_down = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        for e in range(E + self.n_zero_experts):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            if token.numel() == 0:
                continue
            xe = x[token]
            if e < E:
                g, u = (xe @ w_gate_up[e].T.to(x.dtype)).split(H, dim=-1)
                out = (F.silu(g) * u) @ w_down[e].T.to(x.dtype)
            else:
                out = xe
            y = y.index_add(0, token, out.to(acc) * weights[token, slot].unsqueeze(-1))
        y = y.to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape), self._aux_loss(scores, counts)

    # ----- balancing and statistics -----
    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing step over the loads counted since the previous call."""
        load = self.pending_counts[: self.n_experts].float()
        self.correction_bias[: self.n_experts] += self.bias_update_rate * torch.sign(load.mean() - load)
        self.pending_counts.zero_()

    @torch.no_grad()
    def load_stats(self) -> dict[str, float]:
        """Of the last forward: ``moe_imbalance`` (max / mean load over real experts),
        ``zero_expert_fraction`` (share of routed slots sent to zero experts), ``distinct_experts`` (real
        experts that got any slot)."""
        counts = self.last_counts.float()
        real = counts[: self.n_experts]
        total = counts.sum().clamp(min=1.0)
        mean = real.mean()
        imbalance = (real.max() / mean) if mean > 0 else torch.tensor(float("nan"))
        return {
            "moe_imbalance": float(imbalance),
            "zero_expert_fraction": float(counts[self.n_experts:].sum() / total),
            "distinct_experts": float((real > 0).sum()),
        }

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, zero_experts={self.n_zero_experts}, top_k={self.top_k}, "
                f"hidden={self.hidden}, scale={self.routed_scaling_factor}")
