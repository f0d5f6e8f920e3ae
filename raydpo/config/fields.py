"""How a setting is declared (its help and choices in the field's metadata) and the checks every stage
config shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from raydpo.errors import RaydpoError
from raydpo.loss_settings import LossSettings

CPU_ALLOCATORS = ("mimalloc", "system")
TRUNCATION_MODES = ("keep_start",)
PREFIX_SHARING = ("auto", "on", "off")
LR_SCHEDULERS = ("linear", "cosine")
ZERO_STAGES = (0, 1, 2, 3)
RAY_ADDRESS_HELP = (  # both stages join a cluster the same way
    'Ray cluster to join: host:port of its head, or "local"; default: $RAY_ADDRESS, else the cluster '
    "`ray start` recorded on this machine if it answers, else a new local instance (a process already "
    "connected to Ray stays on its cluster)."
)


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[Any] | None = None) -> Any:
    """A config field with its help (the flag's and the README's) and, for a fixed set of values, its
    choices (checked on construction); no default: a required setting."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata=metadata)


def loss_setting(name: str) -> Any:
    """A train config field declared by the `LossSettings` field `name`: its default, help and choices."""
    declared = {f.name: f for f in fields(LossSettings)}[name]
    return dataclasses.field(default=declared.default, metadata={**declared.metadata, "loss_setting": name})


LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")  # what a hub id never starts with


def local_path_or_id(value: str | None, what: str = "model", saved_model: bool = False) -> str | None:
    """A model or tokenizer given as an existing local directory becomes absolute: Ray workers do not
    share the driver's working directory. Hub ids and URIs pass unchanged.

    Checked here, before Ray starts: a value written as a path (`/`, `./`, `../`, `~`) must exist, and
    with `saved_model` a directory must hold a `config.json`."""
    if value is None or "://" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_dir():
        if value.startswith(LOCAL_PATH_PREFIXES):
            problem = "is a file, not a directory" if path.exists() else "does not exist"
            raise RaydpoError(f"{what} {value} {problem}")
        return value
    if saved_model and not (path / "config.json").is_file():
        raise RaydpoError(f"{what} {value} has no config.json: not a saved model (save_pretrained) directory")
    return str(path.resolve())


def check_choices(config: Any) -> None:
    """Each setting declared with choices holds one of them (loss settings are checked by LossSettings)."""
    for f in fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices is None or "loss_setting" in f.metadata or value in choices:
            continue
        allowed = (
            " or ".join(map(str, choices)) if len(choices) <= 2 else f"one of {', '.join(map(str, choices))}"
        )
        raise RaydpoError(f"{f.name} must be {allowed}, got {value!r}")


def check_positive(config: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RaydpoError(f"{name} must be a positive integer, got {value!r}")
