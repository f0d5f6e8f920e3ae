"""Configs from YAML files, dotted overrides and keyword arguments: `load` for files, `coerce` for
the Python API."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from raydpo.errors import RaydpoError, one_line


def from_mapping(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from a mapping whose keys may use `-` or `_`; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise RaydpoError(f"unknown {cls.__name__} setting {key!r}")
        kwargs[name] = typed(name, hints[name], value)
    missing = missing_required(cls, kwargs)
    if missing:
        raise RaydpoError(f"{cls.__name__}: {missing[0]} is required")
    return cls(**kwargs)


def typed(name: str, hint: Any, value: Any) -> Any:
    """`value` as the number or boolean a setting declares, or a one-line error. YAML reads `5e-7` (no
    dot) as a string, and a `--set` value or a mapping may hold anything."""
    if value is None:
        return value
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(hint) if union else (hint,))
    if kinds & {str, list} or not kinds & {bool, int, float}:
        return value
    if bool in kinds:
        if isinstance(value, bool):
            return value
        raise RaydpoError(f"{name} must be true or false, got {value!r}")
    if isinstance(value, bool):
        pass  # neither an int nor a float here, though Python says it is an int
    elif float in kinds and isinstance(value, (int, float)):
        return float(value)
    elif int in kinds and isinstance(value, int):
        return value
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and float in kinds:
            return number
        if number is not None and number.is_integer():
            return int(number)
    kind = "a number" if float in kinds else "an integer"
    raise RaydpoError(f"{name} must be {kind}, got {value!r}")


def missing_required(cls: type, values: dict[str, Any]) -> list[str]:
    """The settings of a config dataclass that have no default and are absent (or None) in `values`."""
    return [
        f.name
        for f in fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and values.get(f.name) is None
    ]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file gives an empty dict)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise RaydpoError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise RaydpoError(f"config file {path} is not valid YAML: {one_line(error)}") from None
    if not isinstance(data, dict):
        raise RaydpoError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `a.b=value` overrides (values parsed as YAML scalars) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RaydpoError(f"override {item!r} must look like key=value or section.key=value")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RaydpoError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else None
    return values


def load(
    path: str | Path | None, overrides: Sequence[str] = (), section: str | None = None
) -> dict[str, Any]:
    """The settings of a YAML file (none: empty) with dotted overrides applied.

    Without `section`, the whole mapping (a job's `precompute:` and `train:` sections). With it, that
    stage's settings, keys spelled with `_`: the file's `section:` mapping, or the file itself when it
    is flat; overrides may leave out the `section.` prefix.
    """
    values = load_yaml(path) if path else {}
    if section is None:
        return apply_overrides(values, list(overrides))
    nested = values.get(section)
    stage = {
        key.replace("-", "_"): value
        for key, value in (nested if isinstance(nested, dict) else values).items()
    }
    return apply_overrides(stage, [item.removeprefix(f"{section}.") for item in overrides])


Config = TypeVar("Config")


def coerce(
    cls: type[Config], config: Config | Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """A stage's config from what its function was given: a config, a mapping or nothing, with keyword
    overrides on top (validated again when there are any)."""
    overrides = overrides or {}
    if isinstance(config, cls):
        return from_mapping(cls, {**as_dict(config), **overrides}) if overrides else config
    return from_mapping(cls, {**(config or {}), **overrides})


def as_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (for manifests, MLflow params and printing)."""
    return dataclasses.asdict(config)
