"""The typed-config machinery behind :mod:`ddkit.config`: YAML and ``--set`` overrides in, frozen dataclasses
out, and back.

Generic over any tree of dataclasses (the experiment's sections live in :mod:`ddkit.config`):
:func:`read_yaml_mapping` reads a file with ``yaml.safe_load``; :func:`apply_override` applies ``a.b=value``
with the value parsed as YAML (``--set generate.cfg_scale=2`` gives a float field the number 2.0);
:func:`from_dict` checks every key and type against the dataclass annotations and raises
:class:`ConfigError` with one line naming the source and the dotted key; :func:`to_dict` /
:func:`dump_yaml` give the plain YAML-safe view written into run directories.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ddkit.errors import ConfigError


def read_yaml_mapping(path: str | Path, source: str | None = None) -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file gives ``{}``).

    Raises:
        ConfigError: missing file, invalid YAML or a top level that is not a mapping (one line naming
            ``source``, default the path).
    """
    source = str(path) if source is None else source
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def apply_override(raw: dict[str, Any], override: str, source: str = "--set") -> dict[str, Any]:
    """Return a copy of ``raw`` with ``"a.b.c=value"`` applied (value parsed as YAML).

    Raises:
        ConfigError: the override has no ``=`` or an empty key.
    """
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE")
    key, _, value = override.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {override!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() != "" else None
    except yaml.YAMLError:
        parsed = value
    out = _deepcopy_dict(raw)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = parsed
    return out


class Sources:
    """Where each value of a raw config came from: the file (``default``), or the last ``--set`` that wrote
    the key or a section above it (``overrides``: ``[(dotted key, "--set KEY=VALUE"), ...]`` in order)."""

    def __init__(self, default: str, overrides: list[tuple[str, str]] = ()) -> None:
        self.default, self.overrides = default, list(overrides)

    def of(self, key: str) -> str:
        """The source of dotted ``key`` (``a.b``, ``a.b[2]``)."""
        found = self.default
        for k, where in self.overrides:
            if key == k or key.startswith((k + ".", k + "[")):
                found = where
        return found

    def __str__(self) -> str:
        return self.default


def _at(source: str | Sources, key: str) -> str:
    return source.of(key) if isinstance(source, Sources) else str(source)


def from_dict(cls: type, data: Any, source: str | Sources = "<dict>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type.

    Args:
        source: the file name (or ``<dict>``), or :class:`Sources` to name the ``--set`` a value came from.

    Raises:
        ConfigError: naming the source of the offending value and its dotted key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"{_at(source, where)}: {where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            # YAML 1.1 reads a bare on/off/yes/no key as a boolean: say so rather than print 'True'.
            hint = "; YAML reads bare on/off/yes/no as booleans: quote the key" if isinstance(key, bool) else ""
            raise ConfigError(
                f"{_at(source, prefix + str(key))}: unknown key '{prefix}{key}' "
                f"(known: {', '.join(sorted(names))}){hint}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            # A partial nested section overrides the parent's default for that section (e.g. the minimax
            # stage's lambda_r), not the section class's own defaults.
            if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
                if f.default_factory is not dataclasses.MISSING:
                    value = _deep_merge(to_dict(f.default_factory()), value)
            kwargs[f.name] = _coerce(hints[f.name], value, source, prefix + f.name)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section's own check names its field first ("scale: must be >= 0")
        where = _at(source, prefix + str(e).split(":", 1)[0])
        raise ConfigError(f"{where}: {prefix}{e}" if prefix else f"{where}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain-Python (YAML/JSON-safe) view of a config: tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (what goes into run directories)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that re-runs validation (frozen configs are changed only by copy)."""
    return dataclasses.replace(cfg, **changes)


def _coerce(tp: Any, value: Any, source: str | Sources, key: str) -> Any:
    where = _at(source, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, source, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {tp}")



def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _deepcopy_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}
