"""Sweep files: what to train, as data (YAML read safely), validated before anything runs.

A sweep file names a base model, how to train it, and the axes to vary; :func:`embscale.sweeps.expand.expand` turns it
into parameter-matched runs. Every error is a :class:`embscale.base.errors.ConfigError` whose field is the path of
the bad value, prefixed with the file name when it comes from a file
(``sweeps/x.yaml: grid.ratio[2]: must be greater than 1, got 1``).

Sections (unknown keys are rejected, naming them)::

    name: paper_280m          # results go to results/<name>/; default: the file's stem (never inherited)
    description: free text    # optional
    extends: base.yaml        # optional: inherit another sweep file (path relative to this file)
    model:                    # the base backbone: ModelConfig fields, or the shorthands below
      vocab_size: 32768       # default: data.vocab_size (the planned model always states it)
      width: 768              # = d_model
      depth: 6                # = n_layers
      head_dim: 64            # n_heads = width / head_dim (or heads: 12)
      layer_type: shortcut
      dense_mult: 2.0         # dense_hidden = round(2.0 * width)   (or dense_hidden: 1536)
      expert_mult: 0.5        # expert_hidden = round(0.5 * width)  (or expert_size / expert_hidden)
      experts: 32             # = n_experts; the MoE ladder replaces it by the count matching each ratio
      top_k: 8
      zero_expert_ratio: 0.5  # n_zero_experts = round(0.5 * n_experts), kept as experts are added
    ngram: {n: 3, k: 2, sizing: paper, amplification: sqrt_d}   # NE settings of ne/plne runs
    per_layer: {targets: first}   # the dense MLP of a shortcut layer that takes the PLE/PLNE embedding
    training:                 # RunConfig.training (training/config.py), after resolving:
      tokens: 2.0e9           #   a token count, or
      tokens_per_activated: 20    # 20 x the run's activated parameters, rounded up to whole batches,
      batch_tokens: 65536     #   or steps: 1000
      lr: {rule: inverse_width, base: 3.0e-3, base_width: 256}   # or a number; the lr axis overrides it
      ...                     #   everything else (schedule, seq_len, eval cadence) passes through
    data: {...}               # RunConfig.data unchanged (corpus, tokenizer)
    output: {tracking: [tensorboard]}   # RunConfig.output's tracking and log_interval_s for every run (root and
                              #   sweep are the plan's: <results>/<name>/); not part of the run id
    grid: {family: [moe, ne], ratio: [8, 16, 24], base_ratio: [8]}   # crossed
    zip: {width: [256, 512], depth: [4, 8]}    # zipped (equal lengths); a list of such groups is allowed
    limits: {max_ne_share: 0.6, match_tolerance: 0.005, ratio_tolerance: 0.05, max_points: 1000000}
    executor: {...}           # where runs train by default (sweeps/sections.py: type, cpu_jobs, ...)
    slurm: {...}              # sbatch settings (sweeps/sections.py: partition, time, gpus_per_node, ...)
    tune: {...}               # the `embscale tune` search (sweeps/sections.py; param, low and high may
                              #   come from the command line)

Model shorthands: ``width`` = ``d_model``, ``depth`` = ``n_layers``, ``heads`` = ``n_heads``, ``kv_heads`` =
``n_kv_heads``, ``experts`` = ``n_experts``, ``zero_experts`` = ``n_zero_experts``, ``shared_experts`` =
``n_shared_experts``, ``expert_size`` = ``expert_hidden``, ``layer`` = ``layer_type``. Width-relative sizes
(so a ``width`` axis keeps the shape): ``head_dim``, ``dense_mult``, ``expert_mult``; ``zero_expert_ratio``
keeps zero experts a fixed fraction of the real ones as the ladder adds experts (LongCat-Flash: 256 + 128).
The model section must describe a valid model on its own (axes may then change it); it may not carry
``ngram`` or ``per_layer``: the ``family`` axis decides which runs get embedding scaling, from the top-level
``ngram`` / ``per_layer`` sections.

Axes (``grid`` and ``zip``; a value may be a list or a single value; ``null`` means "not set" where allowed):
``family`` (moe, ne, ple, plne, dense), ``width``, ``depth``, ``ratio`` (target total / activated),
``base_ratio`` (the MoE ratio an embedding-scaled run is anchored at), ``ne_share`` (instead of ``ratio``: the
NE share of the total), ``table_ratio`` (instead of ``ratio``: a fixed NE table ratio, not solved), ``n``,
``k``, ``sizing``, ``amplification`` (NE settings), ``targets`` (PLE/PLNE), ``seed``, ``lr``. An axis in
neither takes the value of the file's sections (family: ``moe``).

``extends``: the parent is loaded first (recursively; cycles and missing parents are errors naming the
file), then this file is deep-merged over it: mappings merge key by key, anything else (lists included)
replaces, and ``null`` deletes the inherited key. ``name`` and ``description`` are never inherited.

Numbers: the file is read with :class:`SweepLoader`, a ``yaml.SafeLoader`` that also reads ``3e-3`` and
``2e9`` as numbers (PyYAML's YAML 1.1 rules would make them strings).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embscale.base.datafile import build_dataclass, read_yaml
from embscale.base.errors import ConfigError
from embscale.models.config import AMPLIFICATIONS, PER_LAYER_TARGETS, SIZING_POLICIES, ModelConfig
from embscale.sweeps.sections import check_tune_section, executor_options, slurm_parameters
from embscale.training.config import DataConfig, OutputConfig, TrainingConfig

FAMILIES = ("moe", "ne", "ple", "plne", "dense")
SWEEP_DIR = Path(__file__).resolve().parent  # the sweep files that ship with embscale (demo.yaml, ...)

TOP_LEVEL_KEYS = ("name", "description", "extends", "model", "ngram", "per_layer", "training", "data", "output",
                  "grid", "zip", "limits", "slurm", "executor", "tune")
OUTPUT_KEYS = ("tracking", "log_interval_s")  # RunConfig.output fields a sweep sets; root and sweep are the plan's

# model shorthand -> ModelConfig field
MODEL_ALIASES = {
    "width": "d_model",
    "depth": "n_layers",
    "heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "experts": "n_experts",
    "zero_experts": "n_zero_experts",
    "shared_experts": "n_shared_experts",
    "expert_size": "expert_hidden",
    "layer": "layer_type",
}
# width-relative rules -> the ModelConfig field they set (giving both is an error)
MODEL_RULES = {
    "head_dim": "n_heads",
    "dense_mult": "dense_hidden",
    "expert_mult": "expert_hidden",
    "zero_expert_ratio": "n_zero_experts",
}
NGRAM_KEYS = ("n", "k", "sizing", "amplification")
PER_LAYER_KEYS = ("targets",)
LIMIT_DEFAULTS = {"max_ne_share": None, "match_tolerance": 0.005, "ratio_tolerance": 0.05,
                  "max_points": 1_000_000}
LR_RULES = ("inverse_width", "inverse_sqrt_width")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------------------
# Small validators (each raises ConfigError naming the path)
# ----------------------------------------------------------------------------------------------------------

def _fail(path: str, message: str) -> None:
    raise ConfigError(path, message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        _fail(path, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            _fail(path, f"keys must be strings, got {key!r}")
    return value


def _no_unknown(section: dict, known: tuple[str, ...] | list[str], path: str) -> None:
    unknown = [key for key in section if key not in known]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        _fail(where, f"unknown key; known keys are {', '.join(sorted(known))}")


def _number(value: Any, path: str, *, low: float | None = None, low_open: bool = True,
            high: float | None = None, high_open: bool = True) -> int | float:
    if not _is_number(value):
        _fail(path, f"must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        _fail(path, f"must be {'greater than' if low_open else 'at least'} {low:g}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        _fail(path, f"must be {'less than' if high_open else 'at most'} {high:g}, got {value!r}")
    return value


def _integer(value: Any, path: str, *, low: int | None = None, high: int | None = None) -> int:
    if not _is_int(value):
        _fail(path, f"must be an integer, got {value!r}")
    if low is not None and value < low:
        _fail(path, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        _fail(path, f"must be at most {high}, got {value}")
    return value


def _choice(value: Any, choices: tuple[str, ...], path: str) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(path, f"unknown value {value!r}; expected one of {', '.join(choices)}")
    return value


# axis name -> validator of one value (returns the normalised value); ``None`` accepted where listed
def _axis_validators() -> dict[str, Any]:
    return {
        "family": lambda v, p: _choice(v, FAMILIES, p),
        "width": lambda v, p: _integer(v, p, low=1),
        "depth": lambda v, p: _integer(v, p, low=1),
        "ratio": lambda v, p: _number(v, p, low=1.0),
        "base_ratio": lambda v, p: _number(v, p, low=1.0),
        "ne_share": lambda v, p: _number(v, p, low=0.0, high=1.0),
        "table_ratio": lambda v, p: _number(v, p, low=0.0),
        "n": lambda v, p: _integer(v, p, low=2, high=8),
        "k": lambda v, p: _integer(v, p, low=1, high=8),
        "sizing": lambda v, p: _choice(v, SIZING_POLICIES, p),
        "amplification": lambda v, p: _choice(v, AMPLIFICATIONS, p),
        "targets": lambda v, p: _choice(v, PER_LAYER_TARGETS, p),
        "seed": lambda v, p: _integer(v, p, low=0),
        "lr": lambda v, p: _number(v, p, low=0.0),
    }


AXIS_VALIDATORS = _axis_validators()
AXES = tuple(AXIS_VALIDATORS)
NULLABLE_AXES = ("ratio", "base_ratio", "ne_share", "table_ratio", "lr")


# ----------------------------------------------------------------------------------------------------------
# The validated sweep
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Bounds on what a sweep may plan. ``max_ne_share``: embedding-scaled points above it are skipped;
    ``match_tolerance``: the largest relative total mismatch of a matched pair (0.005 = 0.5%);
    ``ratio_tolerance``: MoE ladder points whose achieved ratio misses the target by more (relative) are
    skipped; ``max_points``: a guard against runaway grids."""

    max_ne_share: float | None = None
    match_tolerance: float = 0.005
    ratio_tolerance: float = 0.05
    max_points: int = 1_000_000


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file (after ``extends``). ``model`` holds ModelConfig fields (shorthands resolved);
    ``model_rules`` the width-relative rules (``head_dim``, ``dense_mult``, ``expert_mult``,
    ``zero_expert_ratio``); ``grid`` the crossed axes; ``zips`` the zipped groups (each a dict of equal-length
    lists); ``model_aliases`` maps ModelConfig fields back to the shorthand the file used (error paths); ``output``
    the RunConfig.output fields every run gets (``tracking``, ``log_interval_s``)."""

    name: str
    model: dict[str, Any]
    model_rules: dict[str, float]
    training: dict[str, Any]
    data: dict[str, Any]
    output: dict[str, Any] = field(default_factory=dict)
    ngram: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    zips: tuple[dict[str, list], ...] = ()
    limits: Limits = Limits()
    executor: dict[str, Any] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: str | None = None
    tune: dict[str, Any] | None = None
    model_aliases: dict[str, str] = field(default_factory=dict)

    @property
    def axes(self) -> tuple[str, ...]:
        names = list(self.grid)
        for group in self.zips:
            names.extend(group)
        return tuple(names)

    @property
    def num_points(self) -> int:
        count = 1
        for values in self.grid.values():
            count *= len(values)
        for group in self.zips:
            count *= len(next(iter(group.values()))) if group else 1
        return count

    def points(self) -> list[dict[str, Any]]:
        """Every point of the sweep: the grid crossed, each zip group zipped, grid x zips crossed. Order: grid
        axes in file order (the last varies fastest), then the zip groups."""
        factors: list[list[dict[str, Any]]] = []
        for name, values in self.grid.items():
            factors.append([{name: v} for v in values])
        for group in self.zips:
            names = list(group)
            length = len(group[names[0]]) if names else 0
            factors.append([{name: group[name][i] for name in names} for i in range(length)])
        points = []
        for combo in itertools.product(*factors):
            point: dict[str, Any] = {}
            for part in combo:
                point.update(part)
            points.append(point)
        return points

    def error_path(self, model_field: str) -> str:
        """``model.<name>`` as the file spelled it (``model.width`` for ``d_model`` when written as width)."""
        head, dot, rest = model_field.partition(".")
        return "model." + self.model_aliases.get(head, head) + dot + rest


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML, extends, deep merge
# ----------------------------------------------------------------------------------------------------------

def deep_merge(parent: dict, child: dict) -> dict:
    """``child`` over ``parent``: mappings merge key by key, other values replace, ``None`` deletes."""
    merged = copy.deepcopy(parent)
    for key, value in child.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _display(path: Path) -> str:
    """A path as the user would write it: relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path, shown: str) -> dict:
    data = read_yaml(path, "sweep file", shown)
    if not isinstance(data, dict):
        raise ConfigError(shown, f"a sweep file must be a mapping at the top level, got {type(data).__name__}")
    return data


