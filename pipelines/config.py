"""Run configs: YAML files loaded into trees of typed dataclasses, with ``--set a.b=c`` overrides.

Any dataclass tree works; the field types are the schema. Loading is strict, because a run that
starts on a misspelt key or a wrong value and fails an hour later on a cluster costs far more than
an error at submission:

- an unknown key is rejected with its dotted path and the keys that would have been accepted
  (``train.optimizer.lrr: unknown key; expected one of ['betas', 'lr', ...]``);
- a value is coerced to its field's type (``"5e5"`` -> 500000 for an int, ``"true"`` -> True) and
  rejected, naming the key and the expected type, when it does not fit;
- a dataclass's own ``__post_init__`` checks run as it is built; their errors are re-raised with the
  dotted path of that dataclass in front.

``--set`` values are parsed as YAML (``--set data.sources.0.weight=0.5``, ``--set a.b=[1,2]``,
``--set a.b=null``), except for string fields, which take the text as written so that a run name
such as ``007`` stays a string. Integer path parts index into lists.

The resolved config (every field, defaults included) dumps to YAML and JSON, and hashes to a stable
digest for lineage tags: the hash depends on the values only, not on key order or on how they were
written.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, TypeVar

import yaml

from pipelines.errors import UserError

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(UserError, ValueError):
    """A config that does not fit its schema; the message starts with the key's dotted path."""


# -------------------------------------------------------------------------------------------------
# Building dataclasses from plain data
# -------------------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build ``cls`` (a dataclass) from a mapping, checking keys and coercing values recursively."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(path)}expected {_type_name(cls)}, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(
            f"{_join(path, unknown[0])}: unknown key; expected one of {sorted(fields)}"
        )
    kwargs = {name: coerce(value, hints[name], _join(path, name)) for name, value in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(path, missing[0])}: required key missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:  # __post_init__ checks, re-raised with their place
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{path or cls.__name__}: {error}") from error


def coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` converted to the type ``tp``, or a ConfigError naming ``path`` and ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Literal:
        return _coerce_literal(value, args, path)
    if origin is typing.Union or origin is types.UnionType:
        return _coerce_union(value, args, path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return _coerce_sequence(value, tp, origin, args, path)
    if origin in (dict, Mapping) or tp is dict:
        return _coerce_mapping(value, args, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _coerce_enum(value, tp, path)
    if tp in _SCALARS:
        return _SCALARS[tp](value, path)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise ConfigError(f"{path}: expected a path, got {_show(value)}")
    raise ConfigError(f"{path}: unsupported field type {tp!r} in the config schema")


def _coerce_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{path}: expected a boolean (true/false), got {_show(value)}")


def _coerce_int(value: Any, path: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)  # "5e5" is a fine way to write 500000
            except ValueError:
                raise ConfigError(f"{path}: expected an integer, got {_show(value)}") from None
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise ConfigError(f"{path}: expected an integer, got {_show(value)}")


def _coerce_float(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a number, got {_show(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # PyYAML reads "1e-3" (no dot) as a string; a float field still means a number.
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{path}: expected a number, got {_show(value)}")


def _coerce_str(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    # No silent str(): `name: 1.10` would become "1.1", and `name: no` would become "False".
    raise ConfigError(f"{path}: expected a string, got {_show(value)} (quote it in YAML)")


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce_literal(value: Any, choices: tuple[Any, ...], path: str) -> Any:
    for choice in choices:
        try:
            candidate = _SCALARS[type(choice)](value, path) if type(choice) in _SCALARS else value
        except ConfigError:
            continue
        if candidate == choice and type(candidate) is type(choice):
            return choice
    raise ConfigError(f"{path}: expected one of {list(choices)}, got {_show(value)}")


def _coerce_union(value: Any, args: tuple[Any, ...], path: str) -> Any:
    is_null = value is None or (isinstance(value, str) and value in ("null", "~", "None"))
    if is_null and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if value is None:
        raise ConfigError(f"{path}: expected {_type_name(options)}, got null")
    # Prefer an exact type match (an int for int | str), then try each in declaration order.
    for option in options:
        if isinstance(option, type) and type(value) is option:
            return value
    errors = []
    for option in options:
        try:
            return coerce(value, option, path)
        except ConfigError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    raise ConfigError(f"{path}: expected {_type_name(options)}, got {_show(value)}")


def _coerce_sequence(value: Any, tp: Any, origin: Any, args: tuple[Any, ...], path: str) -> Any:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"{path}: expected a list, got {_show(value)}")
    is_tuple = origin is tuple or tp is tuple
    if is_tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(
            coerce(v, a, f"{path}.{i}") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    item = args[0] if args else Any
    items = [coerce(v, item, f"{path}.{i}") for i, v in enumerate(value)]
    return tuple(items) if is_tuple else items


def _coerce_mapping(value: Any, args: tuple[Any, ...], path: str) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
    key_type, value_type = args if args else (Any, Any)
    return {
        coerce(k, key_type, f"{path}.{k}"): coerce(v, value_type, f"{path}.{k}")
        for k, v in value.items()
    }


def _coerce_enum(value: Any, tp: type[enum.Enum], path: str) -> enum.Enum:
    if isinstance(value, tp):
        return value
    for member in tp:
        if value in (member.value, member.name):
            return member
    raise ConfigError(f"{path}: expected one of {[m.value for m in tp]}, got {_show(value)}")


# -------------------------------------------------------------------------------------------------
# Overrides
# -------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, str]:
    """``"a.b=c"`` -> ``("a.b", "c")``; the value may itself contain ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.steps=100")
    return key.strip(), value


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of the dataclass ``cfg`` with ``KEY=VALUE`` overrides applied, re-validated."""
    data = to_dict(cfg)
    for text in overrides:
        key, raw = parse_override(text)
        _set_path(data, type(cfg), key.split("."), raw, key)
    return from_dict(type(cfg), data)


def _set_path(data: Any, tp: Any, parts: list[str], raw: str, key: str) -> None:
    """Walk ``parts`` through ``data`` (plain dicts/lists) guided by the type ``tp``; set the leaf."""
    done: list[str] = []
    for i, part in enumerate(parts):
        tp = _strip_optional(tp)
        last = i == len(parts) - 1
        where = ".".join([*done, part])
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp) if f.init]
            if part not in names:
                prefix = f"{'.'.join(done)}." if done else ""
                raise ConfigError(f"{prefix}{part}: unknown key; expected one of {sorted(names)}")
            child_tp = _hints(tp)[part]
            container, index = data, part
        elif typing.get_origin(tp) in (list, tuple, Sequence):
            if not part.lstrip("-").isdigit() or not -len(data) <= int(part) < len(data):
                raise ConfigError(f"{where}: expected an index into a list of {len(data)} items")
            child_tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
            container, index = data, int(part)
        elif typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Any):
            args = typing.get_args(tp)
            child_tp = args[1] if args else Any
            container, index = data, part
        else:
            raise ConfigError(
                f"{'.'.join(done)}: has type {_type_name(tp)}, which has no key {part!r}"
            )
        if last:
            container[index] = _parse_value(raw, child_tp)
            return
        if isinstance(container, Mapping) and container.get(index) is None:
            container[index] = {}  # an unset optional section: start it from its defaults
        data, tp = container[index], child_tp
        done.append(part)
    raise ConfigError(f"{key}: empty key")


def _parse_value(raw: str, tp: Any) -> Any:
    """The override's text as a YAML value, except for string-typed fields (kept verbatim)."""
    if _strip_optional(tp) is str and raw not in ("null", "~"):
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


# -------------------------------------------------------------------------------------------------
# Loading, dumping, hashing
# -------------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data ({} when empty); a syntax error is a ``ConfigError`` naming the file,
    line and column in one line."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {where}{problem}") from error


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """``cls`` from a YAML file (or its defaults when ``path`` is None) plus ``KEY=VALUE`` overrides."""
    data = read_yaml(path) if path is not None else {}
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides) if overrides else cfg


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a dataclass tree, every field included."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, PurePath):
        return str(cfg)
    return cfg


def check_at_least(section: Any, minimum: float, *names: str) -> None:
    """ValueError naming the first field of ``section`` in ``names`` that is below ``minimum``."""
    for name in names:
        if getattr(section, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(section, name)}")


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, in field order; ``load_config`` reads it back to an equal value."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def config_hash(cfg: Any, exclude: Sequence[str] = ()) -> str:
    """A stable 16-hex-digit digest of the resolved values; ``exclude`` drops dotted keys first
    (for example the run name, which changes nothing about what is trained)."""
    data = to_dict(cfg)
    for key in exclude:
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config PATH`` and repeatable ``--set KEY=VALUE`` on an argparse parser."""
    parser.add_argument("--config", type=Path, help="YAML run config (defaults when omitted)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value by its dotted key, e.g. --set train.steps=100",
    )


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_config(cls, args.config, args.overrides)


# -------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    # Resolves string annotations (``from __future__ import annotations``) in the class's module.
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _where(path: str) -> str:
    return f"{path}: " if path else ""


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, list):
        return " or ".join(_type_name(t) for t in tp)
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
