"""What every Triton kernel module here shares: where the kernels can run, and a block-size helper.

Kernels run on CUDA tensors, or on any tensor under Triton's CPU interpreter (``TRITON_INTERPRET=1``, the tests);
without Triton installed only the PyTorch twins run. Each kernel module jits its kernels at first launch (keyed by
:func:`interpreting`), because ``triton.jit`` reads the interpreter switch when it decorates.
"""

from __future__ import annotations

import os

import torch

try:  # a CPU-only install may lack Triton: the reference twins still work
    import triton
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_usable(device: torch.device) -> bool:
    """The Triton kernels run on CUDA tensors, or on any tensor under the interpreter."""
    return triton is not None and (device.type == "cuda" or interpreting())


def next_pow2(x: int) -> int:
    """The smallest power of two at least ``x`` (1 for ``x <= 1``): Triton block shapes are powers of two."""
    return 1 << max(0, (x - 1).bit_length())


__all__ = ["interpreting", "next_pow2", "triton_usable"]