def _load_raw(path: Path, chain: tuple[Path, ...]) -> dict:
    """The file's mapping with its ``extends`` chain merged in (``name``/``description`` never inherited)."""
    shown = _display(path)
    data = _read_yaml(path, shown)
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(shown, f"top-level keys must be strings, got {key!r}")
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str) or not parent_ref.strip():
        raise ConfigError(f"{shown}: extends",
                          f"must be a file path (relative to this file), got {parent_ref!r}")
    parent = (path.parent / parent_ref)
    resolved = parent.resolve()
    if resolved in chain or resolved == path.resolve():
        cycle = " -> ".join(_display(p) for p in (*chain, path.resolve(), resolved))
        raise ConfigError(f"{shown}: extends", f"cycle: {cycle}")
    if not parent.is_file():
        raise ConfigError(f"{shown}: extends", f"parent sweep file {_display(parent)} does not exist")
    parent_data = _load_raw(parent, (*chain, path.resolve()))
    parent_data.pop("name", None)
    parent_data.pop("description", None)
    return deep_merge(parent_data, data)


def load_sweep_mapping(path: str | Path) -> dict:
    """A sweep file's mapping with its ``extends`` chain merged in (``name``/``description`` never inherited), as
    :func:`load_sweep` reads it, before validation."""
    return _load_raw(Path(path), ())


