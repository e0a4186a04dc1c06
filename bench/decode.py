"""Decoding speed of one model over batch sizes (``embscale decode-bench``; paper section 4, Fig. 8a).

For each batch size ``B`` (random prompts of ``prompt_len`` tokens, ``new_tokens`` generated greedily):

- ``decode``: one token per sequence per step through the KV cache and the N-gram Cache;
- ``speculative`` (``k > 0``): ``k`` draft steps and one verification pass of ``B * (k + 1)`` tokens per round,
  the draft being a given small model or the target's own trunk on a plain token embedding.

Each row has: ``tokens_per_s`` (generated tokens over the wall time of the whole generation, prefill included,
after an untimed warm-up generation of the same shapes; for ``decode`` the prefill and the steps, leaving out the
graph capture and the floor's counting between steps),
``ms_per_step`` (the median decode step, or the mean speculative round), ``experts_per_step`` (distinct real
experts that the target's step, or verification pass, sent at least one token to, zero experts excluded, mean
over MoE layers and steps; NaN without routed experts), ``ngram_share`` (hashing that step's new tokens with the
N-gram Cache plus the N-gram embedding lookups of NE and PLNE, timed alone on the same shapes, from a CUDA graph
when the step is, over the step time; 0 without N-gram tables) and ``acceptance_rate`` (speculative only).

The memory floor of a decode step: the bytes the step must read at least, over the device's
measured copy bandwidth (:func:`copy_bandwidth`). Counted per step (:class:`WeightLayout`), then averaged over
the steps:

- ``dense_bytes``: every parameter read whole by every step: attention, dense MLPs, norms, routers, shared
  experts, the N-gram projections, the LM head (a tied head reads the whole token table);
- ``expert_bytes``: the real experts the step routed at least one token to (zero experts excluded), in every
  MoE layer, times the bytes of one expert (gate, up and down matrices);
- ``ngram_row_bytes``: the distinct N-gram table rows the step gathered (NE and every PLNE table), times the
  row bytes; ``token_row_bytes``: the distinct token ids of the step times the row bytes of every untied table
  indexed by token id (E0, the PLE and PLNE token tables);
- ``kv_bytes``: the KV cache of every token the sequences hold after the step (the new one included), which the
  step's attention reads (this implementation reads the whole preallocated cache, masked: more than the floor).

``floor_ms`` is their sum over the bandwidth and ``floor_ratio`` = ``ms_per_step / floor_ms`` (1 would be a step
that only streams its bytes once at copy speed). Activations and the logits are not counted (small next to the
weights at decode batch sizes). A speculative row's floor is that of a round: the sum over its ``k`` draft feeds
(the draft reads its plain token embedding: no N-gram table or projection) and its verification pass, each
counted as above (the KV part: the draft's cache, then the target's); its ``ms_per_step`` is the mean round, the
prefill and the host's acceptance work included, timed in a run of its own (the counting run repeats the same
greedy rounds).

On CUDA the decode step is replayed from a CUDA graph (:mod:`embscale.inference.cuda_graph`) unless
``cuda_graph=False``; the speculative rounds run eagerly. ``compile=True`` compiles the decode step with
``torch.compile`` (:func:`~embscale.inference.decode.compiled_decode_forward`; before its capture when graphed):
the compilation happens in the untimed warm-up, and each row starts from an empty compile cache (one batch shape
per row: without the reset, more than eight shapes would exhaust Dynamo's recompile limit and fall back to eager);
a speculative row then compiles its rounds' fixed-shape feeds (the draft's single tokens, the verification pass).

Weights are random (``seed``) unless the caller loads some: speeds and expert counts are those of the shapes, but
an acceptance rate of random weights says nothing about a trained pair. Times come from ``time.perf_counter``
with the device synchronised around each measured piece.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from embscale.base.progress import Progress, log
from embscale.inference.decode import Decoder, compiled_decode_forward, decode_forward
from embscale.inference.ngram_cache import NgramCaches
from embscale.inference.speculative import speculative_generate

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FLOOR_PARTS = ("dense_bytes", "expert_bytes", "ngram_row_bytes", "token_row_bytes", "kv_bytes")


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
    cuda_graph: bool = False  # the step was replayed from a CUDA graph
    compiled: bool = False  # the step was compiled with torch.compile
    # the memory floor: mean bytes per step (or round) by part, and the time
    dense_bytes: float = math.nan
    expert_bytes: float = math.nan
    ngram_row_bytes: float = math.nan
    token_row_bytes: float = math.nan
    kv_bytes: float = math.nan
    floor_bytes: float = math.nan
    floor_ms: float = math.nan
    floor_ratio: float = math.nan  # ms_per_step / floor_ms

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, reps: int = 5) -> float:
    """Bytes per second the device moves in a large tensor copy: ``2 * nbytes`` (read and written) over the best
    of ``reps`` timed ``copy_`` calls (after one untimed). Default size 1 GiB on CUDA, 256 MiB elsewhere."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = math.inf
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        target.copy_(source)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


