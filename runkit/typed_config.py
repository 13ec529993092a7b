"""Typed dataclass configs from JSON and `--set KEY=VALUE` overrides: one implementation for every config here.

Unknown keys are errors (a typo must not silently train the default), and every value is checked against its
field's declared type (booleans, integers, finite numbers, strings, `X | None`, tuples element by element, free
dicts); nested dataclasses are built recursively. Every failure is a ValueError naming the field. `out_of_bounds`
is the shared size check each config's `validate` runs before anything is built from it. `TypedConfig` gives a
config dataclass its dict / JSON / overrides methods; `changed_fields` names what differs between two configs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path


class TypedConfig:
    """Methods of a top-level config dataclass (vqtok's VQConfig, unified_lm's UnifiedConfig, the EncoderConfig):
    to_dict / to_json, from_dict (typed, unknown keys refused, errors naming `CONFIG_NAME`.field) and
    with_overrides. A mixin without fields, so the dataclass's fields and their order are its own."""

    CONFIG_NAME = "config"  # how errors name the config
    JSON_SORT_KEYS = False  # to_json's key order: the fields' (vqtok's config.json sorts them)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=self.JSON_SORT_KEYS)

    @classmethod
    def from_dict(cls, data: dict):
        return build_dataclass(cls, data, cls.CONFIG_NAME)

    def with_overrides(self, overrides: dict):
        """{"model.dim": 512, "train": {"lr": 3e-4}} -> a new config; unknown keys raise ValueError."""
        return self.from_dict(apply_overrides(self.to_dict(), overrides))


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config dicts (nested dicts compared field by field)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(prefix + key)
    return changed


def build_dataclass(cls, data: dict, where: str = "config"):
    """Recursively build dataclass `cls` from a dict; `where` names the position in error messages."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(key) for key in set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    defaults = cls()
    values = {name: _typed(hints[name], getattr(defaults, name), value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def _typed(hint, default, value, where: str):
    """`value` checked (and converted: int -> float, list -> tuple) against the field type `hint`."""
    if dataclasses.is_dataclass(default):
        return build_dataclass(type(default), value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _typed(inner, None, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return hint(value)
        except OverflowError:
            raise ValueError(f"{where}: {value!r} is too large") from None
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise ValueError(f"{where}: expected {len(kinds)} values, got {len(value)}")
        return tuple(_typed(kind, None, item, f"{where}[{i}]") for i, (kind, item) in enumerate(zip(kinds, value)))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {value!r}")
        return value
    return value


def out_of_bounds(config, bounds: dict[str, tuple[float, float]]) -> list[str]:
    """'model.n_layers=1000000 is outside [1, 1024]' for each dotted field (or tuple element) of `config`
    outside its inclusive bounds: sizes are checked before a model or buffer is built from them."""
    problems = []
    for path, (low, high) in bounds.items():
        value = config
        for part in path.split("."):
            value = getattr(value, part)
        if any(item is not None and not low <= item <= high for item in (value if isinstance(value, tuple) else (value,))):
            problems.append(f"{path}={value} is outside [{low}, {high}]")
    return problems


def apply_overrides(data: dict, overrides: dict, prefix: str = "") -> dict:
    """Overrides such as {"train.lr": 3e-4} or {"train": {"lr": 3e-4}} applied to a config dict (in place).
    `prefix` is where `data` sits in the whole config, for error messages."""
    for key, value in overrides.items():
        name, parts = prefix + key, key.split(".")
        target = data
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                raise ValueError(f"unknown config field {name!r}")
            target = target[part]
        if parts[-1] not in target:
            raise ValueError(f"unknown config field {name!r}")
        if isinstance(target[parts[-1]], dict) and isinstance(value, dict):
            apply_overrides(target[parts[-1]], value, name + ".")
        else:
            target[parts[-1]] = value
    return data


def parse_overrides(pairs: list[str]) -> dict:
    """["train.lr=3e-4", "model.name=x"] -> {"train.lr": 0.0003, "model.name": "x"} (values parsed as JSON)."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE (e.g. train.lr=3e-4), got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def load_preset_or_file(name_or_path: str, presets: dict[str, Callable], from_dict: Callable, option: str):
    """A preset name, or a JSON file holding a full config or {"preset": NAME, ...overrides} (not validated)."""
    from runkit.files import read_json

    if name_or_path in presets:
        return presets[name_or_path]()
    if not Path(name_or_path).exists():
        raise ValueError(f"{option} {name_or_path!r} is neither a preset {sorted(presets)} nor an existing JSON file")
    data = read_json(name_or_path, object, "config file")
    if isinstance(data, dict) and "preset" in data:
        name = data.pop("preset")
        if not isinstance(name, str) or name not in presets:
            raise ValueError(f"config file {name_or_path}: unknown preset {name!r}; choose one of {sorted(presets)}")
        try:
            return presets[name]().with_overrides(data)
        except ValueError as err:
            raise ValueError(f"config file {name_or_path}: {err}") from None
    try:
        return from_dict(data)
    except ValueError as err:
        raise ValueError(f"config file {name_or_path}: {err}") from None
