"""Content fingerprints of what determines the cached values, and the cache key made from them.

Weight files are hashed once (`raydpo.digests` keeps their digests).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from raydpo.cache.schema import SCHEMA_VERSION
from raydpo.digests import DIGEST_CACHE_ENV as DIGEST_CACHE_ENV  # re-exported: tests set it
from raydpo.digests import cached_sha256, file_sha256
from raydpo.errors import RaydpoError
from raydpo.hub import model_dir, weight_files


def model_fingerprint(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """Content hashes of a model's config, the weight files it loads and the code it ships (the cache
    must change when they do). A model without code of its own has no `code_sha256`."""
    path = model_dir(name_or_path, revision)
    config = path / "config.json"
    if not config.is_file():
        raise RaydpoError(f"model directory {path} has no config.json")
    weights = weight_files(path)
    if not weights or not all(weight.is_file() for weight in weights):
        raise RaydpoError(
            f"model directory {path} has no weights to load (model.safetensors, pytorch_model.bin, "
            "or all the shards their index names)"
        )
    digests = {weight.name: cached_sha256(weight) for weight in weights}
    config_values = json.loads(config.read_text())
    for volatile in ("_name_or_path", "transformers_version"):
        config_values.pop(volatile, None)
    fingerprint = {
        "config_sha256": _hash_json(config_values),
        "weights_sha256": _hash_json(digests),
        "model_type": config_values.get("model_type"),
    }
    code = sorted(path.glob("*.py"))  # what `trust_remote_code` runs: modeling_*.py, configuration_*.py
    if code:
        fingerprint["code_sha256"] = _hash_json({file.name: file_sha256(file) for file in code})
    return fingerprint


def cache_key(parts: dict[str, Any]) -> str:
    """The digest of everything that determines the cached values."""
    return _hash_json({"schema_version": SCHEMA_VERSION, **parts})


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