@dataclass
class WeightLayout:
    """What a decode step of ``model`` reads: the parameters read whole, the bytes of one expert per MoE layer,
    the row bytes of the tables indexed by token id and of the N-gram tables of each hash role, and the KV cache
    bytes per token (the module docstring says how each is counted)."""

    dense_bytes: int
    expert_bytes: list[int]  # per MoE layer: one real expert (gate, up, down)
    token_row_bytes: int  # one token id's row in every untied table indexed by token id
    ngram_row_bytes: dict[str, int] = field(default_factory=dict)  # role -> one row id's bytes over its tables
    kv_bytes_per_token: int = 0

    def step_bytes(self, model: nn.Module, ids: torch.Tensor, rows: dict[str, torch.Tensor],
                   tokens_held: int) -> dict[str, int]:
        """The floor's parts for a step that fed ``ids (B, T)`` with N-gram row ids ``rows`` (``{role}_rows``, as
        the N-gram Cache returns them), after which the sequences hold ``tokens_held`` tokens together; reads
        the experts touched from each MoE layer's ``last_counts``."""
        experts = sum(int((moe.last_counts[: moe.n_experts] > 0).sum()) * size
                      for moe, size in zip(model.moe_layers(), self.expert_bytes, strict=True))
        ngram = sum(int(torch.unique(rows[f"{role}_rows"]).numel()) * size
                    for role, size in self.ngram_row_bytes.items())
        tokens = int(torch.unique(ids).numel()) * self.token_row_bytes if self.token_row_bytes else 0
        return {"dense_bytes": self.dense_bytes, "expert_bytes": experts, "ngram_row_bytes": ngram,
                "token_row_bytes": tokens, "kv_bytes": tokens_held * self.kv_bytes_per_token}


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weight_layout(model: nn.Module, plain_embedding: bool = False) -> WeightLayout:
    """Sort ``model``'s parameters into read whole, per expert, per token id and per N-gram row.
    ``plain_embedding``: as a draft reading ``finish(E0(t))`` uses it: no N-gram table or projection is read."""
    from embscale.models.ngram import NgramEmbedding

    tied = model.lm_head is None  # the head reads the whole token table at every step
    gathered: set[int] = set()
    token_rows = 0
    ngram_rows: dict[str, int] = {}
    role_of = {id(module): role for role, module in model.ngram_specs().items()}
    embeddings = [("embed", model.embed)] + [("per_layer", m) for m in
                                             (model.per_layer.values() if model.per_layer is not None else ())]
    for role, module in embeddings:
        tables = [module.token.weight] if hasattr(module, "token") else [module.weight]
        if not (tied and role == "embed"):
            for table in tables:
                if id(table) not in gathered:
                    gathered.add(id(table))
                    token_rows += table.shape[1] * table.element_size()
        if isinstance(module, NgramEmbedding) and plain_embedding:
            gathered.update((id(module.tables.weight), id(module.projection.weight)))  # never read
        elif isinstance(module, NgramEmbedding):
            weight = module.tables.weight
            if id(weight) not in gathered:
                gathered.add(id(weight))
                key = role if role == "embed" else role_of.get(id(module), "per_layer")
                ngram_rows[key] = ngram_rows.get(key, 0) + weight.shape[1] * weight.element_size()
    experts = []
    for moe in model.moe_layers():
        gathered.update((id(moe.w_gate_up), id(moe.w_down)))
        experts.append(_bytes(moe.w_gate_up[0]) + _bytes(moe.w_down[0]))
    dense = sum(_bytes(p) for p in model.parameters() if id(p) not in gathered)
    return WeightLayout(dense_bytes=dense, expert_bytes=experts, token_row_bytes=token_rows,
                        ngram_row_bytes=ngram_rows, kv_bytes_per_token=model.new_cache(1, 1).bytes_per_token())


