"""The N-gram Cache (paper section 4): each sequence's look-back for the hashed N-gram Embedding, on the device.

Training hashes whole sequences (:func:`embscale.models.ngram.ngram_context`): entry ``j`` of token ``t_i``'s
context is ``t_{i-j}``, or 0 where ``j`` reaches before the sequence start or before the token's document start.
A document starts after every EOS: the first token after an EOS never sees the EOS or anything before it, while
the EOS itself, as the current token, keeps its full look-back. A decode step sees only its new tokens, so the
cache keeps, per sequence, what the *next* token will see::

    history (B, N-1) int64:  history[b, j-1] = t_{i-j} as token i = (next token) sees it, 0 where masked

Feeding token ``t``: its context is ``[t, history]``; afterwards ``history = [t, history[:-1]]``, or all zeros
when ``t`` is EOS (the next token starts a document). A masked entry and a real token id 0 hash alike (a zero adds
nothing to the polynomial), so zeros need no separate mask. A step of ``T`` tokens (``n_new[b]`` real) builds
their contexts from ``history`` and the step's own tokens, with the EOS rule applied inside the step too, and
hashes only those (:func:`embscale.models.ngram.context_row_ids`): the same rows, bitwise, as hashing the whole
sequence.

Rollback (rejected draft tokens): the cache keeps the last step's history and contexts, so the last ``j`` tokens
of that step can be dropped (``0 <= j <= n_new[b]``); the history becomes the one after the last kept token,
bitwise what feeding only the kept tokens would have left.
"""

from __future__ import annotations

import torch
from torch import nn

from embscale.models.ngram import context_row_ids, lookback_lengths


class NgramCache:
    """The look-back of one hash spec (``module``: an ``NgramEmbedding`` whose ``plan`` and ``eos_token_id``
    define the rows) for a batch of ``batch`` sequences."""

    def __init__(self, module: nn.Module, batch: int, device: torch.device | str | None = None):
        self.plan = module.plan
        self.eos_token_id = module.eos_token_id
        self.order = self.plan.max_order  # N
        self.history = torch.zeros(batch, self.order - 1, dtype=torch.int64, device=device)  # (B, N-1)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def contexts(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, N)`` contexts of a step's tokens ``ids (B, T)`` after the cached history (nothing updated).

        Window ``w = [history reversed | ids]`` (oldest first); token ``i`` of the step reads
        ``w[N-1+i-j]`` for ``j = 0..N-1``, masked to 0 where ``j`` passes an EOS inside the step (the history
        is masked already).
        """
        B, T = ids.shape
        N = self.order
        ids = ids.long()
        window = torch.cat((self.history.flip(-1), ids), dim=1)  # (B, N-1+T)
        index = (N - 1) + torch.arange(T, device=ids.device).unsqueeze(1) - torch.arange(N, device=ids.device)
        context = window[:, index]  # (B, T, N): context[b, i, j] = t_{i-j}
        in_step = lookback_lengths(ids, self.eos_token_id)  # (B, T): look-back inside the step
        reset = in_step < torch.arange(T, device=ids.device)  # an EOS earlier in the step: document restarted
        lookback = torch.where(reset, in_step, N)  # no reset: the history's own masking holds
        return context.masked_fill(torch.arange(N, device=ids.device) > lookback.unsqueeze(-1), 0)

    def step(self, ids: torch.Tensor, n_new: torch.Tensor | None = None) -> torch.Tensor:
        """Row ids ``(B, T, S)`` of a step's tokens (the padding's rows are meaningless) and the history moved
        past the ``n_new[b]`` real ones (all ``T`` when None)."""
        B, T = ids.shape
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.int64, device=ids.device)
        context = self.contexts(ids)
        self._last = (self.history, context, ids.long(), n_new)
        self.history = self._history_after(n_new)
        return context_row_ids(context, self.plan)

    def _history_after(self, kept: torch.Tensor) -> torch.Tensor:
        """The history after the first ``kept[b]`` tokens of the last step (``kept = 0``: before it)."""
        before, context, ids, _ = self._last
        B, T, N = context.shape
        last = (kept - 1).clamp(min=0)  # (B,)
        rows = torch.arange(B, device=ids.device)
        after = context[rows, last, : N - 1]  # (B, N-1): the last kept token and what it saw
        if self.eos_token_id is not None:
            after = after.masked_fill((ids[rows, last] == self.eos_token_id).unsqueeze(-1), 0)
        return torch.where((kept > 0).unsqueeze(-1), after, before)

    def rollback(self, n_drop: torch.Tensor | int) -> None:
        """Forget the last ``n_drop[b]`` tokens of the last step (rejected drafts)."""
        if self._last is None:
            raise RuntimeError("rollback: no step to roll back")
        n_new = self._last[3]
        n_drop = torch.as_tensor(n_drop, dtype=torch.int64, device=n_new.device).expand_as(n_new)
        if bool((n_drop < 0).any()) or bool((n_drop > n_new).any()):
            raise ValueError("rollback: the N-gram cache can drop only tokens of its last step")
        kept = n_new - n_drop
        self.history = self._history_after(kept)
        self._last = (self._last[0], self._last[1], self._last[2], kept)


class NgramCaches:
    """One :class:`NgramCache` per hash spec of a model (``model.ngram_specs()``: ``embed`` and/or
    ``per_layer``), stepped and rolled back together; :meth:`step` returns the row-id keywords of
    ``model.forward_cached``."""

    def __init__(self, model: nn.Module, batch: int, device: torch.device | str | None = None):
        self.caches = {role: NgramCache(module, batch, device) for role, module in model.ngram_specs().items()}

    def step(self, ids: torch.Tensor, n_new: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {f"{role}_rows": cache.step(ids, n_new) for role, cache in self.caches.items()}

    def rollback(self, n_drop: torch.Tensor | int) -> None:
        for cache in self.caches.values():
            cache.rollback(n_drop)


__all__ = ["NgramCache", "NgramCaches"]