def load_sweep(path: str | Path) -> Sweep:
    """Read, merge (``extends``) and validate a sweep file. Errors name the file and the field."""
    path = Path(path)
    shown = _display(path)
    data = _load_raw(path, ())
    data.setdefault("name", path.stem)
    try:
        return parse_sweep(data, path=shown)
    except ConfigError as exc:
        raise ConfigError(f"{shown}: {exc.field}" if exc.field else shown, exc.message) from None


# ----------------------------------------------------------------------------------------------------------
# Validation of the merged mapping
# ----------------------------------------------------------------------------------------------------------

def parse_sweep(data: Any, path: str | None = None) -> Sweep:
    """Validate a sweep mapping (``extends`` already merged). Errors name the field, not the file."""
    data = _mapping(data, "")
    _no_unknown(data, TOP_LEVEL_KEYS, "")
    if "extends" in data:
        _fail("extends", "only a sweep file read from disk may extend another")

    name = data.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        _fail("name", f"must be a name of letters, digits, '_', '.' or '-' (it names the results folder), "
                      f"got {name!r}")
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        _fail("description", f"must be a string, got {description!r}")

    grid, zips = _parse_axes(data)
    model, rules, aliases = _parse_model(data.get("model"), grid, zips)
    ngram = _parse_ngram(data.get("ngram", {}) or {})
    per_layer = _parse_per_layer(data.get("per_layer", {}) or {})
    training = _parse_training(data.get("training"))
    data_section = data.get("data", {}) or {}
    _mapping(data_section, "data")
    output = _parse_output(data.get("output", {}) or {})
    limits = _parse_limits(data.get("limits", {}) or {})
    executor = executor_options(_mapping(data.get("executor", {}) or {}, "executor"))
    slurm = dict(_mapping(data.get("slurm", {}) or {}, "slurm"))
    slurm_parameters(slurm)  # validates every key and value
    tune = None if data.get("tune") is None else dict(_mapping(data["tune"], "tune"))

    sweep = Sweep(name=name, model=model, model_rules=rules, training=training, data=dict(data_section),
                  output=output, ngram=ngram, per_layer=per_layer, grid=grid, zips=zips, limits=limits,
                  executor=dict(executor), slurm=dict(slurm), description=description, path=path,
                  model_aliases=aliases, tune=tune)
    if tune is not None:
        check_tune_section(tune, sweep.axes)
    if sweep.num_points > limits.max_points:
        _fail("grid", f"expands to {sweep.num_points} points, more than limits.max_points = "
                      f"{limits.max_points}")
    check_run_sections(sweep)
    return sweep