def distinct_experts(model: nn.Module) -> float:
    """Of the model's last forward: real experts with at least one token, mean over MoE layers (NaN without)."""
    layers = model.moe_layers()
    if not layers:
        return float("nan")
    return sum(int((moe.last_counts[: moe.n_experts] > 0).sum()) for moe in layers) / len(layers)


@torch.no_grad()
def ngram_seconds(model: nn.Module, batch: int, width: int, reps: int = 5, cuda_graph: bool = False) -> float:
    """Median time to hash ``batch x width`` new tokens with the N-gram Cache and look up every N-gram embedding
    (NE and each PLNE slot) for them; 0 for a model without N-gram tables. ``cuda_graph``: the piece is replayed
    from a CUDA graph of its own, as the decode step it is compared with (eager if the capture fails)."""
    specs = model.ngram_specs()
    if not specs:
        return 0.0
    device = model.norm.weight.device
    caches = NgramCaches(model, batch, device)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, width), device=device)
    per_layer = [m for m in (model.per_layer.values() if model.per_layer is not None else ())
                 if hasattr(m, "row_ids")]

    def lookups() -> None:
        rows = caches.step(ids)
        if "embed_rows" in rows:
            model.embed(ids, rows["embed_rows"])
        for module in per_layer:
            module(ids, rows["per_layer_rows"])

    run = lookups
    if cuda_graph and device.type == "cuda":
        try:
            lookups()  # warm-up (the caches' state is of no interest here: the same work every replay)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                lookups()
            run = graph.replay
        except Exception as exc:  # noqa: BLE001 - time the eager lookups instead
            log(f"decode-bench: the N-gram lookups could not be captured ({type(exc).__name__}: {exc}); timed "
                "eagerly")
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _EagerStep:
    """``Decoder.feed`` of one token per sequence (compiled with ``compile=True``), keeping the step's N-gram row
    ids (for the floor)."""

    def __init__(self, decoder: Decoder, compile: bool = False):
        self.decoder = decoder
        self.forward = compiled_decode_forward() if compile else decode_forward
        self.rows: dict[str, torch.Tensor] = {}
        self.next_token: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits, self.rows = self.forward(self.decoder, ids)
        self.next_token = logits[:, -1].argmax(dim=-1)
        return logits


