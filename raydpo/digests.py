"""SHA-256 digests of files, each computed once and kept in a small digest cache.

A local file's digest is kept under its path and stat (device, inode, size, modification and change
times), so a pipeline's second stage, a sweep's later points and a rerun read no weights or data again; a
file written in place, copied elsewhere or touched is hashed again, and a copy or a touch keeps its
digest. A file of a Hugging Face hub snapshot is a link to a blob named by its SHA-256, which is used as
it is. An object in a store (`s3://`) is read once per version, as its ETag names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

DIGEST_CACHE_ENV = "RAYDPO_DIGEST_CACHE"  # where file digests are kept; default ~/.cache/raydpo/digests
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file read in chunks (`hashlib.file_digest` needs Python 3.11)."""
    with open(path, "rb") as handle:
        return _stream_sha256(handle, chunk_bytes)


def cached_sha256(path: Path) -> str:
    """SHA-256 of a local file, from the hub's blob name or the digest cache where they vouch for it."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and SHA256_NAME.fullmatch(target.name):
        return target.name  # a hub snapshot's LFS blob, named by its SHA-256
    stat = target.stat()
    identity = [str(target), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    return _digest_cached(identity, lambda: file_sha256(target))


def data_file_sha256(filesystem: Any, path: str) -> str:
    """SHA-256 of a data file on a pyarrow filesystem: a local file's as `cached_sha256` keeps it; a
    store's object read once per ETag (which the request that opens it returns, before any read), then
    kept in the digest cache. An object without an ETag is read every time."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        return cached_sha256(Path(path))
    with filesystem.open_input_stream(path) as stream:
        etag = (stream.metadata() or {}).get("ETag")
        if not etag:
            return _stream_sha256(stream)
        identity = [filesystem.type_name, path, etag.decode() if isinstance(etag, bytes) else etag]
        return _digest_cached(identity, lambda: _stream_sha256(stream))


def digest_cache_dir() -> Path:
    return Path(os.environ.get(DIGEST_CACHE_ENV) or Path.home() / ".cache" / "raydpo" / "digests")


def _stream_sha256(stream: Any, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


def _digest_cached(identity: list[Any], compute: Callable[[], str]) -> str:
    """The digest cache's entry for a file's identity, or `compute()` kept there."""
    entry = digest_cache_dir() / hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()
    with contextlib.suppress(OSError):
        cached = entry.read_text().strip()
        if SHA256_NAME.fullmatch(cached):
            return cached
    digest = compute()
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a rehash
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    return digest
