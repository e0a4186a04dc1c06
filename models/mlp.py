"""SwiGLU feed-forward (Shazeer 2020): ``W_d( silu(W_g x) * W_u x )``, no biases.

With ``has_up=False`` the up-projection is absent and its output comes from outside: the Per-Layer
Embedding (PLE / PLNE, BRIEF section 2) supplies ``gate_input`` and the MLP computes
``W_d( silu(W_g x) * gate_input )``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, has_up: bool = True):
        super().__init__()
        self.hidden = hidden
        self.has_up = has_up
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False) if has_up else None
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, gate_input: torch.Tensor | None = None) -> torch.Tensor:
        if self.has_up:
            if gate_input is not None:
                raise ValueError("this MLP has its own up-projection; it takes no gate_input")
            multiplier = self.w_up(x)
        else:
            if gate_input is None:
                raise ValueError("this MLP has no up-projection (has_up=False): "
                                 "pass gate_input (B, T, hidden)")
            multiplier = gate_input
        return self.w_down(F.silu(self.w_gate(x)) * multiplier)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, has_up={self.has_up}"