@torch.no_grad()
def measure_decode(model: nn.Module, batch: int, prompt_len: int, new_tokens: int,
                   generator: torch.Generator, *, cuda_graph: bool = False, bandwidth: float | None = None,
                   layout: WeightLayout | None = None, compile: bool = False) -> DecodeRow:
    """Plain greedy decoding of ``batch`` random prompts; ``bandwidth`` (bytes/s) adds the memory floor;
    ``compile``: the step compiled (module docstring)."""
    device = model.norm.weight.device
    layout = layout or weight_layout(model)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=generator).to(device)
    if compile:
        torch._dynamo.reset()
    _warm_up_decode(model, prompts, compile=compile and not (cuda_graph and new_tokens > 1))
    _sync(device)
    start = time.perf_counter()
    decoder = Decoder(model, batch, prompt_len + new_tokens)
    token = decoder.prefill(list(prompts)).argmax(-1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    step = _EagerStep(decoder, compile=compile)
    if cuda_graph and new_tokens > 1:
        from embscale.inference.cuda_graph import GraphedDecodeStep

        try:
            step = GraphedDecodeStep(decoder, compile=compile)
        except Exception as exc:  # noqa: BLE001 - any capture failure: measure the eager step instead
            log(f"decode-bench: the CUDA graph capture failed at batch {batch} ({type(exc).__name__}: {exc}); "
                "this row runs the eager step (cuda_graph false)")
            if compile:  # the eager step's own compilation, untimed as in a row without the graph
                _warm_up_decode(model, prompts, compile=True)
            _sync(device)
            start = time.perf_counter()
            decoder = Decoder(model, batch, prompt_len + new_tokens)  # the failed capture may have left state
            token = decoder.prefill(list(prompts)).argmax(-1)
            _sync(device)
            prefill_s = time.perf_counter() - start
            step = _EagerStep(decoder, compile=compile)
    steps, experts, parts = [], [], []
    held = batch * prompt_len
    for _ in range(new_tokens - 1):
        fed = token.unsqueeze(1).clone()  # the graph overwrites next_token in place
        _sync(device)
        t0 = time.perf_counter()
        step(fed)
        token = step.next_token
        _sync(device)
        steps.append(time.perf_counter() - t0)
        held += batch
        experts.append(distinct_experts(model))
        if bandwidth is not None:
            parts.append(layout.step_bytes(model, fed, step.rows, held))
    median = statistics.median(steps) if steps else float("nan")
    row = DecodeRow(mode="decode", batch=batch, tokens_per_s=batch * new_tokens / (prefill_s + sum(steps)),
                    ms_per_step=1e3 * median, tokens_per_step=batch, experts_per_step=_mean(experts), ngram_share=0.0,
                    acceptance_rate=float("nan"), cuda_graph=not isinstance(step, _EagerStep), compiled=compile)
    row.ngram_share = ngram_seconds(model, batch, 1, cuda_graph=row.cuda_graph) / median if steps else math.nan
    _set_floor(row, parts, bandwidth)
    return row


@torch.no_grad()
def measure_speculative(model: nn.Module, draft: nn.Module | None, batch: int, prompt_len: int, new_tokens: int,
                        k: int, generator: torch.Generator, *, bandwidth: float | None = None,
                        layout: WeightLayout | None = None, compile: bool = False) -> DecodeRow:
    """Greedy speculative decoding of ``batch`` random prompts, timed alone; then the same generation again
    (greedy: the same rounds) counting the experts of each verification pass and, with ``bandwidth``, the
    bytes of every draft step and verification pass (the floor of a round is their sum)."""
    device = model.norm.weight.device
    prompts = list(torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=generator).to(device))
    if compile:
        torch._dynamo.reset()
    speculative_generate(model, prompts, min(new_tokens, 2 * (k + 1)), k=k, draft=draft,
                         compile=compile)  # warm-up (and compilation), untimed
    _sync(device)
    start = time.perf_counter()
    _, stats = speculative_generate(model, prompts, new_tokens, k=k, draft=draft, compile=compile)
    _sync(device)
    total = time.perf_counter() - start
    round_s = total / max(stats.rounds, 1)

    layouts = {"verify": layout or weight_layout(model),
               "draft": weight_layout(draft if draft is not None else model, plain_embedding=True)}
    experts: list[float] = []
    rounds: list[dict[str, int]] = []
    current: dict[str, int] = dict.fromkeys(FLOOR_PARTS, 0)

    def on_feed(role: str, decoder: Decoder, ids: torch.Tensor) -> None:
        if bandwidth is None:
            return
        held = int(decoder.lengths.sum())
        for name, value in layouts[role].step_bytes(decoder.model, ids, decoder.last_rows, held).items():
            current[name] += value
        if role == "verify":
            rounds.append(dict(current))
            current.update(dict.fromkeys(FLOOR_PARTS, 0))

    speculative_generate(model, prompts, new_tokens, k=k, draft=draft, on_feed=on_feed, compile=compile,
                         on_verify=lambda: experts.append(distinct_experts(model)))
    row = DecodeRow(mode="speculative", batch=batch, tokens_per_s=batch * new_tokens / total,
                    ms_per_step=1e3 * round_s, tokens_per_step=batch * (k + 1), experts_per_step=_mean(experts),
                    ngram_share=ngram_seconds(model, batch, k + 1) / round_s,
                    acceptance_rate=stats.acceptance_rate, compiled=compile)
    _set_floor(row, rounds, bandwidth)
    return row


def _warm_up_decode(model: nn.Module, prompts: torch.Tensor, compile: bool = False) -> None:
    """A prefill and three steps of these shapes, untimed, so that the timed generation does not pay for
    what happens once per shape or per process (on CUDA: library handles, kernel selection and compilation, the
    caching allocator's growth; with ``compile``, the step's compilation); the first batch size measured on a GPU
    otherwise reports a fraction of its steady tokens/s."""
    batch, prompt_len = prompts.shape
    decoder = Decoder(model, batch, prompt_len + 3)
    token = decoder.prefill(list(prompts)).argmax(-1)
    step = _EagerStep(decoder, compile=compile)
    for _ in range(3):
        step(token.unsqueeze(1))
        token = step.next_token
    _sync(prompts.device)


