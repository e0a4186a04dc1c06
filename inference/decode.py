"""Batched decoding with the KV cache and the N-gram Cache: prefill, then one token (or several) per step.

A :class:`Decoder` holds a model and a batch's caches. :meth:`Decoder.prefill` feeds prompts of unequal lengths as
one right-padded block (each sequence's tokens sit at slots 0, 1, ... of the cache, so positions need no offset;
see :mod:`embscale.models.kv_cache`); :meth:`Decoder.feed` feeds ``T`` more tokens per sequence, ``n_new[b]`` of
them real; :meth:`Decoder.rollback` drops each sequence's last tokens from both caches. :func:`generate` is the
plain loop: one token per sequence per step, greedy or sampled.

The N-gram row ids of a step come from the N-gram Cache (only the new tokens are hashed); a decoder built with
``plain_embedding=True`` reads ``finish(E0(t))`` instead and keeps no N-gram cache (a draft made of a target's
trunk, :mod:`embscale.inference.speculative`).

:func:`decode_forward` is the step of fixed shape (every fed token real) that the fast paths wrap: replayed from a
CUDA graph (:mod:`embscale.inference.cuda_graph`) and compiled (:func:`compiled_decode_forward`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from embscale.inference.ngram_cache import NgramCaches


def pad_right(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of unequal lengths (each ``(L_b,)`` int64, ``L_b >= 1``) -> ``ids (B, max L)`` right-padded with
    ``pad_id`` and ``lengths (B,)`` int64."""
    if not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts: give one non-empty 1-D tensor of token ids per sequence")
    lengths = torch.tensor([p.numel() for p in prompts], dtype=torch.int64, device=prompts[0].device)
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.int64, device=prompts[0].device)
    for b, prompt in enumerate(prompts):
        ids[b, : prompt.numel()] = prompt
    return ids, lengths


def last_real(logits: torch.Tensor, n_new: torch.Tensor) -> torch.Tensor:
    """``(B, T, V)`` step logits -> ``(B, V)`` at each row's last real token (``n_new[b] - 1``)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, n_new - 1]


def choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens from ``(..., V)`` logits: the argmax when ``temperature == 0``, else a sample of
    ``softmax(logits / temperature)``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / temperature)`` in float32 (float64 stays float64)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (logits.to(dtype) / temperature).softmax(dim=-1)


class Decoder:
    """A model and the caches of a batch of ``batch`` sequences of up to ``capacity`` tokens each."""

    def __init__(self, model: nn.Module, batch: int, capacity: int, *, plain_embedding: bool = False):
        self.model = model
        self.plain_embedding = plain_embedding
        device = model.norm.weight.device
        self.kv = model.new_cache(batch, capacity)
        self.ngrams = None if plain_embedding else NgramCaches(model, batch, device)
        self.last_rows: dict[str, torch.Tensor] = {}  # the N-gram row ids of the last feed (for benchmarks)

    @property
    def lengths(self) -> torch.Tensor:
        return self.kv.lengths

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, n_new: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``ids (B, T)`` (right-padded; ``n_new (B,)`` real tokens per row, all when None); return the
        logits ``(B, T, V)``."""
        rows = self.ngrams.step(ids, n_new) if self.ngrams is not None else {}
        self.last_rows = rows
        return self.model.forward_cached(ids, self.kv, n_new, plain_embedding=self.plain_embedding, **rows)

    def prefill(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        """Feed the prompts (one right-padded block); return the logits ``(B, V)`` after each prompt's last
        token."""
        ids, lengths = pad_right(prompts)
        return last_real(self.feed(ids, lengths), lengths)

    def rollback(self, n_drop: torch.Tensor | int) -> None:
        """Drop each sequence's last ``n_drop[b]`` tokens from the KV cache and the N-gram cache (the N-gram
        cache can drop only tokens of the last step)."""
        self.kv.rollback(n_drop)
        if self.ngrams is not None:
            self.ngrams.rollback(n_drop)


def decode_forward(decoder: Decoder, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Feed ``ids (B, T)``, every token real: the N-gram Cache's row ids of the new tokens, then the cached forward.
    Returns the logits ``(B, T, V)`` and the row ids by role. :meth:`Decoder.feed` without padding, written for
    tracing: no host reads but the KV cache's capacity check (off while a CUDA graph captures the step)."""
    rows = decoder.ngrams.step(ids) if decoder.ngrams is not None else {}
    logits = decoder.model.forward_cached(ids, decoder.kv, plain_embedding=decoder.plain_embedding, **rows)
    return logits, rows


DecodeForward = Callable[[Decoder, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
_COMPILED: list[DecodeForward] = []


def compiled_decode_forward() -> DecodeForward:
    """:func:`decode_forward` under ``torch.compile`` (fixed shapes: one compilation per batch shape and decoder
    kind). Fusing the step's many small operations (the norms' and rotary embedding's dtype casts, the routing's
    index arithmetic) is what cuts a decode step's kernel count; replayed from a CUDA graph, each kernel left is
    a node of fixed cost. Built once per process."""
    if not _COMPILED:
        # Dynamo traces through the N-gram hash's lru_cache'd constant tensors and warns that it ignores the cache;
        # they are constants of a frozen hash plan, so tracing the body gives the same values
        warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`")
        _COMPILED.append(torch.compile(decode_forward, dynamic=False))
    return _COMPILED[0]


@torch.no_grad()
def generate(model: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int, *, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, max_new_tokens)`` tokens after each prompt, one decode step per token (greedy when
    ``temperature == 0``). Generation runs past EOS: the N-gram cache starts a new document there."""
    longest = max(p.numel() for p in prompts)
    decoder = Decoder(model, len(prompts), longest + max_new_tokens)
    token = choose(decoder.prefill(prompts), temperature, generator)  # (B,)
    out = [token]
    for _ in range(max_new_tokens - 1):
        token = choose(decoder.feed(token.unsqueeze(1))[:, 0], temperature, generator)
        out.append(token)
    return torch.stack(out, dim=1)


__all__ = ["Decoder", "choose", "compiled_decode_forward", "decode_forward", "generate", "last_real",
           "pad_right", "probabilities"]
