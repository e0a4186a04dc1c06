"""Expansion and matching: a sweep file's points become parameter-matched runs (BRIEF section 2).

For every point of the sweep (its axes crossed and zipped, :meth:`Sweep.points`):

- ``moe``: the MoE ladder. At target ratio ``r`` (total / activated, activated as in
  :mod:`models.accounting`: expected at uniform routing) the expert count is the integer whose ratio is
  closest to ``r`` (a monotone search over ``n_experts`` with everything else fixed; zero experts follow
  ``model.zero_expert_ratio`` when given). The achieved ratio is reported next to the target; a point whose
  closest count still misses by more than ``limits.ratio_tolerance`` (relative) is skipped. Without a ratio
  the model's own expert count is trained.
- ``ne``: anchored at a base MoE, the ladder point at ``base_ratio`` (or the model as written without one),
  with an N-gram Embedding added. At target ratio ``r`` its table size is solved so that its total equals the
  MoE ladder's total at ``r``: with ``M_idx`` rows per sub-table (``paper`` sizing ``m + 2 idx + 1``) the NE
  adds ``sum_idx M_idx * d + S d D`` (+ the LayerNorm of ``layernorm`` amplification), affine in ``m``, so
  ``m`` is solved exactly (an integer search, which also serves ``prime`` sizing), ``ngram.ratio = m / V0``.
  Activated = the base's + the NE projections. NE share ~ ``1 - r_base / r``. Instead of ``ratio`` a point
  may give ``ne_share`` (total = base total / (1 - share)) or a fixed ``table_ratio``; those are paired with
  the MoE of the nearest total.
- ``plne``: the same with a Per-Layer N-gram Embedding (its per-layer table ratio solved).
- ``ple``: the base MoE plus a Per-Layer Embedding. A PLE has no size knob (``V0 x dense_hidden`` per fed
  MLP), so its total is what it is: it is paired with the MoE of the nearest total and marked ``matched``
  only when that pair is within ``limits.match_tolerance``. The ``ratio`` axis does not apply to it.
- ``dense``: the backbone without routed experts (``dense_hidden`` from the model section).

Points that cannot be built (a target not above the base ratio, an NE share above ``limits.max_ne_share``,
a width the sub-tables do not divide, any invalid model config, an unreachable ratio) are listed in
:attr:`Plan.skipped` with the reason, never dropped. Axes that do not apply to a family (``n`` for ``moe``,
``ratio`` for ``ple``) are left out of its point, so such crossings collapse.

Run ids are :attr:`embscale.training.config.RunConfig.run_id` of the planned run config (a hash of the model,
training and data sections with defaults filled in; never the sweep name), so a run that another sweep of the
same results root has completed is copied by ``embscale submit``, not trained again
(:func:`embscale.sweeps.submit.reuse_completed_runs`), and duplicates within a sweep are collapsed (the first
point wins; :attr:`Plan.duplicates` counts the rest).

Accounting is analytic and cached per distinct model config, and each search shares its probes across
targets: 10,000 points that share models (seeds, learning rates, families) expand in about a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from embscale.base.datafile import build_dataclass
from embscale.base.errors import ConfigError
from embscale.models.accounting import Accounting, count_parameters
from embscale.models.config import ModelConfig, NgramConfig, PerLayerConfig
from embscale.sweeps.sweepfile import Sweep, apply_model_rules, load_sweep, sweep_vocab_size, training_template
from embscale.training.config import (
    TABLE_FIELDS,
    DataConfig,
    RunConfig,
    TrainingConfig,
    data_identity,
    training_identity,
)

EMBEDDING_FAMILIES = ("ne", "ple", "plne")
# Axes that describe each family's run (the others are left out of its point).
RELEVANT_AXES = {
    "moe": ("ratio",),
    "dense": (),
    "ne": ("ratio", "ne_share", "table_ratio", "base_ratio", "n", "k", "sizing", "amplification"),
    "plne": ("ratio", "ne_share", "table_ratio", "base_ratio", "n", "k", "sizing", "amplification",
             "targets"),
    "ple": ("base_ratio", "targets"),
}
COMMON_AXES = ("width", "depth", "seed", "lr")
MAX_EXPERTS = 1 << 20
MAX_TABLE_ROWS = (1 << 31) - (1 << 16)  # below the hash's modulus bound (models.ngram.MAX_MODULUS), with room
DEFAULT_MFU = 0.35
DEFAULT_PEAK_FLOPS = 989e12  # H100 SXM dense bf16


_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _canonical(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"))``, through one encoder (``json.dumps`` with
    options builds a new one each call, a third of its time on a model section)."""
    return _CANONICAL_ENCODER.encode(value)


_KEY_PREFIXES: dict[str, str] = {}


def _key_prefix(name: str) -> str:
    """``'"name":'``, the start of a key's fragment in canonical JSON (memoised: a sweep has few field names)."""
    prefix = _KEY_PREFIXES.get(name)
    if prefix is None:
        prefix = _KEY_PREFIXES[name] = _canonical(name) + ":"
    return prefix


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------