@torch.no_grad()
def profile_decode(model: nn.Module, batch: int, prompt_len: int, generator: torch.Generator, *,
                   cuda_graph: bool = False, compile: bool = False, steps: int = 20, top: int = 25) -> dict:
    """Where a decode step's time goes: ``steps`` greedy steps of ``batch`` random prompts, run as the rows run
    them (replayed from a CUDA graph, compiled), under ``torch.profiler``. On CUDA: the device time of every kernel
    and copy the steps ran (inside the graph too), per step, and how many ran per step; elsewhere the self CPU time
    of each ATen operation. ``top``: the entries kept, largest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = model.norm.weight.device
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=generator).to(device)
    graphed = cuda_graph and device.type == "cuda"
    if compile:
        torch._dynamo.reset()
    _warm_up_decode(model, prompts, compile=compile and not graphed)
    decoder = Decoder(model, batch, prompt_len + steps + 3)
    token = decoder.prefill(list(prompts)).argmax(-1)
    if graphed:
        from embscale.inference.cuda_graph import GraphedDecodeStep

        step = GraphedDecodeStep(decoder, compile=compile)
    else:
        step = _EagerStep(decoder, compile=compile)
    for _ in range(2):  # settled before the profile
        step(token.unsqueeze(1).clone())
        token = step.next_token
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step(token.unsqueeze(1).clone())
            token = step.next_token
        _sync(device)
    averages = profiler.key_averages()
    on_device = device.type == "cuda"

    def time_of(event) -> float:  # microseconds
        return event.self_device_time_total if on_device else event.self_cpu_time_total

    if on_device:  # the kernels and copies
        events = [e for e in averages if e.device_type == DeviceType.CUDA]
    else:
        events = [e for e in averages if e.key.startswith("aten::")]
    what = "device" if on_device else "cpu"
    events.sort(key=time_of, reverse=True)
    total_us = sum(time_of(e) for e in events)
    return {"batch": batch, "steps": steps, "cuda_graph": graphed, "compiled": compile, "time": what,
            "us_per_step": total_us / steps, "launches_per_step": sum(e.count for e in events) / steps,
            "top": [{"name": e.key[:160], "per_step": e.count / steps, "us_per_step": time_of(e) / steps,
                     "share": time_of(e) / total_us if total_us else math.nan} for e in events[:top]]}


def _set_floor(row: DecodeRow, parts: list[dict[str, int]], bandwidth: float | None) -> None:
    """Put the mean of each floor part over ``parts`` (one dict per step or round) and the floor into ``row``."""
    if not parts or bandwidth is None:
        return
    for name in FLOOR_PARTS:
        setattr(row, name, sum(p[name] for p in parts) / len(parts))
    row.floor_bytes = sum(getattr(row, name) for name in FLOOR_PARTS)
    row.floor_ms = 1e3 * row.floor_bytes / bandwidth
    row.floor_ratio = row.ms_per_step / row.floor_ms


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def run_decode_bench(model: nn.Module, *, batch_sizes: tuple[int, ...] = BATCH_SIZES, prompt_len: int = 16,
                     new_tokens: int = 16, k: int = 4, draft: nn.Module | None = None, seed: int = 0,
                     show_progress: bool = True, cuda_graph: bool = False, bandwidth: float | None = None,
                     label: str = "decode-bench", compile: bool = False) -> list[DecodeRow]:
    """Every row (``decode`` for each batch size, then ``speculative`` when ``k > 0``); ``bandwidth`` (bytes/s,
    :func:`copy_bandwidth`) adds the memory floor to every row; ``cuda_graph`` replays their steps from a
    CUDA graph; ``compile`` compiles them (module docstring). The prompts depend on ``seed`` only, so two models
    of one vocabulary see the same ones."""
    model.eval()
    if draft is not None:
        draft.eval()
    generator = torch.Generator().manual_seed(seed)
    modes = ["decode"] + (["speculative"] if k > 0 else [])
    rows = []
    layout = weight_layout(model)
    progress = Progress(len(batch_sizes) * len(modes), label, unit="run",
                        mode=None if show_progress else "off")
    with progress:
        for mode in modes:
            for batch in batch_sizes:
                if mode == "decode":
                    rows.append(measure_decode(model, batch, prompt_len, new_tokens, generator, cuda_graph=cuda_graph,
                                               bandwidth=bandwidth, layout=layout, compile=compile))
                else:
                    rows.append(measure_speculative(model, draft, batch, prompt_len, new_tokens, k, generator,
                                                    bandwidth=bandwidth, layout=layout, compile=compile))
                progress.update(1, mode=mode, batch=batch, tokens_per_s=round(rows[-1].tokens_per_s, 1))
    return rows


__all__ = ["BATCH_SIZES", "FLOOR_PARTS", "DecodeRow", "WeightLayout", "copy_bandwidth", "distinct_experts",
           "measure_decode", "measure_speculative", "ngram_seconds", "profile_decode", "run_decode_bench",
           "weight_layout"]