def _parse_axis(name: str, values: Any, path: str) -> list:
    if name not in AXIS_VALIDATORS:
        _fail(path, f"unknown axis; known axes are {', '.join(AXES)}")
    if not isinstance(values, list):
        values = [values]
    if not values:
        _fail(path, "must list at least one value")
    checked = []
    validator = AXIS_VALIDATORS[name]
    for i, value in enumerate(values):
        if value is None:
            if name not in NULLABLE_AXES:
                _fail(f"{path}[{i}]", f"must not be null (null is allowed for {', '.join(NULLABLE_AXES)})")
            checked.append(None)
        else:
            checked.append(validator(value, f"{path}[{i}]"))
    return checked


def _parse_axes(data: dict) -> tuple[dict[str, list], tuple[dict[str, list], ...]]:
    grid_raw = data.get("grid", {}) or {}
    _mapping(grid_raw, "grid")
    grid = {name: _parse_axis(name, values, f"grid.{name}") for name, values in grid_raw.items()}

    zip_raw = data.get("zip", []) or []
    if isinstance(zip_raw, dict):
        groups = [(zip_raw, "zip")]
    elif isinstance(zip_raw, list):
        groups = [(group, f"zip[{i}]") for i, group in enumerate(zip_raw)]
    else:
        _fail("zip", f"must be a mapping of equal-length lists (or a list of such mappings), got {zip_raw!r}")
    seen = {name: "grid" for name in grid}
    zips = []
    for group, where in groups:
        _mapping(group, where)
        if not group:
            _fail(where, "a zip group needs at least one axis")
        parsed: dict[str, list] = {}
        length = None
        first = None
        for name, values in group.items():
            path = f"{where}.{name}"
            if name in seen:
                _fail(path, f"axis {name!r} already appears in {seen[name]}")
            if not isinstance(values, list):
                _fail(path, f"a zipped axis must be a list, got {values!r}")
            parsed[name] = _parse_axis(name, values, path)
            if length is None:
                length, first = len(values), name
            elif len(values) != length:
                _fail(path, f"has {len(values)} values but {where}.{first} has {length}; zipped axes need "
                            "equal lengths")
            seen[name] = where
        zips.append(parsed)
    return grid, tuple(zips)


