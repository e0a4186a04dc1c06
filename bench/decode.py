"""Decoding speed of one model over batch sizes (``embscale decode-bench``; paper section 4, Fig. 8a).

For each batch size ``B`` (random prompts of ``prompt_len`` tokens, ``new_tokens`` generated greedily):

- ``decode``: one token per sequence per step through the KV cache and the N-gram Cache;
- ``speculative`` (``k > 0``): ``k`` draft steps and one verification pass of ``B * (k + 1)`` tokens per round,
  the draft being a given small model or the target's own trunk on a plain token embedding.

Each row has: ``tokens_per_s`` (generated tokens over the wall time of the whole generation, prefill included),
``ms_per_step`` (the median decode step, or the mean speculative round), ``experts_per_step`` (distinct real
experts that the target's step, or verification pass, sent at least one token to, zero experts excluded, mean
over MoE layers and steps; NaN without routed experts), ``ngram_share`` (hashing that step's new tokens with the
N-gram Cache plus the N-gram embedding lookups of NE and PLNE, timed alone on the same shapes, over the step
time; 0 without N-gram tables) and ``acceptance_rate`` (speculative only).

Weights are random (``seed``) unless the caller loads some: speeds and expert counts are those of the shapes, but
an acceptance rate of random weights says nothing about a trained pair. Times come from ``time.perf_counter``
with the device synchronised around each measured piece.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from embscale.base.progress import Progress
from embscale.inference.decode import Decoder
from embscale.inference.ngram_cache import NgramCaches
from embscale.inference.speculative import speculative_generate

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class DecodeRow:
    mode: str  # decode | speculative
    batch: int
    tokens_per_s: float
    ms_per_step: float
    tokens_per_step: int  # tokens the target processes per step (B, or B * (k + 1) when verifying)
    experts_per_step: float
    ngram_share: float
    acceptance_rate: float

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def distinct_experts(model: nn.Module) -> float:
    """Of the model's last forward: real experts with at least one token, mean over MoE layers (NaN without)."""
    layers = model.moe_layers()
    if not layers:
        return float("nan")
    return sum(int((moe.last_counts[: moe.n_experts] > 0).sum()) for moe in layers) / len(layers)


@torch.no_grad()
def ngram_seconds(model: nn.Module, batch: int, width: int, reps: int = 5) -> float:
    """Median time to hash ``batch x width`` new tokens with the N-gram Cache and look up every N-gram embedding
    (NE and each PLNE slot) for them; 0 for a model without N-gram tables."""
    specs = model.ngram_specs()
    if not specs:
        return 0.0
    device = model.norm.weight.device
    caches = NgramCaches(model, batch, device)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, width), device=device)
    per_layer = [m for m in (model.per_layer.values() if model.per_layer is not None else ())
                 if hasattr(m, "row_ids")]
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        rows = caches.step(ids)
        if "embed_rows" in rows:
            model.embed(ids, rows["embed_rows"])
        for module in per_layer:
            module(ids, rows["per_layer_rows"])
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_decode(model: nn.Module, batch: int, prompt_len: int, new_tokens: int,
                   generator: torch.Generator) -> DecodeRow:
    device = model.norm.weight.device
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=generator).to(device)
    _sync(device)
    start = time.perf_counter()
    decoder = Decoder(model, batch, prompt_len + new_tokens)
    token = decoder.prefill(list(prompts)).argmax(-1)
    steps, experts = [], []
    for _ in range(new_tokens - 1):
        _sync(device)
        t0 = time.perf_counter()
        token = decoder.feed(token.unsqueeze(1))[:, 0].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        experts.append(distinct_experts(model))
    total = time.perf_counter() - start
    step = statistics.median(steps) if steps else float("nan")
    return DecodeRow(mode="decode", batch=batch, tokens_per_s=batch * new_tokens / total, ms_per_step=1e3 * step,
                     tokens_per_step=batch, experts_per_step=_mean(experts),
                     ngram_share=ngram_seconds(model, batch, 1) / step if steps else float("nan"),
                     acceptance_rate=float("nan"))


@torch.no_grad()
def measure_speculative(model: nn.Module, draft: nn.Module | None, batch: int, prompt_len: int, new_tokens: int,
                        k: int, generator: torch.Generator) -> DecodeRow:
    device = model.norm.weight.device
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=generator).to(device)
    experts: list[float] = []
    _sync(device)
    start = time.perf_counter()
    _, stats = speculative_generate(model, list(prompts), new_tokens, k=k, draft=draft,
                                    on_verify=lambda: experts.append(distinct_experts(model)))
    _sync(device)
    total = time.perf_counter() - start
    round_s = total / max(stats.rounds, 1)
    return DecodeRow(mode="speculative", batch=batch, tokens_per_s=batch * new_tokens / total,
                     ms_per_step=1e3 * round_s, tokens_per_step=batch * (k + 1), experts_per_step=_mean(experts),
                     ngram_share=ngram_seconds(model, batch, k + 1) / round_s,
                     acceptance_rate=stats.acceptance_rate)


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def run_decode_bench(model: nn.Module, *, batch_sizes: tuple[int, ...] = BATCH_SIZES, prompt_len: int = 16,
                     new_tokens: int = 16, k: int = 4, draft: nn.Module | None = None, seed: int = 0,
                     show_progress: bool = True) -> list[DecodeRow]:
    """Every row (``decode`` for each batch size, then ``speculative`` when ``k > 0``)."""
    model.eval()
    if draft is not None:
        draft.eval()
    generator = torch.Generator().manual_seed(seed)
    modes = ["decode"] + (["speculative"] if k > 0 else [])
    rows = []
    progress = Progress(len(batch_sizes) * len(modes), "decode-bench", unit="run",
                        mode=None if show_progress else "off")
    with progress:
        for mode in modes:
            for batch in batch_sizes:
                if mode == "decode":
                    rows.append(measure_decode(model, batch, prompt_len, new_tokens, generator))
                else:
                    rows.append(measure_speculative(model, draft, batch, prompt_len, new_tokens, k, generator))
                progress.update(1, mode=mode, batch=batch, tokens_per_s=round(rows[-1].tokens_per_s, 1))
    return rows


__all__ = ["BATCH_SIZES", "DecodeRow", "distinct_experts", "measure_decode", "measure_speculative",
           "ngram_seconds", "run_decode_bench"]
