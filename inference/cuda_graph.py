"""A decode step of fixed shape captured once in a CUDA graph and replayed (``embscale decode-bench --cuda-graph``).

A decode step launches hundreds of small kernels; at small batches the GPU waits on the launches, not on memory.
:class:`GraphedDecodeStep` captures :meth:`Decoder.feed` of ``width`` tokens per sequence (all real) for one
:class:`~embscale.inference.decode.Decoder` in a ``torch.cuda.CUDAGraph`` and replays it each step:

- static buffers: the input ids ``(B, width)``; the outputs (logits ``(B, width, V)``, the greedy next token
  ``(B,)``, the N-gram row ids of the step) are the tensors the capture produced, overwritten by every replay;
- the caches are the decoder's own, preallocated: the KV cache is updated in place by the step already; the
  N-gram Cache moves its history to a new tensor each step, so the captured step copies it back into the
  buffer the next replay reads;
- the KV cache's capacity check reads the lengths on the host, which a capture forbids: it is off during the
  capture and this class keeps the count on the host instead (one read of the lengths when it is built).

Warm-up (compilation, hash constants, library handles) runs on a spare decoder of the same shapes, so the
decoder's caches are as they were until the first replay. With ``compile=True`` the captured step is
:func:`~embscale.inference.decode.compiled_decode_forward`: compiled during the warm-up (with the capacity check
off there too, so that the capture meets the same compiled code and compiles nothing), then captured. Graphed
steps cannot be rolled back (speculative rounds stay eager). Mixture-of-experts layers need ``bfloat16`` on CUDA:
in other dtypes the grouped GEMM reads the expert offsets on the host
(:func:`embscale.kernels.moe_dispatch.grouped_linear`) and the capture fails.
"""

from __future__ import annotations

import torch

from embscale.inference.decode import Decoder, compiled_decode_forward, decode_forward


class GraphedDecodeStep:
    """Replay ``decoder.feed(ids)`` of ``(B, width)`` all-real tokens from one CUDA graph."""

    def __init__(self, decoder: Decoder, width: int = 1, warmup: int = 2, compile: bool = False):
        device = decoder.lengths.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the decoder is on {device}")
        self.decoder = decoder
        self.width = width
        batch, capacity = decoder.kv.batch, decoder.kv.capacity
        self.ids = torch.zeros(batch, width, dtype=torch.int64, device=device)
        self.longest = int(decoder.lengths.max())  # host-side count of the longest sequence
        self.forward = compiled_decode_forward() if compile else decode_forward

        spare = Decoder(decoder.model, batch, max(capacity, width), plain_embedding=decoder.plain_embedding)
        spare.kv.check_capacity = False  # as in the capture: the compiled step is the one captured
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(max(warmup, 3 if compile else 1)):  # compiled code settles by its third call
                self.forward(spare, self.ids)
                spare.rollback(width)
        torch.cuda.current_stream(device).wait_stream(stream)
        del spare

        caches = list(decoder.ngrams.caches.values()) if decoder.ngrams is not None else []
        self._histories = [cache.history for cache in caches]  # what every replay reads and writes back
        self.graph = torch.cuda.CUDAGraph()
        decoder.kv.check_capacity = False
        try:
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.logits, self.rows = self._step(caches)
                self.next_token = self.logits[:, -1].argmax(dim=-1)  # (B,): greedy, on the device
        finally:
            decoder.kv.check_capacity = True
            for cache, history in zip(caches, self._histories, strict=True):
                cache.history = history

    def _step(self, caches: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, rows = self.forward(self.decoder, self.ids)
        for cache, history in zip(caches, self._histories, strict=True):
            history.copy_(cache.history)
            cache.history = history
        return logits, rows

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids (B, width)``; returns the logits buffer ``(B, width, V)`` (overwritten by the next call;
        :attr:`next_token` holds the argmax of its last position)."""
        if self.longest + self.width > self.decoder.kv.capacity:
            raise ValueError(f"KV cache capacity {self.decoder.kv.capacity} exceeded")
        if ids.data_ptr() != self.ids.data_ptr():
            self.ids.copy_(ids)
        self.graph.replay()
        self.longest += self.width
        return self.logits


__all__ = ["GraphedDecodeStep"]
