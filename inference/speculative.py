"""Speculative decoding (paper section 4): a cheap draft proposes ``k`` tokens, the target checks them in one pass.

One round, for every sequence of the batch at once (``y`` = the last token emitted, not yet fed to the target)::

    draft:   feed y (and d_k of the last round if it was accepted), then d_1..d_{k-1} one per step;
             d_i ~ q_i (or argmax q_i)                                   k draft steps
    target:  feed [y, d_1, ..., d_k] in one step -> p_1 .. p_{k+1}        one verification pass
    accept:  the first m drafts (greedy: d_i == argmax p_i; sampling: u_i < p_i(d_i) / q_i(d_i))
    emit:    d_1..d_m, then y' = argmax p_{m+1}, or y' ~ norm(max(0, p_{m+1} - q_{m+1})) (p_{k+1} when m = k)
    roll back both caches: the target drops d_{m+1}..d_k (KV cache and N-gram cache), the draft what it fed
             past d_m

Sequences run ahead of each other (each round emits 1 to k+1 tokens per sequence); one that has its tokens
rides along until the slowest is done, and everything it feeds is rolled back. A sequence ends with at most
``max_new_tokens + k`` tokens emitted (all ``k`` drafts and the bonus token accepted in a round begun one short),
of which the target holds all but the last and then feeds ``k + 1`` more in a round, so the caches need
``prompt + max_new_tokens + 2k`` slots (the draft, holding all but its one or two pending tokens, no more).

The sampling rule (Leviathan et al. 2023; Chen et al. 2023) leaves the target distribution unchanged: every emitted
token is distributed as the target's next-token distribution given the tokens before it. Greedy speculative
decoding emits exactly the tokens of greedy decoding.

The draft reads a plain token embedding and never looks up N-gram tables: either a small draft model, or the
target's own trunk reading ``finish(E0(t))`` in place of its N-gram (and per-layer N-gram) embeddings
(``draft=None``). The target hashes the new tokens once, in the verification pass; the N-gram rows (and keys) of the
accepted tokens stay in its caches and are never recomputed.

``compile=True`` runs the feeds of fixed shape (the draft's single tokens, the verification pass) through
:func:`~embscale.inference.decode.compiled_decode_forward`; the draft's first feed of a round (one or two pending
tokens, padded) and the rollbacks stay eager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from embscale.inference.decode import Decoder, choose, compiled_decode_forward, last_real, probabilities


@dataclass
class SpeculativeStats:
    """Counts over a whole generation (every sequence of the batch, every round)."""

    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted by the target

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def accept_greedy(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_logits (B, k+1, V)``, ``drafts (B, k)`` -> ``(accepted (B,), next_token (B,))``: the longest prefix
    of drafts equal to the target's argmax, and the target's argmax after it."""
    best = target_logits.argmax(dim=-1)  # (B, k+1)
    k = drafts.shape[1]
    accepted = (best[:, :k] == drafts).long().cumprod(dim=1).sum(dim=1)  # (B,)
    return accepted, best.gather(1, accepted.unsqueeze(1)).squeeze(1)