def _parse_model(raw: Any, grid: dict, zips: tuple) -> tuple[dict, dict, dict]:
    if raw is None:
        _fail("model", "is required (the base backbone)")
    raw = _mapping(raw, "model")
    known = sorted(set(ModelConfig.__dataclass_fields__) - {"ngram", "per_layer"}) + list(MODEL_ALIASES) \
        + list(MODEL_RULES)
    for key in ("ngram", "per_layer"):
        if key in raw:
            _fail(f"model.{key}", f"the base model takes no {key}; put NE settings in the top-level {key} "
                                  "section and choose runs with the family axis")
    _no_unknown(raw, known, "model")

    model: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for key, value in raw.items():
        target = MODEL_ALIASES.get(key, key)
        if key in MODEL_RULES:
            continue
        if target in model:
            other = aliases.get(target, target)
            _fail(f"model.{key}", f"same field as model.{other}; give one of them")
        model[target] = value
        if key != target:
            aliases[target] = key
    rules: dict[str, float] = {}
    for key, target in MODEL_RULES.items():
        if key not in raw:
            continue
        if target in model:
            _fail(f"model.{key}", f"sets {target}; give model.{key} or model.{aliases.get(target, target)}, "
                                  "not both")
        if key == "head_dim":
            rules[key] = _integer(raw[key], f"model.{key}", low=2)
        elif key == "zero_expert_ratio":
            rules[key] = _number(raw[key], f"model.{key}", low=0.0, low_open=False)
        else:
            rules[key] = _number(raw[key], f"model.{key}", low=0.0)

    # Validate the base model on its own; width and depth may come from an axis only (first value).
    probe = dict(model)
    for axis, name in (("width", "d_model"), ("depth", "n_layers")):
        if name not in probe:
            values = _axis_values(axis, grid, zips)
            if values:
                probe[name] = values[0]
            else:
                alias = "width" if axis == "width" else "depth"
                _fail(f"model.{alias}", f"is required (give it here or as a {axis} axis)")
    try:
        apply_model_rules(probe, rules, n_experts=probe.get("n_experts", 0))
        build_dataclass(ModelConfig, probe)
    except ConfigError as exc:
        head, dot, rest = exc.field.partition(".")
        raise ConfigError("model." + aliases.get(head, head) + dot + rest, exc.message) from None
    return model, rules, aliases