@dataclass
class PlannedRun:
    """One run of a plan. ``config`` has the ``model``, ``training`` and ``data`` sections of a
    :class:`~embscale.training.config.RunConfig` (the plan adds ``output``); ``accounting`` is
    ``Accounting.to_dict(seq_len)``; ``flops`` = ``flops_per_token(seq_len) * tokens`` (6 N D + attention).

    ``target_ratio``: the ratio asked for (None for a run not placed by ratio); ``achieved_ratio``: its own
    total / activated. ``match_error``: (total - pair total) / pair total for an embedding-scaled run, None
    otherwise; ``matched``: whether that is within the sweep's tolerance. ``pair``: the parameter-equivalent
    MoE (``run_id``, ``n_experts``, ``n_zero_experts``, ``total``, ``activated``, ``ratio``; its run is in the
    plan when the sweep also asks for it); ``anchor``: the base MoE of an embedding-scaled run (same keys).
    ``table_rows``: ``m``, the base row count of each N-gram sub-table (NE, PLNE), else None."""

    run_id: str
    family: str
    point: dict[str, Any]
    config: dict[str, Any]
    accounting: dict[str, Any]
    tokens: int
    flops: float
    target_ratio: float | None
    achieved_ratio: float
    match_error: float | None = None
    base_ratio: float | None = None
    ne_share: float = 0.0
    matched: bool | None = None
    pair: dict[str, Any] | None = None
    anchor: dict[str, Any] | None = None
    table_rows: int | None = None

    @property
    def total(self) -> int:
        return self.accounting["total"]

    @property
    def activated(self) -> int | float:
        return self.accounting["activated"]

    def gpu_hours(self, mfu: float = DEFAULT_MFU, peak_flops: float = DEFAULT_PEAK_FLOPS) -> float:
        """GPU-hours to train at model-FLOPs utilisation ``mfu`` of ``peak_flops`` (FLOP/s)."""
        return self.flops / (mfu * peak_flops) / 3600.0

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict(self)``: its nested dicts and lists copied (a planned run holds plain data only,
        so without ``asdict``'s deep copy of every number and string, which took a second for 10,000 runs)."""
        return {name: _detached(getattr(self, name)) for name in _field_names(PlannedRun)}


@dataclass
class SkippedPoint:
    """A point of the sweep that cannot be built, and why."""

    point: dict[str, Any]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"point": dict(self.point), "reason": self.reason}


@dataclass
class Plan:
    """The runs of a sweep (deduplicated, in point order) and the points it skipped."""

    name: str
    runs: list[PlannedRun] = field(default_factory=list)
    skipped: list[SkippedPoint] = field(default_factory=list)
    duplicates: int = 0
    executor: dict[str, Any] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    # the ModelConfig each run was planned from, by run id: in memory only (not in to_dict), so that what reads
    # the models (the memory estimate) need not rebuild 10,000 of them from their sections
    model_configs: dict[str, ModelConfig] = field(default_factory=dict, repr=False, compare=False)

    @property
    def total_flops(self) -> float:
        return float(sum(run.flops for run in self.runs))

    def gpu_hours(self, mfu: float = DEFAULT_MFU, peak_flops: float = DEFAULT_PEAK_FLOPS) -> float:
        """GPU-hours for the whole sweep at model-FLOPs utilisation ``mfu`` of ``peak_flops`` (FLOP/s)."""
        return self.total_flops / (mfu * peak_flops) / 3600.0

    def run(self, run_id: str) -> PlannedRun:
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise KeyError(run_id)

    def pairs(self) -> list[tuple[PlannedRun, PlannedRun]]:
        """(embedding-scaled run, its parameter-equivalent MoE run) for every pair both of whose runs are
        planned."""
        by_id = {run.run_id: run for run in self.runs}
        return [(run, by_id[run.pair["run_id"]]) for run in self.runs
                if run.pair is not None and run.pair["run_id"] in by_id]

    def to_dict(self, mfu: float = DEFAULT_MFU, peak_flops: float = DEFAULT_PEAK_FLOPS) -> dict[str, Any]:
        runs = []
        for run in self.runs:
            entry = run.to_dict()
            entry["gpu_hours"] = run.gpu_hours(mfu, peak_flops)
            runs.append(entry)
        return {
            "name": self.name,
            "path": self.path,
            "runs": runs,
            "skipped": [s.to_dict() for s in self.skipped],
            "duplicates": self.duplicates,
            "total_flops": self.total_flops,
            "mfu": mfu,
            "peak_flops": peak_flops,
            "gpu_hours": self.gpu_hours(mfu, peak_flops),
            "executor": self.executor,
            "slurm": self.slurm,
        }


class _Skip(Exception):
    """A point that cannot be built; the message is the reason."""


# ----------------------------------------------------------------------------------------------------------
# Integer search
# ----------------------------------------------------------------------------------------------------------

