"""Typed configuration: dataclass sections, a TOML file, and command-line overrides.

Precedence, stated once: command-line flags > the TOML file > the dataclass defaults.
Every field is declared once, with `opt()`: its default, its help text, and optionally its allowed values
(`choices=`), its range (`check=`) and its command-line flag (`flag=`), from which `click_options` makes the
click option. Errors name the field as `section.key` so the user knows what to fix.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple


class ConfigError(ValueError):
    pass


# the ranges `opt(check=...)` names; the name is also the end of the error message ("must be positive")
RANGES: dict[str, Callable[[Any], bool]] = {
    "positive": lambda v: v > 0,
    "at least 1": lambda v: v >= 1,
    "0 or more": lambda v: v >= 0,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def opt(default, help: str, *, flag: str | tuple[str, ...] | None = None, choices: tuple | None = None,
        check: str | None = None, **kw):
    """A config field with its documentation.

    flag: the long command-line flag (e.g. "--model"), or a tuple of it and its aliases; a bool field gets
    the pair --x/--no-x. choices: the allowed values. check: a key of RANGES. None (an unset optional field)
    passes both checks."""
    meta = {"help": help, **kw}
    if flag is not None:
        meta["flag"] = (flag,) if isinstance(flag, str) else tuple(flag)
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        if check not in RANGES:
            raise ValueError(f"unknown check {check!r} (known: {', '.join(RANGES)})")
        meta["check"] = check
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _one_of(value: Any, choices: tuple, name: str) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))} (got {value!r})")


def _check_field(value: Any, meta: typing.Mapping, name: str) -> None:
    """The field's `choices` and `check` of opt(); None is an unset optional field and passes."""
    if value is None:
        return
    if "choices" in meta:
        _one_of(value, meta["choices"], name)
    rule = meta.get("check")
    if rule is not None and not RANGES[rule](value):
        raise ConfigError(f"{name} must be {rule} (got {value})")


def load_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
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
        _one_of(value, typing.get_args(tp), name)
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list (got {value!r})")
        if item in (int, float):  # a flag's "0.75,0.25": numbers split on commas
            value = [x for v in value for x in (v.split(",") if isinstance(v, str) else [v])]
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
    for f in dataclasses.fields(cls):
        _check_field(getattr(obj, f.name), f.metadata, f"{prefix}.{f.name}" if prefix else f.name)
    validate = getattr(obj, "validate", None)  # what involves more than one field, or more than a range
    if validate is not None:
        validate()
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


def _leaves(cls, prefix: str = ""):
    """(dotted name, field, type) of every field that is not a section, nested sections flattened, in order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], name)
        else:
            yield name, f, hints[f.name]


def describe(cls, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(name, default, help) of every field, nested sections flattened: for docs and --help."""
    return [(name, _default(f), f.metadata.get("help", "")) for name, f, _ in _leaves(cls, prefix)]


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


# ---- the command line, generated from the fields that have a flag -----------------------------------------
class Flag(NamedTuple):
    param: str          # the name click passes the value as: --micro-batch-size -> micro_batch_size
    key: str            # the dotted config key: train.micro_batch_size
    decls: tuple[str, ...]
    field: dataclasses.Field
    type: Any


def flags(cls) -> list[Flag]:
    """Every field of dataclass `cls` (nested sections included) that has a flag, in field order."""
    out, seen = [], {}
    for key, f, tp in _leaves(cls):
        decls = f.metadata.get("flag")
        if not decls:
            continue
        param = decls[0].lstrip("-").replace("-", "_")
        for name in (param, *decls):
            if name in seen:
                raise ValueError(f"{key} and {seen[name]} both use {name}")
            seen[name] = key
        out.append(Flag(param, key, decls, f, tp))
    return out


def _click_option(flag: Flag):
    """The click option of one field: its type from the annotation, its help from the field, default None
    (a flag that is not given overrides nothing)."""
    import click
    tp, meta = flag.type, flag.field.metadata
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{flag.key}: no command-line type for {tp}")
        tp = args[0]
    decls, kw = list(flag.decls), {}
    if typing.get_origin(tp) is list:
        # repeatable (--cache-dir A --cache-dir B); numbers also as one "0.75,0.25", split by _coerce
        (item,) = typing.get_args(tp)
        if item not in (int, float, str):
            raise TypeError(f"{flag.key}: no command-line type for {tp}")
        kw["multiple"] = True
    elif tp is bool:
        decls = [f"{d}/--no-{d[2:]}" for d in decls]
    elif "choices" in meta:
        kw["type"] = click.Choice(meta["choices"])
    elif typing.get_origin(tp) is Literal:
        kw["type"] = click.Choice(typing.get_args(tp))
    elif tp in (int, float, str):
        kw["type"] = tp
    else:
        raise TypeError(f"{flag.key}: no command-line type for {tp}")
    default = _default(flag.field)
    shown = (f"--{'' if default else 'no-'}{flag.decls[0][2:]}" if isinstance(default, bool) else default)
    help = meta.get("help", "") + (f"  [default: {shown}]" if default not in (None, "", []) else "")
    return click.option(*decls, flag.param, default=None, help=help, **kw)


def click_options(cls) -> Callable:
    """A decorator that adds to a click command one option per field of `cls` that has a flag."""
    options = [_click_option(f) for f in flags(cls)]

    def decorate(fn):
        for option in reversed(options):  # click lists options in decorator order, top first
            fn = option(fn)
        return fn
    return decorate


def flag_overrides(cls, values: dict) -> dict:
    """The dotted overrides ({"model.preset": "124m", ...}) of the values click passed for `cls`'s flags;
    a flag that was not given (None) is left out."""
    keys = {f.param: f.key for f in flags(cls)}
    return {keys[name]: v for name, v in values.items() if v is not None and v != ()}  # (): a repeatable flag not given