def _axis_values(axis: str, grid: dict, zips: tuple) -> list:
    if axis in grid:
        return grid[axis]
    for group in zips:
        if axis in group:
            return group[axis]
    return []


def apply_model_rules(model: dict[str, Any], rules: dict[str, float], n_experts: int) -> dict[str, Any]:
    """Fill the fields the width-relative rules set (in place; returns ``model``)."""
    width = model.get("d_model")
    if "head_dim" in rules and _is_int(width):
        head_dim = int(rules["head_dim"])
        if width % head_dim:
            raise ConfigError("head_dim", f"must divide the width {width}, got {head_dim}")
        model["n_heads"] = width // head_dim
    if "dense_mult" in rules and _is_int(width):
        model["dense_hidden"] = int(round(rules["dense_mult"] * width))
    if "expert_mult" in rules and _is_int(width):
        model["expert_hidden"] = int(round(rules["expert_mult"] * width))
    if "zero_expert_ratio" in rules:
        model["n_zero_experts"] = int(round(rules["zero_expert_ratio"] * n_experts))
    return model


def _parse_ngram(raw: Any) -> dict:
    raw = _mapping(raw, "ngram")
    _no_unknown(raw, NGRAM_KEYS, "ngram")
    return {key: AXIS_VALIDATORS[key](value, f"ngram.{key}") for key, value in raw.items()}


def _parse_per_layer(raw: Any) -> dict:
    raw = _mapping(raw, "per_layer")
    _no_unknown(raw, PER_LAYER_KEYS, "per_layer")
    return {key: AXIS_VALIDATORS[key](value, f"per_layer.{key}") for key, value in raw.items()}


def _parse_training(raw: Any) -> dict:
    if raw is None:
        _fail("training", "is required (at least tokens or tokens_per_activated)")
    raw = dict(_mapping(raw, "training"))
    given = [key for key in ("steps", "tokens", "tokens_per_activated") if raw.get(key) is not None]
    if len(given) > 1:
        _fail(f"training.{given[1]}", f"give one of training.steps, training.tokens and "
                                      f"training.tokens_per_activated, not {' and '.join(given)}")
    if not given:
        _fail("training.tokens", "is required (or training.tokens_per_activated, or training.steps)")
    if "tokens" in given:
        tokens = _number(raw["tokens"], "training.tokens", low=0.0)
        if tokens != int(tokens):
            _fail("training.tokens", f"must be a whole number of tokens, got {raw['tokens']!r}")
        raw["tokens"] = int(tokens)
    elif "steps" in given:
        _integer(raw["steps"], "training.steps", low=1)
    else:
        raw["tokens_per_activated"] = _number(raw["tokens_per_activated"], "training.tokens_per_activated",
                                              low=0.0)
    if raw.get("batch_tokens") is not None:
        _integer(raw["batch_tokens"], "training.batch_tokens", low=1)
    if raw.get("seq_len") is not None:
        _integer(raw["seq_len"], "training.seq_len", low=1)
    if raw.get("seed") is not None:
        _integer(raw["seed"], "training.seed", low=0)
    lr = raw.get("lr")
    if isinstance(lr, dict):
        _no_unknown(lr, ("rule", "base", "base_width"), "training.lr")
        if "rule" not in lr:
            _fail("training.lr.rule", f"is required; one of {', '.join(LR_RULES)}")
        _choice(lr["rule"], LR_RULES, "training.lr.rule")
        if "base" not in lr:
            _fail("training.lr.base", "is required (the learning rate at base_width)")
        _number(lr["base"], "training.lr.base", low=0.0)
        if "base_width" not in lr:
            _fail("training.lr.base_width", "is required (the width at which lr = base)")
        _integer(lr["base_width"], "training.lr.base_width", low=1)
    elif lr is not None:
        _number(lr, "training.lr", low=0.0)
    return raw


