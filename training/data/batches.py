"""Training and evaluation batches over a token shard.

Training sequences are windows of ``seq_len + 1`` tokens starting at multiples of ``seq_len`` (inputs are the
first ``seq_len`` tokens, targets the last). Each epoch visits every window once in an order drawn from
``(seed, epoch)``; an optimizer step takes the next ``batch_tokens / seq_len`` windows of that order (whatever the
world size) and rank ``r`` of ``W`` takes the ``r``-th contiguous ``1/W`` of them. The position (epoch, cursor) is
the whole state, so resuming and changing the number of ranks keep the data. Evaluation takes
``eval_tokens / seq_len`` windows evenly spaced over the validation split, in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from embscale.base.errors import ConfigError, UserError


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # (n, seq_len + 1)
    block = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return block[:, :-1], block[:, 1:]


class TrainBatches:
    """Training batches of one rank: an optimizer step's micro-batches at a time, in a seeded order.

    ``state_dict()`` is the position (plain ints); ``load_state_dict`` restores it.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, sequences_per_step: int, micro_batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than seq_len + 1 = "
                              f"{seq_len + 1}")
        if sequences_per_step % (micro_batch_size * world_size):
            raise ConfigError("training.batch_tokens", "does not divide into micro-batches on every rank")
        self.sequences_per_step = sequences_per_step
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def _take(self, count: int) -> np.ndarray:
        taken = []
        while count > 0:
            order = self._epoch_order(self.epoch)
            chunk = order[self.cursor:self.cursor + count]
            taken.append(chunk)
            count -= len(chunk)
            self.cursor += len(chunk)
            if self.cursor >= self.n_windows:
                self.epoch += 1
                self.cursor = 0
        return np.concatenate(taken)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches ``(inputs, targets)``, each ``(micro_batch_size, seq_len)``."""
        starts = self._take(self.sequences_per_step)
        per_rank = self.sequences_per_step // self.world_size
        mine = starts[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [_windows(self.tokens, mine[i:i + self.micro_batch_size], self.seq_len)
                for i in range(0, per_rank, self.micro_batch_size)]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / self.n_windows

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "n_windows", "seq_len"):
            if int(state[key]) != getattr(self, key):
                raise UserError(f"cannot resume: the checkpoint's data position has {key} = {state[key]}, "
                                  f"this run has {getattr(self, key)} (the data or config changed)")
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])


def eval_starts(n_tokens: int, seq_len: int, eval_tokens: int) -> np.ndarray:
    """Window indices for evaluation: ``ceil(eval_tokens / seq_len)`` windows evenly spaced (or all)."""
    available = (n_tokens - 1) // seq_len
    wanted = min(available, math.ceil(eval_tokens / seq_len))
    if wanted <= 0:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.linspace(0, available - 1, wanted).round().astype(np.int64))


def eval_batches(tokens: np.ndarray, seq_len: int, eval_tokens: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of a validation split's fixed evaluation windows, ``batch_size`` at a time."""
    starts = eval_starts(len(tokens), seq_len, eval_tokens)[rank::world_size]
    for i in range(0, len(starts), batch_size):
        yield _windows(tokens, starts[i:i + batch_size], seq_len)


__all__ = ["TrainBatches", "eval_batches", "eval_starts"]
