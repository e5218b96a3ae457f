"""Typed configuration: dataclass sections, a TOML file, and command-line overrides.

Precedence, stated once: command-line flags > the TOML file > the dataclass defaults.
Every field carries its help text in `field(metadata={"help": ...})`; errors name the field as
`section.key` so the user knows what to fix.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    pass


def opt(default, help: str, **kw):
    """A config field with its documentation."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def load_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))} (got {value!r})")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list (got {value!r})")
        return [_coerce(v, item, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer (got {value!r})")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer (got {value!r})")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):  # nan would pass every range check after it
            return number
        raise ConfigError(f"{name} must be a finite number (got {value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string (got {value!r})")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, name)
    raise ConfigError(f"{name}: unsupported type {tp}")


def build(cls, data: dict | None, prefix: str = ""):
    """An instance of dataclass `cls` from a (nested) dict; unknown keys and bad types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):  # e.g. `model = "124m"` at the top of run.toml instead of a [model] table
        raise ConfigError(f"{prefix or 'config'} must be a table (got {data!r})")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            name = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data.pop(f.name), hints[f.name], name)
    if data:
        key = sorted(data)[0]
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        where = f"{prefix}.{key}" if prefix else key
        raise ConfigError(f"unknown config key {where} (known: {known})")
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def merge(base: dict, overrides: dict) -> dict:
    """Overlay `overrides` (dotted or nested keys) on `base`; None values mean 'not given'."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[parts[-1]] = value
    return out


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def describe(cls, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(name, default, help) of every field, nested sections flattened: for docs and --help."""
    rows = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((name, default, f.metadata.get("help", "")))
    return rows
