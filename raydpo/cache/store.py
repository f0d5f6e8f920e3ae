"""Where a precompute output lives: local paths and URIs (s3://, gs://), atomic writes, publishing a
finished directory, listing part files, and the lock that keeps two runs out of one output."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydpo.cache.schema import COMPLETE_MARKER, LOCK, MANIFEST, PART_PREFIXES, part_name
from raydpo.errors import RaydpoError, one_line

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


def write_part(fs: pafs.FileSystem, directory: str, table: pa.Table, metadata: dict[bytes, bytes]) -> None:
    """Write TABLE atomically as a part file in DIRECTORY, named by the input rows it holds."""
    name = part_name(table.column("source_row").to_pylist())
    write_table_atomic(fs, f"{directory}/{name}", table, metadata)


def concurrently(function, items: list, threads: int = 16) -> list:
    """FUNCTION of each item, in order, from a few threads: for reads whose time is an object store's
    round trip. The first exception raised is raised."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(function, items))


def read_footers(fs: pafs.FileSystem, paths: list[str]) -> list[pq.FileMetaData]:
    """The Parquet footers of PATHS, read concurrently.

    Raises what a failed read raises: OSError for the storage, ArrowInvalid for a file that is torn."""
    return concurrently(lambda path: pq.read_metadata(path, filesystem=fs), paths)


def split_state(path: str) -> str:
    """'missing', 'finished', 'partial' (part files or a pending marker, no manifest)."""
    fs, root = resolve(path)
    if fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File:
        return "finished"
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return "missing"
    listing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    return "partial" if any(info.type == pafs.FileType.File for info in listing) else "missing"


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


def make_local_dir(path: str, what: str) -> None:
    """Create a local directory (and its parents), or stop with one line that says why it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RaydpoError(f"the {what} {path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise RaydpoError(
            f"the {what} {path} cannot be created: {error.strerror or one_line(error)}"
        ) from None


@contextlib.contextmanager
def output_lock(path: str) -> Iterator[None]:
    """Hold OUTPUT/.lock for the run; a second run into the same directory stops with the owner's details.

    A lock left by a process that died on this host is taken over. On object stores (no atomic create)
    the lock is skipped: do not run two precomputes into one bucket prefix. A directory the run created
    and left without a file (it failed before writing) is removed with the lock.
    """
    fs, root = resolve(path)
    if not isinstance(fs, pafs.LocalFileSystem):
        yield
        return
    created = not os.path.exists(root)
    make_local_dir(root, "output")
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
        if created and not any(files for _, _, files in os.walk(root)):
            shutil.rmtree(root, ignore_errors=True)


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
