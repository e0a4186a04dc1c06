"""Config, run and sweep files are data: the one YAML reader, and the builder of validated frozen dataclasses.

:func:`read_yaml` reads a file with :class:`DataLoader`, a ``yaml.SafeLoader`` (no tags, no objects) that also
reads ``3e-3`` and ``2e9`` as numbers, as YAML 1.2 does (PyYAML's 1.1 rules would make them strings). A file that
is missing, unreadable, binary, not UTF-8, not YAML or empty is a :class:`ConfigError` naming the file.
:func:`build_dataclass` turns a mapping into a frozen dataclass, rejecting unknown keys and wrong types with
errors that name the field by its dotted path.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from embscale.base.errors import ConfigError


class DataLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``3e-3`` and ``2e9`` as numbers (YAML 1.2). Nothing else changes."""


DataLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path, what: str, shown: str | None = None) -> Any:
    """The data in a YAML file; errors name the file as ``shown`` (default: the path as given)."""
    path = Path(path)
    shown = shown or str(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(shown, f"is a folder, not a {what}") from None
    except FileNotFoundError:
        raise ConfigError(shown, f"no such {what} (cannot read it)") from None
    except OSError as exc:
        raise ConfigError(shown, f"cannot read {what}: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise ConfigError(shown, f"is a binary file, not a {what} (YAML text)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(shown, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                 f"a {what} is YAML text") from None
    try:
        data = yaml.load(text, Loader=DataLoader)  # a SafeLoader: data only
    except yaml.YAMLError as exc:
        raise ConfigError(shown, f"not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(shown, f"the {what} is empty")
    return data


def load_config_file(path: str | Path, build: Callable[[Any], Any], what: str) -> Any:
    """``build(data)`` for the data in a YAML file; every error names the file (and the field)."""
    data = read_yaml(path, what)
    try:
        return build(data)
    except ConfigError as exc:
        raise exc.in_file(str(path)) from None


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(field, message)


def _check_type(value: Any, annotation: Any, field_path: str) -> Any:
    """Check ``value`` against a field annotation; nested dataclasses are built recursively."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            _require(type(None) in args, field_path, "must not be null")
            return None
        non_none = [a for a in args if a is not type(None)]
        return _check_type(value, non_none[0], field_path)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, field_path)
    if annotation is bool:
        _require(isinstance(value, bool), field_path, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), field_path,
                 f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), field_path,
                 f"must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        _require(isinstance(value, str), field_path, f"must be a string, got {value!r}")
        return value
    return value


@functools.cache
def _fields_of(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """A config dataclass's resolved type hints and fields, computed once per class (``get_type_hints`` evaluates
    every annotation string, which dominated planning 10,000 models)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Build a frozen config dataclass from plain data, rejecting unknown keys and wrong types.

    Errors name the field by its dotted path under ``prefix``.
    """
    where = prefix or cls.__name__
    _require(isinstance(data, dict), where, f"must be a mapping, got {type(data).__name__}")
    hints, known = _fields_of(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(path, f"unknown key; known keys are {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(value, hints[name], path)
    missing = [n for n, f in known.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        path = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(path, "is required")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.under(prefix) from None


__all__ = ["DataLoader", "build_dataclass", "load_config_file", "read_yaml"]
