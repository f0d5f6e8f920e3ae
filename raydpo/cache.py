"""The precompute output: Parquet schema, manifest, fingerprints, atomic writes and the lock.

Layout of one split (OUTPUT/train, OUTPUT/eval):

    _pending.json            the run's cache key, while a run is writing (removed when finished)
    data/part-<digest>.parquet      scored pairs, one file per written block, written atomically
    rejects/part-<digest>.parquet   rows that could not be used, with the reason
    data/_common_metadata    Parquet schema + the manifest in its key-value metadata
    manifest.json            written last: a split without it is not a finished cache

Part files are named by a digest of the pair ids they hold, so a retried write task rewrites the same
file instead of adding a duplicate, and a rerun after a crash skips the pairs already written.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydpo.errors import RaydpoError, one_line

SCHEMA_VERSION = 1
FORMAT = "raydpo.preference-cache"
MANIFEST = "manifest.json"
PENDING = "_pending.json"
LOCK = ".lock"
COMPLETE_MARKER = "_COMPLETE"
DATA_DIR = "data"
REJECTS_DIR = "rejects"
PART_PREFIXES = ("part-", "dup-part-")  # file names this module writes; nothing else is read back
KEY_METADATA = b"raydpo.cache_key"
MANIFEST_METADATA = b"raydpo.manifest"

TOKEN_LIST = pa.list_(pa.int32())
DATA_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt_input_ids", TOKEN_LIST),
        ("chosen_input_ids", TOKEN_LIST),
        ("rejected_input_ids", TOKEN_LIST),
        ("prompt_length", pa.int32()),
        ("chosen_length", pa.int32()),
        ("rejected_length", pa.int32()),
        ("truncated", pa.bool_()),
        ("ref_chosen_logps", pa.float32()),
        ("ref_rejected_logps", pa.float32()),
        ("ref_chosen_logps_shared", pa.float32()),
        ("ref_chosen_logps_tail", pa.float32()),
        ("ref_rejected_logps_shared", pa.float32()),
        ("ref_rejected_logps_tail", pa.float32()),
    ]
)
TOKEN_LOGPS_FIELDS = [
    pa.field("ref_chosen_token_logps", pa.list_(pa.float32())),
    pa.field("ref_rejected_token_logps", pa.list_(pa.float32())),
]
REJECT_SCHEMA = pa.schema([("pair_id", pa.string()), ("reason", pa.string()), ("row_json", pa.string())])
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def data_schema(store_token_logps: bool) -> pa.Schema:
    schema = DATA_SCHEMA
    for extra in TOKEN_LOGPS_FIELDS if store_token_logps else ():
        schema = schema.append(extra)
    return schema


# ---- file systems and atomic writes ------------------------------------------------------------------


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path on it for a local path or a URI (s3://, gs://, ...).

    The path has lost the URI's scheme and query: pass it on only together with the filesystem, and
    pass the URI (`join`) wherever the location travels on, to another function or a Ray worker."""
    if is_uri(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, ValueError) as error:
            raise RaydpoError(f"cannot open {uri}: {error}") from None
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def is_uri(location: str) -> bool:
    return "://" in location


def location(uri: str) -> str:
    """A path or URI as it is shown and passed on: a local path made absolute, a URI unchanged."""
    return uri.rstrip("/") if is_uri(uri) else resolve(uri)[1]


def join(uri: str, *names: str) -> str:
    """The location of NAMES under a path or URI; a URI's query (`?endpoint_override=...`) stays last."""
    base, mark, query = uri.partition("?") if is_uri(uri) else (location(uri), "", "")
    return "/".join([base.rstrip("/"), *names]) + mark + query


def write_bytes_atomic(fs: pafs.FileSystem, path: str, payload: bytes) -> None:
    """Write to a hidden temporary name, then rename: readers never see a half-written file."""
    tmp = _tmp_name(path)
    with fs.open_output_stream(tmp) as stream:
        stream.write(payload)
    fs.move(tmp, path)


def write_table_atomic(fs: pafs.FileSystem, path: str, table: pa.Table, metadata: dict[bytes, bytes]) -> None:
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp = _tmp_name(path)
    pq.write_table(table, tmp, filesystem=fs, compression="zstd")
    fs.move(tmp, path)


