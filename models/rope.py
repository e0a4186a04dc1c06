"""Rotary position embedding (Su et al. 2021), rotate-half (GPT-NeoX / Llama) layout.

The angles are recomputed in float32 at every forward from ``theta`` and the sequence length: there is no
buffer, so casting the model to bf16 or building it on the meta device cannot degrade or break them, and the
cost (``T x dim/2`` values) is negligible next to attention.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces ``(cos, sin)``, each ``(T, dim/2)`` float32, for positions ``0 .. T-1``."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        self.dim = dim
        self.theta = theta

    def forward(self, seq_len: int,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        inv_freq = self.theta ** -exponents  # (dim/2,)
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (T, dim/2)
        return angles.cos(), angles.sin()

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` at arbitrary positions ``(B, T)`` int64, each ``(B, 1, T, dim/2)`` float32 (the 1
        broadcasts over heads): decoding, where each sequence of a batch is at its own position. The same
        float32 products as :meth:`forward`, so position ``p`` gets bitwise the same angles either way."""
        exponents = torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32) / self.dim
        inv_freq = self.theta ** -exponents  # (dim/2,)
        angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, T, dim/2)
        return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, T, dim)`` by position; pairs are ``(x[i], x[i + dim/2])``. ``cos`` and
    ``sin`` are ``(T, dim/2)`` (one position per time step) or ``(B, 1, T, dim/2)`` (per sequence)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, dim/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)
