"""Content fingerprints of what determines the cached values, and the cache key made from them.

A weight file is hashed once: its digest is kept in a small digest cache keyed by the file's path and
stat (device, inode, size, modification and change times), so a pipeline's second stage, a sweep's
later points and a rerun read no weights; a file written in place or copied elsewhere is hashed again.
A file of a Hugging Face hub snapshot is a link to a blob named by its SHA-256, which is used as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from raydpo.cache.schema import SCHEMA_VERSION
from raydpo.errors import RaydpoError, one_line

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DIGEST_CACHE_ENV = "RAYDPO_DIGEST_CACHE"  # where file digests are kept; default ~/.cache/raydpo/digests
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


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
    digests = {weight.name: weight_sha256(weight) for weight in weights}
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


def weight_sha256(path: Path) -> str:
    """SHA-256 of a weight file, from the hub's blob name or the digest cache where they vouch for it."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and SHA256_NAME.fullmatch(target.name):
        return target.name  # a hub snapshot's LFS blob, named by its SHA-256
    stat = target.stat()
    identity = [str(target), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    entry = digest_cache_dir() / _hash_json(identity)
    with contextlib.suppress(OSError):
        cached = entry.read_text().strip()
        if SHA256_NAME.fullmatch(cached):
            return cached
    digest = file_sha256(target)
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a rehash
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    return digest


def digest_cache_dir() -> Path:
    return Path(os.environ.get(DIGEST_CACHE_ENV) or Path.home() / ".cache" / "raydpo" / "digests")


def cache_key(parts: dict[str, Any]) -> str:
    """The digest of everything that determines the cached values."""
    return _hash_json({"schema_version": SCHEMA_VERSION, **parts})


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