def closest_integer(f: Callable[[int], float], target: float, lo: int, hi: int,
                    probe: int = 64, affine: bool = False) -> tuple[int, float]:
    """The ``n`` in ``[lo, hi]`` whose ``f(n)`` is closest to ``target``, for ``f`` nondecreasing (ties go to
    the smaller ``n``); returns ``(n, f(n))``.

    Secant steps from ``lo`` and ``lo + probe`` (exact in one step when ``f`` is affine, as a table's total
    is in its row count), then a galloping bracket and bisection (correct for any monotone ``f``), then a
    walk to a local optimum (so neither ``n - 1`` nor ``n + 1`` is closer, even where ``f`` is only nearly
    monotone).
    A handful of calls to ``f`` when it is nearly linear; ``f`` should be cached by the caller when it is
    searched repeatedly (the secant's first two points are the same for every target). With ``affine=True``
    (the caller knows ``f(n) = f(lo) + (n - lo) * slope``) the secant's rounded root is the answer, checked
    by one call (``|f(n) - target| <= slope / 2``); the full search runs when that check fails."""
    memo: dict[int, float] = {}

    def value(n: int) -> float:
        if n not in memo:
            memo[n] = f(n)
        return memo[n]

    if affine and hi > lo + probe and value(lo) < target:
        b = lo + probe
        slope = (value(b) - value(lo)) / probe
        if slope > 0:
            n = int(min(max(math.floor(lo + (target - value(lo)) / slope + 0.5), lo), hi))
            if abs(value(n) - target) <= slope / 2:
                return n, value(n)

    if hi <= lo or value(lo) >= target:
        n = lo
    else:
        a, b = lo, min(hi, lo + probe)
        n = b
        for _ in range(8):
            fa, fb = value(a), value(b)
            if fb == fa:
                break
            guess = b + (target - fb) * (b - a) / (fb - fa)
            n = int(round(min(max(guess, lo), hi))) if math.isfinite(guess) else b
            if abs(n - b) <= 1:
                break
            a, b = b, n
        # bracket: f(low) < target <= f(high), galloping out from the secant's n
        if value(n) >= target:
            high, step, low = n, 1, lo
            while high - step > lo:
                if value(high - step) < target:
                    low = high - step
                    break
                high -= step
                step *= 2
        else:
            low, step, high = n, 1, hi
            while low + step < hi:
                if value(low + step) >= target:
                    high = low + step
                    break
                low += step
                step *= 2
        while high - low > 1:
            mid = (low + high) // 2
            if value(mid) >= target:
                high = mid
            else:
                low = mid
        n = high if abs(value(high) - target) < abs(value(low) - target) else low
    while True:  # local walk
        best = n
        for cand in (n - 1, n + 1):
            if lo <= cand <= hi and abs(value(cand) - target) < abs(value(best) - target):
                best = cand
        if best == n:
            return n, value(n)
        n = best


# ----------------------------------------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------------------------------------

def _candidate(base: ModelConfig, **changes: Any) -> ModelConfig:
    """``base`` (a validated config) with ``changes``, built without its constructor, so without validating it
    again: for a search that probes many sizes, whose changes keep it valid (:meth:`_Expander.with_experts`,
    :meth:`_Expander.table_candidate` say why). Validation was half the expansion time, and then, once a model,
    a tenth; the tests build every planned model through its constructor."""
    candidate = object.__new__(ModelConfig)
    fields = candidate.__dict__
    fields.update(base.__dict__)
    fields.pop("_hash", None)  # the cached hash is base's, not ours
    fields.update(changes)
    return candidate


