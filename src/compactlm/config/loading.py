"""From YAML and `key=value` overrides to a validated Config, and back: type coercion with dotted-path errors
(finite numbers, int64 range, `~` expanded in path keys), and the resolved config written beside every output."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from compactlm.config.schema import INT_LIMIT, Config, InvalidValue, Size
from compactlm.errors import CompactLMError


def _type_name(tp: Any) -> str:
    if tp == Size:
        return "a size (an int, a fraction in (0, 1], or a list of them: a cascade)"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists to tuples, ints to floats). Numbers
    must be finite (no NaN or infinity: a NaN learning rate or ridge wrote a model of NaN) and fit in int64."""
    value = _convert_type(value, tp, path)
    if isinstance(value, float) and not math.isfinite(value):
        raise CompactLMError(f"{path}: {value!r} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT < value < INT_LIMIT:
        raise CompactLMError(f"{path}: {value!r} is out of range (at most 2^63 - 1 in size)")
    return value


def _convert_type(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        plain = [a for a in args if isinstance(a, type) and a is not type(None)]
        for arg in plain:  # exact types first: 3 stays an int in int|float
            if isinstance(value, arg) and not (arg is int and isinstance(value, bool)):
                return value
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert_type(value, arg, path)
            except CompactLMError:
                pass
        raise CompactLMError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CompactLMError(f"{path}: expected a list, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise CompactLMError(f"{path}: expected {len(item_types)} items, got {value!r}")
        return tuple(_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, str) and value.strip()[-1:] in "KMB" and value.strip()[:-1].replace(".", "").isdigit():
        return int(float(value.strip()[:-1]) * {"K": 1e3, "M": 1e6, "B": 1e9}[value.strip()[-1]])  # "70M"
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise CompactLMError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys with their dotted path."""
    if not isinstance(data, dict):
        raise CompactLMError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise CompactLMError(f"unknown config key '{dotted}'")
        value = _convert(value, hints[key], dotted)
        if fields[key].metadata.get("path"):  # a str, None, or a tuple of str
            value = tuple(map(os.path.expanduser, value)) if isinstance(value, tuple) else value and os.path.expanduser(value)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise CompactLMError(f"{dotted}: {value!r} is not one of {', '.join(map(str, choices))}")
        kwargs[key] = value
    for name, f in fields.items():  # nested sections keep their defaults when absent
        if name not in kwargs and dataclasses.is_dataclass(hints[name]) and f.default is not dataclasses.MISSING:
            kwargs[name] = f.default
    try:
        return cls(**kwargs)
    except InvalidValue as e:  # a range check in __post_init__: name the key with its dotted path
        dotted = f"{path}.{e.key}" if path else e.key
        raise CompactLMError(f"{dotted}={e.value!r}: {e.message}") from None


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) that `from_dict` reads back to an equal config."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {
        f.name: to_dict(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name)) else plain(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
    }


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=3", "c=x"]` -> nested dict; values parsed as YAML scalars or lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise CompactLMError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CompactLMError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CompactLMError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CompactLMError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CompactLMError(f"config file {path} must hold a mapping of keys")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = Config) -> Any:
    """YAML file (optional) + `key=value` overrides -> a validated frozen config."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, _merge(data, parse_overrides(list(overrides))))


# The size keys that may list one size per step of a cascade (`compactlm run` only).


def save_config(cfg: Any, path: str | Path, header: Sequence[str] = ()) -> None:
    """Write the resolved config beside a run's outputs, `header` lines first as YAML comments."""
    comments = "".join(f"# {line}\n" for line in header)
    Path(path).write_text(comments + yaml.safe_dump(to_dict(cfg), sort_keys=False))
