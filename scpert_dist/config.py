"""Config plumbing shared by every stage: nested dataclasses <- TOML/YAML file <- `section.key=value` overrides.

Each stage defines its own dataclass (model.config.ModelConfig, train.settings.PretrainConfig,
finetune.config.FinetuneConfig, ...); this module turns files and overrides into them and back into dicts, so
the full config is saved with every checkpoint and MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from .errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table for '{where}'", field=where)
        return from_dict(tp, value, where + ".")
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, where) for v in value]
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"'{value}' is not a boolean", field=where)
        return bool(value)
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{value}' is not a valid {tp.__name__}", field=where) from None
    return value


def coerce_fields(cls: type, data: dict, prefix: str = "") -> dict:
    """`data` with each value converted to the type of dataclass `cls`'s field of that name (command-line overrides
    arrive as strings); an unknown key is a ConfigError naming it."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}",
                          hint=f"valid keys: {', '.join(sorted(prefix + n for n in names))}")
    return {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}


def from_dict(cls: type[T], data: dict, _prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys are an error naming the key."""
    kwargs = coerce_fields(cls, data, _prefix)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config: {e}") from None


def set_path(d: dict, dotted: str, value: Any) -> None:
    cur = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


PACKAGED = Path(__file__).resolve().parent / "configs"
"""The configs shipped with the package (scpert_dist/configs)."""


def packaged_or_file(name: str | Path, *, field: str, pattern: str = "*.toml") -> Path:
    """`name` as a file, else the packaged config of that name (ConfigError naming `field` and the choices)."""
    p = Path(name)
    if p.is_file():
        return p
    if (PACKAGED / str(name)).is_file():
        return PACKAGED / str(name)
    raise ConfigError(f"config {str(name)!r} not found", field=field,
                      hint=f"a file, or one of {sorted(x.name for x in PACKAGED.glob(pattern))}")


def read_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found", path=str(p))
    try:
        if p.suffix == ".toml":
            return tomllib.loads(p.read_text())
        if p.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(p.read_text()) or {}
        if p.suffix == ".json":
            return json.loads(p.read_text())
    except Exception as e:
        raise ConfigError(f"cannot parse config ({e})", path=str(p)) from None
    raise ConfigError("unknown config format", path=str(p), hint="use .toml, .yaml or .json")


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> T:
    """cls defaults <- base dict <- file <- overrides ('section.key=value')."""
    data: dict = dict(base or {})
    if path is not None:
        data = _merge(data, read_file(path))
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not key=value")
        k, v = ov.split("=", 1)
        set_path(data, k.strip(), v.strip())
    return from_dict(cls, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