class _Expander:
    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.vocab_size = sweep_vocab_size(sweep)
        self.limits = sweep.limits
        self.zero_ratio = sweep.model_rules.get("zero_expert_ratio")
        self.training_section, self.tokens_mode = training_template(sweep)
        template = dict(self.training_section)
        if self.tokens_mode == "tokens_per_activated":
            template["tokens"] = 1  # placeholder: resolved per run
        self.lr_rule = sweep.training.get("lr") if isinstance(sweep.training.get("lr"), dict) else None
        if self.lr_rule is not None:
            template["lr"] = self.lr_rule["base"]
        self.training_template: TrainingConfig = build_dataclass(TrainingConfig, template)
        # a model without N-gram tables trains without the table settings (they would only split its run id)
        self.table_free_section = {k: v for k, v in self.training_section.items() if k not in TABLE_FIELDS}
        table_free = build_dataclass(TrainingConfig, {k: v for k, v in template.items() if k not in TABLE_FIELDS})
        self.training_variants = {True: self._training_variant(self.training_template),
                                  False: self._training_variant(table_free)}
        self.seq_len = self.training_template.seq_len
        data = build_dataclass(DataConfig, sweep.data)
        self.data_json = _canonical(data_identity(data))
        self.data_section = dict(sweep.data)
        self.eos_given = "eos_token_id" in sweep.model
        self.backbones: dict[tuple[int, int], ModelConfig | ConfigError] = {}
        self.accounts: dict[ModelConfig, Accounting] = {}
        self.ladder: dict[tuple[ModelConfig, float], tuple[ModelConfig, Accounting] | str] = {}
        self.by_total: dict[tuple[ModelConfig, int], tuple[ModelConfig, Accounting]] = {}
        self.tables: dict[tuple, tuple[ModelConfig, Accounting, int]] = {}
        self.runs: dict[tuple, tuple[str, dict, int, float]] = {}
        self.infos: dict[ModelConfig, _ModelInfo] = {}
        self.curves: dict[tuple, dict] = {}
        self.resolved: dict[tuple, _Resolved | _Skip] = {}
        self.derived: dict[int, tuple[ModelConfig, ModelConfig, tuple[str, ...]]] = {}
        # by id, the base kept (equal configs may differ in how their numbers are written: 1 and 1.0)
        self.identity_parts: dict[int, tuple[ModelConfig, list[str], dict[str, int]]] = {}
        self.base_sections: dict[int, tuple[ModelConfig, dict[str, Any]]] = {}

    # ----- models -----
    def account(self, cfg: ModelConfig) -> Accounting:
        acc = self.accounts.get(cfg)
        if acc is None:
            acc = self.accounts[cfg] = count_parameters(cfg)
        return acc

    def backbone(self, width: int, depth: int) -> ModelConfig:
        key = (width, depth)
        if key not in self.backbones:
            model = dict(self.sweep.model)
            model["d_model"], model["n_layers"] = width, depth
            model["vocab_size"] = self.vocab_size
            try:
                apply_model_rules(model, self.sweep.model_rules, n_experts=model.get("n_experts", 0))
                self.backbones[key] = build_dataclass(ModelConfig, model)
            except ConfigError as exc:
                self.backbones[key] = ConfigError(self.sweep.error_path(exc.field), exc.message)
        cfg = self.backbones[key]
        if isinstance(cfg, ConfigError):
            raise _Skip(f"invalid model at width {width}, depth {depth}: {cfg}")
        return cfg

    def with_experts(self, base: ModelConfig, n: int) -> ModelConfig:
        """``base`` with ``n`` experts, as a search candidate: not validated again (:func:`_candidate`). The search
        keeps ``n`` at or above :meth:`_min_experts`, where ``n`` + zero experts reach ``top_k`` (and they only
        grow with ``n``): only the counts change, inside their valid range."""
        zero = int(round(self.zero_ratio * n)) if self.zero_ratio is not None else base.n_zero_experts
        return _candidate(base, n_experts=n, n_zero_experts=zero)

    def _min_experts(self, base: ModelConfig) -> int:
        n = 1
        while n + (int(round(self.zero_ratio * n)) if self.zero_ratio is not None else base.n_zero_experts) \
                < base.top_k:
            n += 1
        return n

    def _need_experts(self, base: ModelConfig) -> None:
        if base.top_k < 1 or base.expert_hidden < 1:
            raise _Skip("the MoE ladder needs routed experts in the model section (experts, top_k, "
                        "expert size)")

    def expert_curve(self, base: ModelConfig) -> Callable[[int], tuple[ModelConfig, Accounting]]:
        """``n -> (config, accounting)`` of ``base`` with ``n`` experts, memoised per base. The configs are
        search candidates (:meth:`with_experts`), counted without going through :attr:`accounts` (a candidate
        is new, so hashing it to look it up there only cost time); the one a search picks is registered by
        :meth:`_register`."""
        memo = self.curves.setdefault(("experts", base), {})

        def point(n: int) -> tuple[ModelConfig, Accounting]:
            entry = memo.get(n)
            if entry is None:
                cfg = self.with_experts(base, n)
                self.derive(cfg, base, ("n_experts", "n_zero_experts"))
                entry = memo[n] = (cfg, count_parameters(cfg))
            return entry

        return point

    def _register(self, candidate: ModelConfig, acc: Accounting) -> tuple[ModelConfig, Accounting]:
        """A search's pick and its accounting, kept in :attr:`accounts` (an equal config there keeps its own)."""
        return candidate, self.accounts.setdefault(candidate, acc)

    def moe_at_ratio(self, base: ModelConfig, ratio: float,
                     what: str = "ratio") -> tuple[ModelConfig, Accounting]:
        """The MoE ladder point: the expert count whose total/activated is closest to ``ratio``."""
        key = (base, ratio)
        if key not in self.ladder:
            self._need_experts(base)
            lo = self._min_experts(base)
            curve = self.expert_curve(base)
            # with no zero experts the activated count does not depend on the expert count, so the ratio is
            # affine in it
            affine = self.zero_ratio is None and base.n_zero_experts == 0
            n, achieved = closest_integer(lambda n: curve(n)[1].ratio, ratio, lo, MAX_EXPERTS, affine=affine)
            cfg, acc = self._register(*curve(n))
            error = achieved / ratio - 1
            if abs(error) > self.limits.ratio_tolerance:
                if n == lo and achieved > ratio:
                    why = f"the fewest experts ({n}) already give ratio {achieved:.3f}"
                elif n == MAX_EXPERTS:
                    why = f"even {n} experts give only ratio {achieved:.3f}"
                else:
                    why = f"the closest expert count {n} gives ratio {achieved:.3f}"
                self.ladder[key] = (f"{ratio:g} is out of reach: {why} ({error:+.1%}, more than "
                                    f"limits.ratio_tolerance {self.limits.ratio_tolerance:g})")
            else:
                self.ladder[key] = (cfg, acc)
        result = self.ladder[key]
        if isinstance(result, str):
            raise _Skip(f"{what} {result}")
        return result

    def moe_at_total(self, base: ModelConfig, total: int) -> tuple[ModelConfig, Accounting]:
        """The MoE of the nearest total (the parameter-equivalent MoE of a run not placed by ratio)."""
        key = (base, total)
        if key not in self.by_total:
            self._need_experts(base)
            curve = self.expert_curve(base)
            n, _ = closest_integer(lambda n: curve(n)[1].total, total, self._min_experts(base), MAX_EXPERTS,
                                   affine=self.zero_ratio is None)
            self.by_total[key] = self._register(*curve(n))
        return self.by_total[key]

    def with_table(self, anchor: ModelConfig, family: str, spec: dict[str, Any], targets: str,
                   ratio: float) -> ModelConfig:
        ngram = NgramConfig(n=spec["n"], k=spec["k"], ratio=ratio, sizing=spec["sizing"],
                            amplification=spec["amplification"])
        if family == "ne":
            return anchor.replace(ngram=ngram)
        return anchor.replace(per_layer=PerLayerConfig(kind="plne", targets=targets, ngram=ngram))

    def table_candidate(self, probed: ModelConfig, family: str, spec: dict[str, Any], targets: str,
                        ratio: float) -> ModelConfig:
        """:meth:`with_table` as a search candidate: ``probed`` (a validated model of the same search) with
        another table size, the model not validated again (only the table's ratio changes, and
        :class:`NgramConfig` validates it; nothing the model checks depends on it)."""
        ngram = NgramConfig(n=spec["n"], k=spec["k"], ratio=ratio, sizing=spec["sizing"],
                            amplification=spec["amplification"])
        if family == "ne":
            return _candidate(probed, ngram=ngram)
        return _candidate(probed, per_layer=PerLayerConfig(kind="plne", targets=targets, ngram=ngram))

    def table_for_total(self, anchor: ModelConfig, family: str, spec: dict[str, Any], targets: str,
                        total: int) -> tuple[ModelConfig, Accounting, int]:
        """The N-gram table (``m`` rows per sub-table, ``ratio = m / V0``) whose model total is closest to
        ``total``."""
        key = (anchor, family, tuple(sorted(spec.items())), targets, total)
        if key not in self.tables:
            v0 = self.vocab_size
            memo = self.curves.setdefault(key[:-1], {})

            def model_total(m: int) -> int:
                entry = memo.get(m)
                if entry is None:
                    if not memo:  # the first probe goes through the constructor: it raises for an invalid model
                        cfg = self.with_table(anchor, family, spec, targets, m / v0)
                    else:  # the others differ from it in the table's size only, which NgramConfig validates
                        cfg = self.table_candidate(next(iter(memo.values()))[0], family, spec, targets, m / v0)
                    self.derive(cfg, anchor, ("ngram",) if family == "ne" else ("per_layer",))
                    entry = memo[m] = (cfg, count_parameters(cfg))
                return entry[1].total

            try:
                smallest = model_total(2)
            except ConfigError as exc:
                raise _Skip(f"invalid model: {self.sweep.error_path(exc.field)}: {exc.message}") from None
            if smallest > total:
                raise _Skip(f"the smallest {family.upper()} table already gives total {smallest:,}, above "
                            f"the target total {total:,}")
            # paper and exact sizing: the total is affine in m (sum_idx M_idx * d + S d D)
            m, _ = closest_integer(model_total, total, 2, MAX_TABLE_ROWS, probe=1 << 16,
                                   affine=spec["sizing"] != "prime")
            cfg, acc = self._register(*memo[m])
            assert (cfg.ngram or cfg.per_layer.ngram).base_rows(v0) == m
            self.tables[key] = (cfg, acc, m)
        return self.tables[key]

    # ----- runs -----
    def lr_for(self, width: int, lr: float | None) -> float | None:
        if lr is not None:
            return float(lr)
        rule = self.lr_rule
        if rule is None:
            return None
        if rule["rule"] == "inverse_width":
            return float(rule["base"]) * rule["base_width"] / width
        return float(rule["base"]) * math.sqrt(rule["base_width"] / width)

    def info(self, cfg: ModelConfig) -> _ModelInfo:
        """Everything a run needs from its model config, computed once per distinct config."""
        info = self.infos.get(cfg)
        if info is None:
            acc = self.account(cfg)
            model = self.model_section(cfg)
            info = self.infos[cfg] = _ModelInfo(cfg=cfg, acc=acc, identity_json=self.identity_json(cfg, model),
                                                flops_per_token=acc.flops_per_token(self.seq_len),
                                                spare_model=model)
        return info

    def derive(self, cfg: ModelConfig, base: ModelConfig, changed: tuple[str, ...]) -> None:
        """Note that ``cfg`` equals ``base`` but in the fields ``changed`` (a search candidate), so that
        :meth:`identity_json` encodes only those."""
        self.derived[id(cfg)] = (cfg, base, changed)  # cfg is kept, so its id is not reused

    def identity_json(self, cfg: ModelConfig, model: dict[str, Any]) -> str:
        """The model part of the run id: ``_canonical`` of the model section (``model``, :meth:`model_section`
        of ``cfg``) with the EOS id as None when the sweep gives none (RunConfig hashes an omitted one so).

        A model derived from another (:meth:`derive`) reuses that one's encoded fields and encodes only those
        that differ: most models of a sweep are search candidates of a few bases, and encoding each whole was
        a tenth of the expansion time. The text is the same: canonical JSON is ``"key":value`` fragments in
        sorted key order, each value encoded alone as inside the object."""
        derived = self.derived.get(id(cfg))
        if derived is None or derived[0] is not cfg:
            identity = dict(model)
            identity.setdefault("eos_token_id", None)
            return _canonical(identity)
        _, base, changed = derived
        parts = self.identity_parts.get(id(base))
        if parts is None or parts[0] is not base:
            identity = self.model_section(base)
            identity.setdefault("eos_token_id", None)
            keys = sorted(identity)
            fragments = [f"{_canonical(key)}:{_canonical(identity[key])}" for key in keys]
            parts = self.identity_parts[id(base)] = (base, fragments, {key: i for i, key in enumerate(keys)})
            assert "{" + ",".join(fragments) + "}" == _canonical(identity)
        _, fragments, index = parts
        fragments = list(fragments)
        for name in changed:
            value = model[name]
            # an int (an expert count) is its repr in JSON: no encoder needed for the MoE ladder's candidates
            fragments[index[name]] = _key_prefix(name) + (int.__repr__(value) if type(value) is int
                                                          else _canonical(value))
        return "{" + ",".join(fragments) + "}"

    def model_section(self, cfg: ModelConfig) -> dict[str, Any]:
        """The run config's model section: ``cfg.to_dict()`` without the EOS id unless the sweep gives one
        (the tokenizer supplies it). A model derived from another (:meth:`derive`): a copy of that one's with the
        fields that differ."""
        derived = self.derived.get(id(cfg))
        if derived is not None and derived[0] is cfg:
            _, base, changed = derived
            sections = self.base_sections.get(id(base))
            if sections is None or sections[0] is not base:
                sections = self.base_sections[id(base)] = (base, self.model_section(base))
            model = _copy(sections[1])
            for name in changed:
                value = getattr(cfg, name)
                model[name] = value if type(value) in _LEAF_TYPES else _plain(value)
            return model
        model = _plain(cfg)
        if not self.eos_given:
            del model["eos_token_id"]
        return model

    @staticmethod
    def _training_variant(template: TrainingConfig) -> dict[str, Any]:
        """The canonical JSON fragments of a training template's identity, by field (for :meth:`_training_json`)."""
        identity = training_identity(template)
        keys = sorted(identity)
        return {"fragments": [f"{json.dumps(key)}:{_canonical(identity[key])}" for key in keys],
                "index": {key: index for index, key in enumerate(keys)}, "jsons": {}}

    def _training_json(self, changes: dict[str, Any], has_tables: bool = True) -> str:
        """``json.dumps(asdict(replace(template, **changes)), sort_keys=True)`` without rebuilding it: tokens,
        lr and seed are already valid ints and floats, so only their fragments change. Memoised per change (a
        sweep has few learning rates, seeds and budgets; the key holds the types, as 1 == 1.0 == True).
        ``has_tables``: the model has N-gram tables (else the template without the table settings)."""
        variant = self.training_variants[has_tables]
        key = tuple((name, type(value), value) for name, value in changes.items())
        text = variant["jsons"].get(key)
        if text is None:
            parts = list(variant["fragments"])
            for name, value in changes.items():
                index = variant["index"].get(name)
                if index is not None:
                    parts[index] = f"{json.dumps(name)}:{json.dumps(value)}"
            text = variant["jsons"][key] = "{" + ",".join(parts) + "}"
        return text

    def make_run(self, info: _ModelInfo, seed: int | None, lr: float | None) -> tuple[str, dict, int, float]:
        """(run id, config, tokens, flops) of a model trained with this sweep's training and data sections."""
        key = (id(info), seed, lr)  # infos live as long as the expander, so their ids are stable
        cached = self.runs.get(key)
        if cached is not None:
            return cached
        cfg = info.cfg
        has_tables = cfg.ngram is not None or (cfg.per_layer is not None and cfg.per_layer.ngram is not None)
        training = dict(self.training_section if has_tables else self.table_free_section)
        changes: dict[str, Any] = {}
        template = self.training_template
        if self.tokens_mode == "steps":
            tokens = template.steps * template.batch_tokens
        elif self.tokens_mode == "tokens":
            tokens = template.tokens
        else:
            raw = self.sweep.training["tokens_per_activated"] * info.acc.activated
            batch = template.batch_tokens
            tokens = max(1, math.ceil(raw / batch)) * batch
            training["tokens"] = changes["tokens"] = tokens
        if lr is not None:
            training["lr"] = changes["lr"] = lr
        if seed is not None:
            training["seed"] = changes["seed"] = seed
        text = ('{"data":' + self.data_json + ',"model":' + info.identity_json + ',"training":'
                + self._training_json(changes, has_tables) + "}")
        run_id = hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
        model, info.spare_model = info.spare_model or self.model_section(info.cfg), None
        config = {"model": model, "training": training, "data": _copy(self.data_section)}
        result = self.runs[key] = (run_id, config, tokens, info.flops_per_token * tokens)
        return result

    def summary(self, info: _ModelInfo, seed: int | None, lr: float | None) -> dict[str, Any]:
        acc = info.acc
        return {"run_id": self.make_run(info, seed, lr)[0], "n_experts": info.cfg.n_experts,
                "n_zero_experts": info.cfg.n_zero_experts, "total": acc.total, "activated": acc.activated,
                "ratio": acc.ratio}

    # ----- points -----
    def settings(self, raw: dict[str, Any]) -> dict[str, Any]:
        sweep = self.sweep
        values = {
            "family": raw.get("family", "moe"),
            "width": raw.get("width", sweep.model.get("d_model")),
            "depth": raw.get("depth", sweep.model.get("n_layers")),
            "seed": raw.get("seed", sweep.training.get("seed")),
            "lr": raw.get("lr"),
            "targets": raw.get("targets", sweep.per_layer.get("targets", "first")),
        }
        for name in ("ratio", "base_ratio", "ne_share", "table_ratio"):
            values[name] = raw.get(name)
        for name in ("n", "k", "sizing", "amplification"):
            values[name] = raw.get(name, sweep.ngram.get(name, getattr(NgramConfig, name)))
        return values

    def display_point(self, raw: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
        point = {"family": s["family"], "width": s["width"], "depth": s["depth"]}
        for name in RELEVANT_AXES[s["family"]] + ("seed", "lr"):
            if raw.get(name) is not None:
                point[name] = raw[name]
        return point

    def plan_point(self, raw: dict[str, Any]) -> PlannedRun:
        return self.plan_point_and_model(raw)[0]

    def plan_point_and_model(self, raw: dict[str, Any]) -> tuple[PlannedRun, ModelConfig]:
        """The planned run of a point and the model config it was planned from."""
        s = self.settings(raw)
        family = s["family"]
        # the model depends on the family's own axes only (seed and lr change the run, not the model)
        key = (family, s["width"], s["depth"]) + tuple(s[name] for name in RELEVANT_AXES[family])
        resolved = self.resolved.get(key)
        if resolved is None:
            try:
                resolved = self.resolve(family, s)
            except _Skip as skip:
                resolved = skip
            self.resolved[key] = resolved
        if isinstance(resolved, _Skip):
            raise resolved
        lr = self.lr_for(s["width"], s["lr"])
        seed = s["seed"]
        info = resolved.info
        run_id, config, tokens, flops = self.make_run(info, seed, lr)
        extra = dict(resolved.extra)
        if resolved.anchor is not None:
            extra["anchor"] = self.summary(resolved.anchor, seed, lr)
        if resolved.pair is not None:
            extra["pair"] = self.summary(resolved.pair, seed, lr)
        run = PlannedRun(run_id=run_id, family=family, point=self.display_point(raw, s), config=config,
                         accounting=info.acc.to_dict(self.seq_len), tokens=tokens, flops=flops,
                         target_ratio=resolved.target_ratio, achieved_ratio=info.acc.ratio,
                         ne_share=info.acc.ne_share,
                         base_ratio=s["base_ratio"] if family in EMBEDDING_FAMILIES else None, **extra)
        return run, info.cfg

    def resolve(self, family: str, s: dict[str, Any]) -> _Resolved:
        """The model of a point (cached per distinct model-relevant settings), or _Skip."""
        backbone = self.backbone(s["width"], s["depth"])
        if family == "dense":
            try:
                cfg = backbone.replace(n_experts=0, n_zero_experts=0, top_k=0, n_shared_experts=0)
            except ConfigError as exc:
                raise _Skip(f"no dense baseline: {self.sweep.error_path(exc.field)}: {exc.message}") from None
            resolved = _Resolved(info=self.info(cfg))
        elif family == "moe":
            if s["ratio"] is None:
                self._need_experts(backbone)
                cfg = backbone
            else:
                cfg, _ = self.moe_at_ratio(backbone, s["ratio"])
            resolved = _Resolved(info=self.info(cfg), target_ratio=s["ratio"])
        else:
            resolved = self.embedding_run(family, s, backbone)
        cap = self.limits.max_ne_share
        share = resolved.info.acc.ne_share
        if cap is not None and share > cap:
            raise _Skip(f"NE share {share:.1%} is above limits.max_ne_share {cap:g}")
        return resolved

    def embedding_run(self, family: str, s: dict[str, Any], backbone: ModelConfig) -> _Resolved:
        base_ratio = s["base_ratio"]
        if base_ratio is None:
            anchor, anchor_acc = backbone, self.account(backbone)
        else:
            anchor, anchor_acc = self.moe_at_ratio(backbone, base_ratio, what="base ratio")
        tolerance = self.limits.match_tolerance
        target_ratio = None
        extra: dict[str, Any] = {}

        if family == "ple":
            try:
                cfg = anchor.replace(per_layer=PerLayerConfig(kind="ple", targets=s["targets"]))
                acc = self.account(cfg)
            except ConfigError as exc:
                raise _Skip(f"invalid model: {self.sweep.error_path(exc.field)}: {exc.message}") from None
            pair = self.moe_at_total(backbone, acc.total) if backbone.top_k > 0 else None
        else:
            spec = {name: s[name] for name in ("n", "k", "sizing", "amplification")}
            given = [name for name in ("ratio", "ne_share", "table_ratio") if s[name] is not None]
            if len(given) != 1:
                raise _Skip(f"{family} needs exactly one of ratio, ne_share, table_ratio; got "
                            f"{', '.join(given) if given else 'none'}")
            if s["table_ratio"] is not None:
                try:
                    cfg = self.with_table(anchor, family, spec, s["targets"], s["table_ratio"])
                    acc = self.account(cfg)
                except ConfigError as exc:
                    raise _Skip(f"invalid model: {self.sweep.error_path(exc.field)}: {exc.message}") from None
                pair = self.moe_at_total(backbone, acc.total) if backbone.top_k > 0 else None
            elif s["ne_share"] is not None:
                total = int(round(anchor_acc.total / (1 - s["ne_share"])))
                cfg, acc, _ = self.table_for_total(anchor, family, spec, s["targets"], total)
                pair = self.moe_at_total(backbone, acc.total) if backbone.top_k > 0 else None
            else:
                target_ratio = s["ratio"]
                floor = base_ratio if base_ratio is not None else anchor_acc.ratio
                if target_ratio <= floor:
                    raise _Skip(f"target ratio {target_ratio:g} is not above the base ratio {floor:g}")
                pair = pair_cfg, pair_acc = self.moe_at_ratio(backbone, target_ratio)
                if pair_acc.total <= anchor_acc.total:
                    raise _Skip(f"the MoE at ratio {target_ratio:g} ({pair_acc.total:,}) is no larger than "
                                f"the base ({anchor_acc.total:,})")
                cfg, acc, _ = self.table_for_total(anchor, family, spec, s["targets"], pair_acc.total)
                error = acc.total / pair_acc.total - 1
                if abs(error) > tolerance:
                    raise _Skip(f"cannot match the MoE total {pair_acc.total:,} within {tolerance:g}: "
                                f"closest {acc.total:,} ({error:+.3%})")
            ngram = cfg.ngram if family == "ne" else cfg.per_layer.ngram
            extra["table_rows"] = ngram.base_rows(self.vocab_size)
        if pair is None:  # no routed experts to pair with (an embedding-scaled dense model)
            return _Resolved(info=self.info(cfg), target_ratio=target_ratio, extra=extra,
                             anchor=self.info(anchor))
        error = acc.total / pair[1].total - 1
        extra.update(match_error=error, matched=abs(error) <= tolerance)
        return _Resolved(info=self.info(cfg), target_ratio=target_ratio, extra=extra,
                         anchor=self.info(anchor), pair=self.info(pair[0]))


@dataclass
class _ModelInfo:
    cfg: ModelConfig
    acc: Accounting
    identity_json: str  # the model part of RunConfig.identity(), canonical JSON
    flops_per_token: float
    spare_model: dict[str, Any] | None  # a model section not yet handed to a run (built once, used once)


@dataclass
class _Resolved:
    info: _ModelInfo
    target_ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # table_rows, match_error, matched
    anchor: _ModelInfo | None = None
    pair: _ModelInfo | None = None


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_LEAF_TYPES = frozenset({int, float, str, bool, type(None)})  # never dataclasses: no need to ask


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _plain(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` for frozen configs whose leaves are immutable (no deep copies)."""
    out = {}
    for name in _field_names(type(config)):
        value = getattr(config, name)
        out[name] = value if type(value) in _LEAF_TYPES or not dataclasses.is_dataclass(value) else _plain(value)
    return out


def _detached(value: Any) -> Any:
    """What ``dataclasses.asdict`` makes of a field's value: dicts, lists and tuples rebuilt, anything else
    deep-copied (the plain numbers, strings and None a plan holds are returned as they are, as deepcopy does)."""
    kind = type(value)
    if kind in _LEAF_TYPES:
        return value
    if kind is dict:
        return {key: _detached(item) for key, item in value.items()}
    if kind is list:
        return [_detached(item) for item in value]
    return dataclasses.asdict(_Boxed(value))["value"]  # anything else: asdict's own rules


@dataclass
class _Boxed:
    value: Any


def _copy(value: Any) -> Any:
    """A copy of plain nested dicts (faster than deepcopy; leaves are immutable)."""
    if isinstance(value, dict):
        return {k: v if type(v) in _LEAF_TYPES else _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [v if type(v) in _LEAF_TYPES else _copy(v) for v in value]
    return value


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block, then restore it as it was.

    Expansion builds tens of thousands of small dicts and keeps them all (the plan holds them), none in a
    reference cycle; each full collection walked every one of them again, a sixth of the expansion time for
    10,000 runs. Memory is unaffected (reference counting frees what is dropped); cycles made meanwhile wait
    for the next collection."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def expand(sweep: Sweep) -> Plan:
    """Every point of ``sweep`` as a planned run (matched, deduplicated) or a skipped point with its
    reason."""
    with _collector_paused():
        return _expand(sweep)


def _expand(sweep: Sweep) -> Plan:
    try:
        expander = _Expander(sweep)
    except ConfigError as exc:  # load_sweep has checked all of this; a hand-built Sweep may not have
        raise ConfigError(f"{sweep.path}: {exc.field}" if sweep.path else exc.field, exc.message) from None
    plan = Plan(name=sweep.name, executor=dict(sweep.executor), slurm=dict(sweep.slurm), path=sweep.path)
    seen: set[str] = set()
    for raw in sweep.points():
        try:
            run, model = expander.plan_point_and_model(raw)
        except _Skip as skip:
            s = expander.settings(raw)
            plan.skipped.append(SkippedPoint(point=expander.display_point(raw, s), reason=str(skip)))
            continue
        if run.run_id in seen:
            plan.duplicates += 1
            continue
        seen.add(run.run_id)
        plan.runs.append(run)
        plan.model_configs[run.run_id] = model
    return plan


def plan_sweep(path: str) -> Plan:
    """``expand(load_sweep(path))``; errors name the file and the field."""
    return expand(load_sweep(path))


def to_run_config(run: PlannedRun, output: dict[str, Any] | None = None) -> RunConfig:
    """The :class:`RunConfig` of a planned run (``output`` as the plan fills it)."""
    data = dict(run.config)
    if output is not None:
        data["output"] = output
    return RunConfig.from_dict(data)


__all__ = [
    "DEFAULT_MFU",
    "DEFAULT_PEAK_FLOPS",
    "Plan",
    "PlannedRun",
    "SkippedPoint",
    "closest_integer",
    "expand",
    "plan_sweep",
    "to_run_config",
]
