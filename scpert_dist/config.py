"""Config plumbing shared by every stage: nested dataclasses <- TOML/YAML file <- `section.key=value` overrides.

Each stage defines its own dataclass with one section per concern (train.settings.PretrainConfig: data, model,
objective, optim, scaling, checkpoint, tracking; finetune.config.FinetuneConfig: data, model, objective, optim,
tracking; tune.SweepConfig; evaluate.headline.HeadlineConfig). Every field is defined once, in the section that owns
it, and validated once, in that section's `__post_init__`, so a bad value stops with a ConfigError when the config is
built, before any data is read. A section lists the keys that moved out of it in `MOVED` (old name -> new dotted
path): an old-layout key is a ConfigError that says where the key lives now.

This module builds configs from files and overrides (`load`, `from_dict`), changes one typed config into another
(`replace_at`, `with_overrides`: `dataclasses.replace` along a dotted path, no dict round trip), and flattens one
into MLflow params (`params`). The typed objects cross process boundaries as they are (Ray Train's
`train_loop_config`, `tune.with_parameters`: both pickle them); `to_dict` is only for writing a config into a JSON
file saved with a checkpoint or a run.
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
    """The config as plain data, for a JSON file saved beside a checkpoint or a run."""
    return dataclasses.asdict(cfg)


def at_least(section: Any, where: str, bound: float, *names: str, strict: bool = False) -> None:
    """The range check of a section's `__post_init__`: each field in `names` >= bound (> bound when strict), else a
    ConfigError naming `where.field`."""
    for name in names:
        v = getattr(section, name)
        if v < bound or (strict and v == bound):
            raise ConfigError(f"{name} must be {'>' if strict else '>='} {bound:g}, got {v}", field=f"{where}.{name}")


def params(cfg: Any) -> dict[str, Any]:
    """The config as flat MLflow params ('optim.lr' -> 0.001): the one function every stage logs its config with."""
    return flatten(dataclasses.asdict(cfg))


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
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table for '{where}'", field=where,
                              hint=f"its keys: {', '.join(where + '.' + f.name for f in dataclasses.fields(tp))}")
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
    check_keys(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    return {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}


def check_keys(cls: type, data: dict, prefix: str = "") -> None:
    """ConfigError for a key of `data` that dataclass `cls` does not have: one that moved (`cls.MOVED`) is named with
    its new place, an unknown one with the valid keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    moved = getattr(cls, "MOVED", {})
    # a key that moved is named with its new place (a section of the same name, e.g. finetune's `data`, is not moved)
    relocated = sorted(k for k in data if k in moved and not (k in names and isinstance(data[k], dict)))
    if relocated:
        # a MOVED path starts at a section of `cls` (finetune's 'epochs' -> 'optim.epochs') or beside it (the model
        # section's 'tasks' -> 'objective.tasks'): named from the config's top either way
        parent = prefix[:prefix.rstrip(".").rfind(".") + 1] if prefix else ""
        where = {k: (prefix if moved[k].split(".")[0] in names else parent) + moved[k] for k in relocated}
        raise ConfigError("config key(s) moved: " + ", ".join(f"{prefix}{k} is now {where[k]}" for k in relocated),
                          field=prefix + relocated[0], hint=f"write {where[relocated[0]]} instead")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}",
                          field=prefix + unknown[0],
                          hint=f"valid keys: {', '.join(sorted(prefix + n for n in names))}")


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
        data = merge(data, read_file(path))
    for k, v in split_overrides(overrides).items():
        set_path(data, k, v)
    return from_dict(cls, data)


def split_overrides(overrides: list[str] | None) -> dict[str, str]:
    """['optim.lr=1e-3', ...] -> {'optim.lr': '1e-3', ...} (ConfigError for an item without '=')."""
    out: dict[str, str] = {}
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not key=value", hint="e.g. --set optim.lr=3e-4")
        k, v = ov.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def merge(a: dict, b: dict) -> dict:
    """Table `b` layered over table `a` (nested tables merged key by key): a file over its base file."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def upgrade_layout(cls: type, data: dict) -> dict:
    """A saved config of an earlier layout with each of `cls.MOVED`'s keys moved to its new place (for reading the
    config saved with a model; a config a user writes gets the ConfigError instead)."""
    names = {f.name for f in dataclasses.fields(cls)}
    moved = {k: v for k, v in getattr(cls, "MOVED", {}).items()
             if k in data and not (k in names and isinstance(data[k], dict))}
    out = {k: v for k, v in data.items() if k not in moved}
    for old, new in moved.items():
        set_path(out, new, data[old])
    return out


def replace_at(cfg: T, changes: dict[str, Any], _prefix: str = "") -> T:
    """A copy of `cfg` with the fields at the dotted paths of `changes` ('model.decoder' -> 'gru') set (a string is
    converted to the field's type), by one `dataclasses.replace` per section touched: each section's `__post_init__`
    validates it once, with all of its changes (so fields checked together may change together)."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    by_head: dict[str, dict[str, Any]] = {}
    leaves: dict[str, Any] = {}
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if rest:
            by_head.setdefault(head, {})[rest] = value
        else:
            leaves[head] = value
    check_keys(cls, {**{h: {} for h in by_head}, **leaves}, _prefix)
    new = {h: _coerce(hints[h], v, _prefix + h) for h, v in leaves.items()}
    for head, sub in by_head.items():
        if head in leaves or not dataclasses.is_dataclass(getattr(cfg, head)):
            raise ConfigError(f"'{_prefix}{head}' is not a config section", field=_prefix + head)
        new[head] = replace_at(getattr(cfg, head), sub, f"{_prefix}{head}.")
    return dataclasses.replace(cfg, **new)


def with_overrides(cfg: T, overrides: dict[str, Any] | list[str]) -> T:
    """`cfg` with the overrides applied (`replace_at`); keys are dotted paths ('optim.epochs') or, for keyword use
    (`ScPert(epochs=2)`), a field name found in exactly one section ('epochs' -> 'optim.epochs')."""
    items = split_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
    return replace_at(cfg, {(k if "." in k else field_path(type(cfg), k)): v for k, v in items.items()})


def field_path(cls: type, name: str) -> str:
    """The dotted path of the field called `name` in `cls` or one of its sections (a field of `cls` itself first);
    ConfigError when no section or several have one."""
    if name in {f.name for f in dataclasses.fields(cls)}:
        return name
    hints = typing.get_type_hints(cls)
    found = [f"{f.name}.{name}" for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
             and name in {g.name for g in dataclasses.fields(hints[f.name])}]
    if not found and name in getattr(cls, "MOVED", {}):
        check_keys(cls, {name: None})  # the key of an earlier layout: named with its new place
    if len(found) != 1:
        raise ConfigError(f"{'no' if not found else 'more than one'} config field {name!r}", field=name,
                          hint=f"give the section: {', '.join(found)}" if found else "see the config's sections")
    return found[0]
