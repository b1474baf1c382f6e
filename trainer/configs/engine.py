"""The config engine: typed trees of dataclasses read from and written to JSON / YAML, partial
trees and `--set path=value` overrides laid over them, and each value checked against the rules
its field declares (`setting`). It knows no stage: the trees are in `trainer.configs.tree`.

- `to_dict` / `from_dict` round-trip a tree through JSON or YAML.
- `apply` (a partial tree from `--config=FILE`) and `override` (`--set path=value`) check what
  they are given against the tree: an unknown key or a value of the wrong type fails with the
  key's path.
- `check` applies the value rules: every float finite, and each field's `choices` and range.

Model Garden's own `hyperparams.Config` is not the base: with tf-models-official 2.17 it accepted
the string 'abc' for an int field, named an unknown key without its path, and could not hold a
dict field (the CTR model's hash bins). These dataclasses keep its design with those checks.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import tensorflow as tf
import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that does not fit its tree; the message names the key's path."""


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            choices: tuple[str, ...] = (), low: float | None = None, high: float | None = None,
            positive: bool = False) -> Any:
    """A config field with its value rules beside it (`check` applies them): `choices`, the
    strings it may hold; `low` / `high`, inclusive bounds (of each element of a tuple or of each
    value of a mapping); `positive`, greater than 0. `factory` makes a mutable default."""
    metadata: dict[str, Any] = {}
    if choices:
        metadata["choices"] = choices
    if positive:
        metadata["positive"] = True
    elif low is not None or high is not None:
        metadata["range"] = (low, high)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _is_optional(hint: Any) -> bool:
    """`Optional[X]` or `X | None`."""
    return (typing.get_origin(hint) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(hint))


def _strip_optional(hint: Any) -> Any:
    return next(a for a in typing.get_args(hint) if a is not type(None))


def to_dict(cfg: Any) -> dict:
    """The tree as plain JSON/YAML values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    return out


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def from_dict(cls: type[T], d: Any, path: str = "") -> T:
    """A `cls` tree from plain values; unset keys keep their defaults."""
    return apply(cls(), d, path)


def apply(cfg: T, d: Any, path: str = "", source: str = "") -> T:
    """`cfg` with the (partial) tree `d` laid over it; `source` (a file) prefixes errors."""
    where = f"{source}: " if source else ""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}{path or 'the config'} must be a mapping, got "
                          f"{type(d).__name__}")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name: f for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    changes = {}
    for key, value in d.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{where}unknown key '{full}'; {path or 'the top level'} has: "
                              f"{', '.join(fields)}")
        current = getattr(cfg, key)
        changes[key] = _value(hints[key], value, current, full, fields[key], where)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def _value(hint: Any, value: Any, current: Any, path: str, field: Any, where: str) -> Any:
    """`value` checked against `hint` (and the field's choices)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_optional(hint):
        if value is None:
            return None
        hint = _strip_optional(hint)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        section: Any = hint
        return apply(current if current is not None else section(), value, path,
                     where.rstrip(": "))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_scalar(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise ConfigError(f"{where}{path}: expected {len(args)} values, got {value!r}")
            items = [_scalar(a, v, f"{path}[{i}]", where) for i, (a, v) in
                     enumerate(zip(args, value, strict=True))]
        else:
            items = list(value)
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{path}: expected a mapping, got {value!r}")
        kt, vt = args or (str, Any)
        return {_scalar(kt, k, f"{path}.{k}", where): _scalar(vt, v, f"{path}.{k}", where)
                for k, v in value.items()}
    out = _scalar(hint, value, path, where)
    choices = field.metadata.get("choices") if field is not None else None
    if choices and out not in choices:
        raise ConfigError(f"{where}{path}: '{out}' is not one of {', '.join(choices)}")
    return out


def _scalar(hint: Any, value: Any, path: str, where: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{where}{path}: expected {getattr(hint, '__name__', hint)}, got "
                           f"{value!r} ({type(value).__name__})")

    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        # YAML 1.1 reads '1e-3' as a string: accept what parses as a number.
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise ConfigError(f"{where}{path}: unsupported config type {hint}")


def _parse_text(text: str) -> Any:
    """A `--set` value: YAML scalars, lists and mappings ('5e-4', 'true', '[1, 2]',
    '{user_id: 97}'); comma-separated values are a list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value and not text.lstrip().startswith(("'", '"')):
        return [yaml.safe_load(x) for x in value.split(",")]
    return value


def override(cfg: T, path: str, value: Any) -> T:
    """`cfg` with the key at `path` ('train.learning_rate') set; a string `value` is parsed as
    `--set` gives it."""
    if isinstance(value, str):
        parsed = _parse_text(value)
        leaf = _leaf_hint(cfg, path)
        if leaf is str or (_is_optional(leaf) and _strip_optional(leaf) is str):
            parsed = value  # a string field takes the text as it is
        elif leaf in (tuple, list) or typing.get_origin(leaf) in (tuple, list):
            parsed = parsed if isinstance(parsed, list) else [parsed]
        value = parsed
    tree: Any = value
    for key in reversed(path.split(".")):
        tree = {key: tree}
    return apply(cfg, tree)


def _leaf_hint(cfg: Any, path: str) -> Any:
    """The type hint of the key at `path`, None where the path does not exist (apply says so)."""
    node_type: Any = type(cfg)
    hint: Any = None
    for key in path.split("."):
        if not dataclasses.is_dataclass(node_type):
            return None
        hints = typing.get_type_hints(node_type)
        if key not in hints:
            return None
        hint = hints[key]
        node_type = hint
        if _is_optional(hint):
            node_type = _strip_optional(hint)
    return hint


def read_file(path: str, what: str = "config") -> dict:
    """A YAML or JSON file (YAML is a superset of JSON) holding a mapping; `what` it is names it
    in errors."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{what} file {path} does not exist")
    with tf.io.gfile.GFile(path) as f:
        try:
            d = yaml.safe_load(f.read())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not YAML or JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a {what} file holds a mapping at the top level")
    return d


def check(cfg: T, path: str = "", source: str = "") -> T:
    """`cfg` if every value in the tree is allowed (finite floats, each field's `setting`
    rules), else a `ConfigError` naming the first offending key's path; returns `cfg`."""
    where = f"{source}: " if source else ""
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        full = f"{path}.{f.name}" if path else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value, full, source)
            continue
        values = (list(value.values()) if isinstance(value, dict) else list(value)
                  if isinstance(value, (tuple, list)) else [value])
        positive = f.metadata.get("positive", False)
        low, high = f.metadata.get("range", (None, None))
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                raise ConfigError(f"{where}{full}: {v} is not a finite number")
            if positive and v <= 0:
                raise ConfigError(f"{where}{full}: {v} is out of range (must be greater than 0)")
            if (low is not None and v < low) or (high is not None and v > high):
                bound = (f"at least {low}" if high is None else f"at most {high}"
                         if low is None else f"between {low} and {high}")
                raise ConfigError(f"{where}{full}: {v} is out of range (must be {bound})")
    return cfg
