"""What every Triton kernel module here shares: where the kernels can run, lazy jitting, a block-size helper.

Kernels run on CUDA tensors, or on any tensor under Triton's CPU interpreter (``TRITON_INTERPRET=1``, the tests);
without Triton installed only the PyTorch twins run. ``triton.jit`` picks the interpreter or the compiler when it
decorates, so kernels are decorated at their first launch (:func:`lazy_kernels`), not at import: the switch is
read then, and the modules import without a GPU or without Triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, converting only when the dtype differs. A custom ``autograd.Function`` must not
    return a no-op ``.to()``: traced by ``torch.compile`` (torch 2.11, AOT autograd) the gradient through such an
    output is silently zero."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


_JITTED: dict[tuple[str, bool], dict] = {}


def lazy_kernels(owner: str, build: Callable[[], dict]) -> dict:
    """``owner``'s jitted kernels, built by ``build()`` at the first call for the current interpreter switch
    and kept for the process (``build`` decorates with ``triton.jit``; a module whose kernels call a jitted
    helper by its global name also binds that helper there)."""
    if triton is None:
        raise RuntimeError(f"{owner}: Triton is not installed")
    key = (owner, interpreting())
    if key not in _JITTED:
        _JITTED[key] = build()
    return _JITTED[key]


__all__ = ["cast", "interpreting", "lazy_kernels", "next_pow2", "triton_usable"]
