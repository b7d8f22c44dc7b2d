"""Typed configuration from dataclasses: YAML deltas and dotted ``key=value`` overrides.

Generic (no knowledge of any application): the dataclasses are the single source of truth for
every key and its type; :func:`build` checks a raw mapping against them, naming the key of any
unknown key (with a did-you-mean), wrong type or bad choice. A section whose dataclass depends
on one of its own keys (``method.name`` choosing the method's section) is declared with
:func:`tagged`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem found before any work starts (exit code 2)."""


_TAGGED = "typed_config.tagged"


@dataclasses.dataclass(frozen=True)
class Tagged:
    """How a tagged section picks its dataclass: ``choices()[raw[tag]]``. ``legacy_keys``: a
    section holding every one of them is the flat form an earlier version wrote (all choices'
    keys side by side); its keys the chosen dataclass lacks are dropped, so old files load."""

    tag: str
    default: str
    choices: Callable[[], Mapping[str, type]]
    legacy_keys: frozenset[str] = frozenset()


def tagged(tag: str, default: str, choices: Callable[[], Mapping[str, type]],
           legacy_keys: frozenset[str] = frozenset()) -> Any:
    """A dataclass field whose section type is ``choices()[section[tag]]``; each choice's
    dataclass has the ``tag`` field itself, so the value round-trips through :func:`plain`."""
    spec = Tagged(tag, default, choices, legacy_keys)
    return dataclasses.field(default_factory=lambda: spec.choices()[default](),
                             metadata={_TAGGED: spec})


def read_text(path: str | os.PathLike, what: str = "config file") -> str:
    """A file as UTF-8 text; ``what`` says what the file is for in the error."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {p}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {p} is not UTF-8 text (byte {e.start}, line {line})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike, what: str = "config file") -> Any:
    """A YAML file's value (safe types only, no key twice); any malformation is one error."""
    text = read_text(path, what)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: "
                          f"{' '.join(str(e).split())[:300]}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to read") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: no keys)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    loaded = load_yaml(p)
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return loaded


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b=value`` items set into ``raw`` (values parsed as YAML scalars)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _set_dotted(raw, key.strip(), _parse_scalar(value))
    return raw


def build(cls: type, raw: Any) -> Any:
    """An instance of the dataclass ``cls`` from a raw mapping; unset keys keep their defaults."""
    return _build(cls, raw, prefix="")


def plain(obj: Any) -> Any:
    """A dataclass instance as plain dicts, lists and scalars (YAML-safe)."""
    return _plain(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj)


def check_finite_floats(obj: Any, prefix: str = "") -> None:
    """Every float of a dataclass instance (and in its tuples, lists and mappings) is finite: an
    inf or NaN learning rate, decay or ratio would run on without an error."""
    for f in dataclasses.fields(obj):
        _check_finite_value(getattr(obj, f.name), f"{prefix}{f.name}")


def _check_finite_value(value: Any, key: str) -> None:
    if dataclasses.is_dataclass(value):
        check_finite_floats(value, key + ".")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_finite_value(v, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_value(k, key)
            _check_finite_value(v, f"{key}.{k}")


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        d = nxt
    d[parts[-1]] = value


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = _section_type(f, hints[f.name], None)
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(cls: type, key: str, root: type, prefix: str) -> ConfigError:
    candidates = _all_keys(cls, prefix) + _all_keys(root)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _section_type(f: dataclasses.Field, t: Any, raw: Any) -> Any:
    """The dataclass of field ``f``: its annotation, or for a tagged section the choice its
    tag names in ``raw`` (``None``: the default choice)."""
    spec = f.metadata.get(_TAGGED)
    if spec is None:
        return t
    name = raw.get(spec.tag, spec.default) if isinstance(raw, dict) else spec.default
    choices = spec.choices()
    if name not in choices:
        raise ConfigError(f"config key '{f.name}.{spec.tag}' must be one of {list(choices)}, "
                          f"got {name!r}")
    return choices[name]


def _tagged_section(f: dataclasses.Field, cls: type, raw: dict[str, Any],
                    prefix: str) -> dict[str, Any]:
    """``raw`` without an old flat form's foreign keys; a key of another choice is an error
    that names the choices it belongs to."""
    spec = f.metadata[_TAGGED]
    own = {g.name for g in dataclasses.fields(cls)}
    if spec.legacy_keys and spec.legacy_keys <= set(raw):
        return {k: v for k, v in raw.items() if k in own}
    for k in raw:
        owners = [n for n, c in spec.choices().items()
                  if k in {g.name for g in dataclasses.fields(c)}]
        if k not in own and owners:
            tag = raw.get(spec.tag, spec.default)
            raise ConfigError(f"config key '{prefix}{k}' is not a key of {f.name}.{spec.tag}="
                              f"{tag} (it belongs to {', '.join(owners)})")
    return raw


def _build(cls: type, raw: Any, prefix: str, root: type | None = None) -> Any:
    root = root or cls
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (mapping)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise _unknown_key(cls, f"{prefix}{k}", root, prefix)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name] if raw[f.name] is not None else {}
        t = _section_type(f, hints[f.name], value)
        key = f"{prefix}{f.name}"
        if f.name in raw and f.metadata.get(_TAGGED) and isinstance(value, dict):
            value = _tagged_section(f, t, value, key + ".")
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _build(t, value, key + ".", root)
        else:
            kwargs[f.name] = _coerce(raw[f.name], t, key)
    return cls(**kwargs)


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(t))
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``t``; ints widen to floats, nothing else guessed."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    bad = ConfigError(f"config key '{key}' must be {_type_name(t)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            # YAML 1.1 reads no/off/yes/on as booleans: map them back onto the string choices
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in args), value)
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}")
                for k, v in value.items()}
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' must have {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        elem = args[0] if args else Any
        items = [v if elem is Any else _coerce(_parse_item(v), elem, key) for v in value]
        return tuple(items) if origin is tuple else items
    if t is Any:
        return value
    raise bad


def _parse_item(v: Any) -> Any:
    return _parse_scalar(v) if isinstance(v, str) else v


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
