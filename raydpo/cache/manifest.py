"""The manifest of a finished split: the contract between the precompute stage and its readers.

It records what determined the cached values (fingerprints of the model, tokenizer and data, and the
resolved settings, digested into `key`), what was written (counts and the part files with their row
counts) and how fast. Precompute writes it last, as `manifest.json` and in `data/_common_metadata`;
a split without it is not finished. Every reader goes through `Manifest.from_json`, which validates
the format before anything is read by it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from raydpo.cache.schema import DATA_DIR, FORMAT, PART_PREFIXES, REJECTS_DIR, SCHEMA_VERSION
from raydpo.errors import RaydpoError


@dataclass(frozen=True)
class PartFile:
    """One part file of the split, relative to its directory (`data/part-....parquet`), and its rows."""

    path: str
    rows: int

    @property
    def is_data(self) -> bool:
        return self.path.startswith(f"{DATA_DIR}/")


@dataclass(frozen=True)
class Fingerprints:
    """Content hashes of the reference model's files, its tokenizer and the source data."""

    model: dict[str, Any]
    tokenizer: dict[str, Any]
    dataset: dict[str, Any]


@dataclass(frozen=True)
class Counts:
    """Rows read from the source, written as scored pairs and rejected (with the count of each reason)."""

    read: int
    written: int
    rejected: int
    truncated_this_run: int
    resumed: int
    reject_reasons: dict[str, int]


@dataclass(frozen=True)
class Throughput:
    """How the run that finished the split went; `tokens` counts every pair's tokens once per branch,
    `tokens_computed` the ones the model ran (a shared prompt once)."""

    wall_time_s: float
    tokens: int
    tokens_per_s: float
    pairs_per_s: float
    padding_fraction: float
    prefix_sharing: str
    tokens_computed: int
    tokens_saved_by_prefix_sharing: int
    num_actors: int
    batch_size: int
    scorer_restarts: int = 0  # scorer actors Ray restarted after their process died (their batches redone)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION
    raydpo_version: str
    key: str
    split: str
    source: str
    fingerprints: Fingerprints
    model: str
    tokenizer: str
    settings: dict[str, Any]
    counts: Counts
    throughput: Throughput
    schema: tuple[str, ...]
    files: tuple[PartFile, ...] = field(default_factory=tuple)
    created_at: str

    @property
    def data_files(self) -> list[str]:
        """The scored part files, relative to the split directory."""
        return [entry.path for entry in self.files if entry.is_data]

    def to_dict(self) -> dict[str, Any]:
        """The manifest as the JSON object written to disk (lists, not tuples)."""
        return json.loads(self.to_json())

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, payload: bytes | str, where: str) -> Manifest:
        """Parse and validate the manifest of the split at WHERE (shown in errors)."""
        try:
            values = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RaydpoError(f"{where}: the manifest is corrupt (not valid JSON); recompute it") from None
        return cls.from_dict(values, where)

    @classmethod
    def from_dict(cls, values: Any, where: str) -> Manifest:
        """Validate VALUES in the order a reader needs: the format first, then the files it will open
        (no entry may point outside the split), then every other field."""
        if not isinstance(values, dict):
            raise RaydpoError(f"{where}: the manifest is not a JSON object; recompute it")
        if values.get("format") != FORMAT or values.get("schema_version") != SCHEMA_VERSION:
            raise RaydpoError(
                f"{where}: unsupported cache format {values.get('format')!r} v{values.get('schema_version')}"
            )
        for entry in values.get("files") or []:
            _check_part_path(entry.get("path") if isinstance(entry, dict) else entry, where)
        return _build(cls, values, where, "manifest")


def _check_part_path(path: Any, where: str) -> None:
    directory, _, name = str(path).partition("/")
    if directory not in (DATA_DIR, REJECTS_DIR) or not name.startswith(PART_PREFIXES) or "/" in name:
        raise RaydpoError(f"{where}: the manifest lists {path!r}, which is not a part file here")


def _build(cls: type, values: Any, where: str, what: str) -> Any:
    """An instance of the dataclass CLS from a JSON object, nested dataclasses included; a missing or
    unknown field is one line naming it (a manifest is rewritten whole, never merged)."""
    if not isinstance(values, dict):
        raise RaydpoError(f"{where}: manifest field {what!r} is not an object; recompute it")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if unknown or missing:
        problem = f"lacks {missing}" if missing else f"has unknown fields {unknown}"
        raise RaydpoError(f"{where}: the manifest's {what} {problem}; recompute it with this raydpo version")
    hints = typing.get_type_hints(cls)
    built = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, where, name)
        elif typing.get_origin(hint) is tuple:
            (item,) = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
            value = tuple(
                _build(item, v, where, name) if dataclasses.is_dataclass(item) else v for v in value
            )
        built[name] = value
    return cls(**built)
