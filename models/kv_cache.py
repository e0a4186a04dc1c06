"""The key/value cache of a decoding batch: what each attention module keeps of the tokens already seen.

Layout ("right-padded", ragged): sequence ``b`` of the batch holds its tokens in slots ``0 .. lengths[b]-1`` of
every buffer, in order, so a token's slot *is* its position (the rotary angle) and no sequence needs a left pad.
A step feeds ``T`` new tokens per sequence, of which the first ``n_new[b]`` are real (prompts of unequal lengths
are one right-padded ``(B, T)`` block); token ``t`` of sequence ``b`` goes to slot ``lengths[b] + t`` and may
attend to slots ``0 .. lengths[b] + t`` (:class:`CacheStep`). Padding tokens are computed (their outputs are
ignored) but never written: their writes go to a scratch slot past the capacity, which is cleared after the step.

Invariant: every slot at or past ``lengths[b]`` holds zeros. :meth:`KVCache.rollback` restores it, so a cache
that fed ``j`` tokens and rolled them back is bitwise the cache that never fed them.

What each attention module keeps (:meth:`bytes_per_token`):

- multi-head (and grouped-query) attention: the rotated keys and the values, ``2 * n_kv_heads * head_dim``
  numbers per token per attention module;
- Multi-head Latent Attention (DeepSeek-V2, LongCat-Flash): the normalised latent ``c_kv`` (``kv_lora_rank``)
  and the rotated shared key ``k_rope`` (``qk_rope_head_dim``), ``kv_lora_rank + qk_rope_head_dim`` numbers;
  the per-head keys and values are expanded from the latent at every step (the plain form; absorbing ``W_kvb``
  into the query and output projections is a speed-up with the same result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheStep:
    """Where one step's ``T`` new tokens go (shared by every attention module of the model)."""

    positions: torch.Tensor  # (B, T) int64: slot (= position) of each new token
    valid: torch.Tensor  # (B, T) bool: the first n_new[b] tokens of each row are real
    write_slots: torch.Tensor  # (B, T) int64: positions, or the scratch slot (= capacity) for padding
    attn_mask: torch.Tensor  # (B, 1, T, C) bool: key slot j is visible to new token t iff j <= positions[b, t]


class AttentionCache:
    """One attention module's buffers, each ``(B, capacity + 1, *shape)`` (the last slot is scratch)."""

    def __init__(self, owner: KVCache, shapes: dict[str, tuple[int, ...]], batch: int, capacity: int,
                 device: torch.device | str | None, dtype: torch.dtype):
        self.owner = owner
        self.buffers = {name: torch.zeros(batch, capacity + 1, *shape, device=device, dtype=dtype)
                        for name, shape in shapes.items()}

    @property
    def step(self) -> CacheStep:
        return self.owner.step

    def append(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write each ``new[name]`` ``(B, T, *shape)`` at the step's slots; return every buffer
        ``(B, capacity, *shape)``, this step's tokens included (read them with ``step.attn_mask``)."""
        step = self.owner.step
        rows = torch.arange(step.positions.shape[0], device=step.positions.device).unsqueeze(1)  # (B, 1)
        full = {}
        for name, values in new.items():
            buffer = self.buffers[name]
            buffer.index_put_((rows.expand_as(step.write_slots), step.write_slots), values.to(buffer.dtype))
            full[name] = buffer[:, :-1]
        return full

    def clear_scratch(self) -> None:
        for buffer in self.buffers.values():
            buffer[:, -1].zero_()

    def truncate(self, lengths: torch.Tensor) -> None:
        """Zero every slot at or past ``lengths[b]``."""
        slots = torch.arange(next(iter(self.buffers.values())).shape[1], device=lengths.device)
        stale = slots.unsqueeze(0) >= lengths.unsqueeze(1)  # (B, capacity + 1)
        for buffer in self.buffers.values():
            buffer.masked_fill_(stale.view(*stale.shape, *([1] * (buffer.ndim - 2))), 0)

    def bytes_per_token(self) -> int:
        return sum(b[0, 0].numel() * b.element_size() for b in self.buffers.values())


class KVCache:
    """Every attention module's :class:`AttentionCache`, ``layers[i][j]`` for attention ``j`` of layer ``i``,
    and the shared ``lengths (B,)`` int64 (tokens held per sequence).

    Use: :meth:`begin` a step, run the model's cached forward (each attention :meth:`AttentionCache.append`-s),
    :meth:`commit`; :meth:`rollback` drops each sequence's last tokens. The model's ``new_cache`` builds one.
    """

    def __init__(self, shapes: list[list[dict[str, tuple[int, ...]]]], batch: int, capacity: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.batch = batch
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.layers = [[AttentionCache(self, s, batch, capacity, device, dtype) for s in layer] for layer in shapes]
        self._step: CacheStep | None = None
        # begin()'s capacity check reads the lengths on the host; a step captured in a CUDA graph must not, so
        # its runner turns the check off and keeps to the capacity itself (embscale.inference.cuda_graph)
        self.check_capacity = True

    @property
    def step(self) -> CacheStep:
        if self._step is None:
            raise RuntimeError("no step in progress: call KVCache.begin(n_new, T) before the cached forward")
        return self._step

    def all(self) -> list[AttentionCache]:
        return [cache for layer in self.layers for cache in layer]

    def begin(self, n_new: torch.Tensor, width: int) -> CacheStep:
        """Start a step that feeds ``width`` tokens per sequence, ``n_new (B,)`` of them real; raises
        ``ValueError`` when a sequence would outgrow the capacity."""
        if self._step is not None:
            raise RuntimeError("a step is already in progress (commit it first)")
        if self.check_capacity and int((self.lengths + n_new).max()) > self.capacity:  # one host sync per step
            raise ValueError(f"KV cache capacity {self.capacity} exceeded")
        offsets = torch.arange(width, device=self.lengths.device)
        positions = self.lengths.unsqueeze(1) + offsets  # (B, T)
        valid = offsets.unsqueeze(0) < n_new.unsqueeze(1)  # (B, T)
        write_slots = torch.where(valid, positions, self.capacity)
        slots = torch.arange(self.capacity, device=self.lengths.device)
        attn_mask = (slots.view(1, 1, 1, -1) <= positions.view(*positions.shape, 1).unsqueeze(1))  # (B,1,T,C)
        self._step = CacheStep(positions=positions, valid=valid, write_slots=write_slots, attn_mask=attn_mask)
        return self._step

    def commit(self, n_new: torch.Tensor) -> None:
        """End the step: the sequences now hold ``lengths + n_new`` tokens."""
        for cache in self.all():
            cache.clear_scratch()
        self.lengths += n_new
        self._step = None

    def rollback(self, n_drop: torch.Tensor | int) -> None:
        """Forget each sequence's last ``n_drop[b]`` tokens (rejected draft tokens): the cache becomes bitwise
        what it was before they were fed."""
        n_drop = torch.as_tensor(n_drop, dtype=torch.int64, device=self.lengths.device).expand_as(self.lengths)
        if bool((n_drop < 0).any()) or bool((n_drop > self.lengths).any()):
            raise ValueError("rollback: n_drop must lie in [0, lengths]")
        self.lengths -= n_drop
        for cache in self.all():
            cache.truncate(self.lengths)

    def bytes_per_token(self) -> int:
        """Bytes the cache keeps per token of one sequence, all layers and attention modules together."""
        return sum(cache.bytes_per_token() for cache in self.all())


__all__ = ["AttentionCache", "CacheStep", "KVCache"]