def publish_directory(local_dir: str, destination: str) -> None:
    """Move a finished local directory to DESTINATION (a path or URI) so that it appears only when whole.

    Locally a rename does it. On object stores, where there is no rename, whatever the destination
    held is removed (its COMPLETE_MARKER first), the files are copied, and COMPLETE_MARKER is written
    last; readers check for it (`published`).
    """
    fs, root = resolve(destination)
    if isinstance(fs, pafs.LocalFileSystem):
        staging = _tmp_name(root)
        os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
        shutil.copytree(local_dir, staging)
        Path(staging, COMPLETE_MARKER).write_bytes(b"{}")
        if os.path.exists(root):
            shutil.rmtree(root)
        os.replace(staging, root)
    else:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(f"{root}/{COMPLETE_MARKER}")
        fs.delete_dir_contents(root, missing_dir_ok=True)
        pafs.copy_files(local_dir, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        write_bytes_atomic(fs, f"{root}/{COMPLETE_MARKER}", b"{}")


def published(uri: str) -> bool:
    """Whether `publish_directory` finished writing URI."""
    fs, root = resolve(uri)
    return fs.get_file_info(f"{root}/{COMPLETE_MARKER}").type == pafs.FileType.File


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.{uuid.uuid4().hex[:8]}.tmp"


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RaydpoError(
            f"{shown(fs, path)} is corrupt (not valid JSON); remove it or rerun with --overwrite"
        ) from None


def shown(fs: pafs.FileSystem, path: str) -> str:
    """A path on FS as a user would write it: with its scheme (s3://bucket/key) unless it is local."""
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


def part_name(pair_ids: list[str]) -> str:
    """A file name derived from the rows it holds: a retried write produces the same name."""
    digest = hashlib.sha256("\n".join(pair_ids).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"


def write_part(fs: pafs.FileSystem, directory: str, table: pa.Table, metadata: dict[bytes, bytes]) -> None:
    """Write TABLE atomically as a part file in DIRECTORY, named by the pair ids it holds."""
    name = part_name(table.column("pair_id").to_pylist())
    write_table_atomic(fs, f"{directory}/{name}", table, metadata)


# ---- fingerprints ------------------------------------------------------------------------------------

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


# ---- reading a finished split ------------------------------------------------------------------------


@dataclass
class CacheSplit:
    """A finished, verified split of a precompute output: its location (a path or URI) and its data files
    (paths on `filesystem`)."""

    path: str
    manifest: dict[str, Any]
    files: list[str] = field(default_factory=list)
    filesystem: pafs.FileSystem | None = None

    @property
    def num_rows(self) -> int:
        return int(self.manifest["counts"]["written"])

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(path, filesystem=self.filesystem, columns=columns) for path in self.files]
        return pa.concat_tables(tables) if tables else data_schema(False).empty_table()

    def to_ray_dataset(self):
        import ray.data

        return ray.data.read_parquet(self.files, filesystem=self.filesystem)

    def to_pandas(self, columns: list[str] | None = None):
        return self.read_table(columns).to_pandas()


def split_state(path: str) -> str:
    """'missing', 'finished', 'partial' (part files or a pending marker, no manifest)."""
    fs, root = resolve(path)
    if fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File:
        return "finished"
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return "missing"
    listing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    return "partial" if any(info.type == pafs.FileType.File for info in listing) else "missing"


def open_split(path: str) -> CacheSplit:
    """Open a finished split and verify it against its manifest: every listed file present and whole."""
    fs, root = resolve(path)
    manifest = read_json(fs, f"{root}/{MANIFEST}")
    if manifest is None:
        state = split_state(path)
        what = (
            "an unfinished precompute output (no manifest)"
            if state == "partial"
            else "not a precompute output"
        )
        raise RaydpoError(f"{path} is {what}; run `raydpo precompute` to (re)build it")
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        raise RaydpoError(
            f"{path}: unsupported cache format {manifest.get('format')!r} v{manifest.get('schema_version')}"
        )
    files = []
    for entry in manifest["files"]:
        directory, _, name = str(entry["path"]).partition("/")
        if directory not in (DATA_DIR, REJECTS_DIR) or not name.startswith(PART_PREFIXES) or "/" in name:
            raise RaydpoError(f"{path}: the manifest lists {entry['path']!r}, which is not a part file here")
        file_path = f"{root}/{entry['path']}"
        try:
            rows = pq.ParquetFile(file_path, filesystem=fs).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as error:
            raise RaydpoError(
                f"{path}: {entry['path']} is missing or corrupt ({error}); recompute it"
            ) from None
        if rows != entry["rows"]:
            raise RaydpoError(f"{path}: {entry['path']} has {rows} rows, the manifest says {entry['rows']}")
        if entry["path"].startswith(f"{DATA_DIR}/"):
            files.append(file_path)
    return CacheSplit(path=location(path), manifest=manifest, files=files, filesystem=fs)


def list_parts(fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    """Complete part files in a directory (temporary files are hidden and skipped)."""
    selector = pafs.FileSelector(directory, allow_not_found=True)
    return sorted(
        (
            info
            for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name.startswith(PART_PREFIXES)
            and info.base_name.endswith(".parquet")
        ),
        key=lambda info: info.path,
    )


# ---- the lock ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(path: str) -> Iterator[None]:
    """Hold OUTPUT/.lock for the run; a second run into the same directory stops with the owner's details.

    A lock left by a process that died on this host is taken over. On object stores (no atomic create)
    the lock is skipped: do not run two precomputes into one bucket prefix.
    """
    fs, root = resolve(path)
    if not isinstance(fs, pafs.LocalFileSystem):
        yield
        return
    os.makedirs(root, exist_ok=True)
    lock = os.path.join(root, LOCK)
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_owner(lock)
            if holder and holder.get("host") == owner["host"] and not _pid_alive(holder.get("pid")):
                os.unlink(lock)  # stale: its owner died on this host
                continue
            raise RaydpoError(
                f"{path} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                f"since {holder.get('started')}); wait for it or remove {lock} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as handle:
            json.dump(owner, handle)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _lock_owner(lock: str) -> dict[str, Any]:
    try:
        with open(lock) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
