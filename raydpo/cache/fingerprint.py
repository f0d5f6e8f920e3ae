"""Content fingerprints of what determines the cached values, and the cache key made from them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from raydpo.cache.schema import SCHEMA_VERSION
from raydpo.errors import RaydpoError, one_line

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """Content hashes of a model's config and weight files (the cache must change when they do)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name_or_path, revision=revision))
        except Exception as error:  # hub errors come in many classes; all mean "not found here"
            raise RaydpoError(
                f"model {name_or_path!r} is neither a local directory nor a reachable hub id: "
                f"{one_line(error, limit=200)}"
            ) from None
    config = path / "config.json"
    if not config.is_file():
        raise RaydpoError(f"model directory {path} has no config.json")
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise RaydpoError(f"model directory {path} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digests = {weight.name: file_sha256(weight) for weight in weights}
    config_values = json.loads(config.read_text())
    for volatile in ("_name_or_path", "transformers_version"):
        config_values.pop(volatile, None)
    return {
        "config_sha256": _hash_json(config_values),
        "weights_sha256": _hash_json(digests),
        "model_type": config_values.get("model_type"),
    }


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file read in chunks (`hashlib.file_digest` needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """The digest of everything that determines the cached values."""
    return _hash_json({"schema_version": SCHEMA_VERSION, **parts})


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