def _parse_limits(raw: Any) -> Limits:
    raw = _mapping(raw, "limits")
    _no_unknown(raw, tuple(LIMIT_DEFAULTS), "limits")
    values = dict(LIMIT_DEFAULTS)
    if raw.get("max_ne_share") is not None:
        values["max_ne_share"] = _number(raw["max_ne_share"], "limits.max_ne_share", low=0.0, high=1.0,
                                         high_open=False)
    if raw.get("match_tolerance") is not None:
        values["match_tolerance"] = _number(raw["match_tolerance"], "limits.match_tolerance", low=0.0,
                                            high=1.0)
    if raw.get("ratio_tolerance") is not None:
        values["ratio_tolerance"] = _number(raw["ratio_tolerance"], "limits.ratio_tolerance", low=0.0)
    if raw.get("max_points") is not None:
        values["max_points"] = _integer(raw["max_points"], "limits.max_points", low=1)
    return Limits(**values)


def _parse_output(raw: Any) -> dict[str, Any]:
    """The output section: the RunConfig.output fields every run of the sweep gets, validated as RunConfig will
    read them (``output.tracking`` names a known tracker, and ``wandb`` is installed)."""
    raw = dict(_mapping(raw, "output"))
    for key in ("root", "sweep"):
        if key in raw:
            _fail(f"output.{key}", "is set by the plan: results go to <results>/<name>/ (the sweep's name; the "
                                   "results folder is --results or $EMBSCALE_RESULTS, default ./results)")
    _no_unknown(raw, OUTPUT_KEYS, "output")
    try:
        checked = build_dataclass(OutputConfig, raw)
    except ConfigError as exc:
        raise exc.under("output") from None
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(checked).items() if key in raw}


def sweep_vocab_size(sweep: Sweep) -> int:
    """The vocabulary size the plan matches at: ``model.vocab_size``, else ``data.vocab_size`` (the BPE size
    the trainer builds), which the planned model then states explicitly (the trainer pads to it)."""
    if "vocab_size" in sweep.model:
        return sweep.model["vocab_size"]
    if sweep.data.get("tokenizer_path"):
        raise ConfigError("model.vocab_size", "is required when data.tokenizer_path is given (matching needs "
                                              "the exact vocabulary size)")
    return sweep.data.get("vocab_size", DataConfig.vocab_size)


def training_template(sweep: Sweep) -> tuple[dict[str, Any], str]:
    """The training section minus the fields the plan resolves per run, and how tokens are given."""
    section = dict(sweep.training)
    section.pop("tokens_per_activated", None)
    lr = section.get("lr")
    if isinstance(lr, dict):
        section.pop("lr")
    if section.get("steps") is not None:
        mode = "steps"
    elif section.get("tokens") is not None:
        mode = "tokens"
    else:
        mode = "tokens_per_activated"
    return section, mode


def check_run_sections(sweep: Sweep) -> None:
    """Validate the training and data sections once, as RunConfig will read them (with placeholders for the
    fields the plan resolves per run). Errors name ``training.<field>`` or ``data.<field>``."""
    section, mode = training_template(sweep)
    if mode == "tokens_per_activated":
        section["tokens"] = 1
    if isinstance(sweep.training.get("lr"), dict):
        section["lr"] = sweep.training["lr"]["base"]
    try:
        training = build_dataclass(TrainingConfig, section)
    except ConfigError as exc:
        raise exc.under("training") from None
    try:
        build_dataclass(DataConfig, sweep.data)
    except ConfigError as exc:
        raise exc.under("data") from None
    max_seq_len = sweep.model.get("max_seq_len", ModelConfig.max_seq_len)
    if training.seq_len > max_seq_len:
        raise ConfigError("training.seq_len", f"must not exceed model.max_seq_len {max_seq_len}, got "
                                              f"{training.seq_len}")
    sweep_vocab_size(sweep)


__all__ = [
    "AXES",
    "FAMILIES",
    "Limits",
    "MODEL_ALIASES",
    "MODEL_RULES",
    "SWEEP_DIR",
    "Sweep",
    "apply_model_rules",
    "check_run_sections",
    "deep_merge",
    "load_sweep",
    "load_sweep_mapping",
    "parse_sweep",
    "sweep_vocab_size",
    "training_template",
]
