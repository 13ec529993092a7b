"""Typed dataclass configs from JSON and `--set KEY=VALUE` overrides: one implementation for every config here.

Unknown keys are errors (a typo must not silently train the default), booleans and numbers are type-checked,
JSON lists become tuples where the default is a tuple, and nested dataclasses are built recursively.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import fields


def build_dataclass(cls, data: dict, where: str = "config"):
    """Recursively build dataclass `cls` from a dict; `where` names the position in error messages."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    defaults = cls()
    values = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            values[name] = build_dataclass(type(default), value, f"{where}.{name}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{name}: expected true/false, got {value!r}")
            values[name] = value
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}.{name}: expected a number, got {value!r}")
            if isinstance(default, int) and float(value) != int(value):
                raise ValueError(f"{where}.{name}: expected an integer, got {value!r}")
            values[name] = type(default)(value)
        elif isinstance(default, tuple) and isinstance(value, list):
            values[name] = tuple(value)
        else:
            values[name] = value
    return cls(**values)


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
    if name_or_path in presets:
        return presets[name_or_path]()
    try:
        with open(name_or_path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{option} {name_or_path!r} is neither a preset {sorted(presets)} nor an existing JSON file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {name_or_path}: invalid JSON ({err})") from None
    if isinstance(data, dict) and "preset" in data:
        name = data.pop("preset")
        if name not in presets:
            raise ValueError(f"config file {name_or_path}: unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]().with_overrides(data)
    return from_dict(data)