def accept_sampling(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule. ``p (B, k+1, V)`` target probabilities, ``q (B, k, V)`` the draft's, ``drafts (B, k)``
    sampled from ``q`` -> ``(accepted (B,), next_token (B,))``.

    Draft ``i`` is accepted when ``u_i < p_i(d_i) / q_i(d_i)`` (``u_i`` uniform) and every earlier one was; the
    token after the accepted ones is drawn from ``max(0, p - q)`` renormalised at the first rejection, or from
    ``p_{k+1}`` when all ``k`` were accepted.
    """
    B, k = drafts.shape
    p_draft = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k)
    q_draft = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k), > 0: the drafts were drawn from q
    u = torch.rand(B, k, generator=generator, device=p.device, dtype=p.dtype)
    accepted = (u * q_draft < p_draft).long().cumprod(dim=1).sum(dim=1)  # (B,)
    rows = torch.arange(B, device=p.device)
    q_padded = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)  # q_{k+1} = 0: residual = p_{k+1}
    residual = (p[rows, accepted] - q_padded[rows, accepted]).clamp(min=0)  # (B, V)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q there: a rejection cannot happen; keep p
    residual = torch.where(empty, p[rows, accepted], residual)
    next_token = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator).squeeze(1)
    return accepted, next_token


def _feeder(compile: bool) -> Callable[[Decoder, torch.Tensor], torch.Tensor]:
    """``feed(decoder, ids)`` of all-real tokens: :meth:`Decoder.feed`, or the compiled step (keeping the step's
    N-gram row ids in ``decoder.last_rows`` as ``feed`` does)."""
    if not compile:
        return lambda decoder, ids: decoder.feed(ids)
    forward = compiled_decode_forward()

    def feed(decoder: Decoder, ids: torch.Tensor) -> torch.Tensor:
        logits, decoder.last_rows = forward(decoder, ids)
        return logits

    return feed


@torch.no_grad()
def speculative_generate(target: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int, *, k: int = 4,
                         draft: nn.Module | None = None, temperature: float = 0.0,
                         generator: torch.Generator | None = None,
                         on_verify: Callable[[], None] | None = None,
                         on_feed: Callable[[str, Decoder, torch.Tensor], None] | None = None,
                         compile: bool = False) -> tuple[torch.Tensor, SpeculativeStats]:
    """``(B, max_new_tokens)`` tokens after each prompt and the round counts, ``k`` draft tokens per round.

    ``draft``: a model sharing the target's vocabulary, read with its plain token embedding; None: the target's
    own trunk with ``finish(E0(t))`` for its N-gram embeddings. ``temperature == 0``: greedy (the tokens of
    :func:`embscale.inference.decode.generate`); otherwise sampling with the rejection rule. ``on_verify`` is
    called right after each verification pass (a benchmark reads the MoE layers' loads of that pass then);
    ``on_feed(role, decoder, ids)`` right after every feed of a round, ``role`` ``draft`` or ``verify`` (a
    benchmark counts the bytes each one read). ``compile``: the fixed-shape feeds compiled (module docstring).
    """
    if k < 1:
        raise ValueError(f"k: need at least one draft token per round, got {k}")
    B = len(prompts)
    capacity = max(p.numel() for p in prompts) + max_new_tokens + 2 * k  # see the module docstring
    verifier = Decoder(target, B, capacity)
    drafter = Decoder(draft if draft is not None else target, B, capacity, plain_embedding=True)
    stats = SpeculativeStats()
    feed = _feeder(compile)

    token = choose(verifier.prefill(prompts), temperature, generator)  # y: (B,), emitted, fed to neither yet
    drafter.prefill(prompts)
    device = token.device
    pending = torch.stack((token, torch.zeros_like(token)), dim=1)  # (B, 2): what the draft has not fed yet
    pending_n = torch.ones(B, dtype=torch.int64, device=device)
    emitted: list[list[int]] = [[int(t)] for t in token]

    while min(len(e) for e in emitted) < max_new_tokens:
        # a finished sequence rides along (the batch has one shape) but everything it feeds is rolled back
        done = torch.tensor([len(e) >= max_new_tokens for e in emitted], device=device)
        # k draft steps: the first feeds the pending tokens, the next ones feed d_1 .. d_{k-1}
        q_logits = last_real(drafter.feed(pending, pending_n), pending_n)  # (B, V)
        if on_feed is not None:
            on_feed("draft", drafter, pending)
        drafts, q_steps = [], []
        for i in range(k):
            if i > 0:
                q_logits = feed(drafter, drafts[-1].unsqueeze(1))[:, 0]
                if on_feed is not None:
                    on_feed("draft", drafter, drafts[-1].unsqueeze(1))
            q_steps.append(q_logits)
            drafts.append(choose(q_logits, temperature, generator))
        draft_ids = torch.stack(drafts, dim=1)  # (B, k)

        # one verification pass over [y, d_1 .. d_k]
        verify_ids = torch.cat((token.unsqueeze(1), draft_ids), dim=1)
        p_logits = feed(verifier, verify_ids)  # (B, k+1, V)
        if on_feed is not None:
            on_feed("verify", verifier, verify_ids)
        if on_verify is not None:
            on_verify()
        if temperature == 0:
            accepted, next_token = accept_greedy(p_logits, draft_ids)
        else:
            p = probabilities(p_logits, temperature)
            q = probabilities(torch.stack(q_steps, dim=1), temperature)
            accepted, next_token = accept_sampling(p, q.to(p.dtype), draft_ids, generator)

        # roll back what was rejected: the target fed y, d_1..d_k; the draft the pending tokens, d_1..d_{k-1}
        verifier.rollback(torch.where(done, k + 1, k - accepted))
        drafter.rollback(torch.where(done, pending_n + k - 1, (k - 1) - accepted.clamp(max=k - 1)))
        all_taken = (accepted == k) & ~done  # the draft never fed d_k: it goes first next round
        token = torch.where(done, token, next_token)
        pending = torch.stack((torch.where(all_taken, draft_ids[:, -1], token), token), dim=1)
        pending_n = torch.where(done, pending_n, 1 + all_taken.long())

        active = int((~done).sum())
        stats.rounds += 1
        stats.drafted += active * k
        stats.accepted += int(accepted[~done].sum())
        for b, (n, row) in enumerate(zip(accepted.tolist(), draft_ids.tolist(), strict=True)):
            if not done[b]:
                emitted[b].extend(row[:n] + [int(token[b])])

    return torch.tensor([e[:max_new_tokens] for e in emitted], dtype=torch.int64, device=device), stats


__all__ = ["SpeculativeStats", "accept_greedy", "accept_sampling", "speculative_generate"]
