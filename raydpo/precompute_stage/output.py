"""The split directory as a run finds it: up to date (nothing to do), unfinished with the same inputs
(resumed: the input rows already written are kept and skipped), or holding other inputs (refused, or
replaced with --overwrite).
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydpo import cache
from raydpo.errors import RaydpoError, one_line

logger = logging.getLogger(__name__)


def prepare_output(path: str, key: str, overwrite: bool) -> cache.RowRanges | None:
    """Decide what to do with the split directory: None if already finished with this key, else the input
    rows to skip (those a crashed run with the same key already wrote)."""
    fs, root = cache.resolve(path)
    state = cache.split_state(path)
    if state == "finished":
        if cache.read_manifest(path).key == key:
            cache.open_split(path)  # verify the files before calling it a hit
            return None
        if not overwrite:
            raise RaydpoError(
                f"{path} already holds a precompute of different inputs (model, tokenizer, settings or data "
                "changed); choose another --output or pass --overwrite"
            )
    elif state == "partial":
        pending = cache.read_json(fs, f"{root}/{cache.PENDING}") or {}
        if pending.get("key") == key and not overwrite:
            done = _written_rows(path, key)
            logger.warning(
                "%s: resuming an unfinished run; %d rows already written are kept", path, done.rows
            )
            return done
        if not overwrite:
            raise RaydpoError(
                f"{path} holds an unfinished precompute of different inputs; pass --overwrite to replace it"
            )
    if state != "missing":
        fs.delete_dir_contents(root, missing_dir_ok=True)
    fs.create_dir(f"{root}/{cache.DATA_DIR}", recursive=True)
    fs.create_dir(f"{root}/{cache.REJECTS_DIR}", recursive=True)
    cache.write_bytes_atomic(fs, f"{root}/{cache.PENDING}", json.dumps({"key": key}).encode())
    return cache.RowRanges.empty()


def _written_rows(path: str, key: str) -> cache.RowRanges:
    """The input rows that part files of this key already hold, from their footers.

    A part file whose bytes can be read but do not parse is torn, and one written for another key is
    stale: both are deleted and their rows recomputed. A file that cannot be read at all (on an object
    store perhaps a passing network error) stops the run and is kept, for the rerun to read."""
    fs, root = cache.resolve(path)
    ranges = []
    for directory in (cache.DATA_DIR, cache.REJECTS_DIR):
        for info in cache.list_parts(fs, f"{root}/{directory}"):
            try:
                file_key, rows = _part_rows(info.path, fs)
            except (OSError, pa.ArrowInvalid):
                file_key, rows = _reread_part(fs, info.path, cache.join(path, directory, info.base_name))
            if file_key != key:
                fs.delete_file(info.path)
                continue
            ranges.append(rows)
    return cache.RowRanges.union(ranges)


def _part_rows(source, fs: pafs.FileSystem | None = None) -> tuple[str, cache.RowRanges]:
    """The cache key a part file was written for, and its input rows (its footer only is read)."""
    metadata = pq.read_metadata(source, filesystem=fs).metadata or {}
    key = metadata.get(cache.KEY_METADATA, b"").decode()
    return key, cache.RowRanges.from_json(metadata.get(cache.ROWS_METADATA, b"[]"))


def _reread_part(fs: pafs.FileSystem, file_path: str, shown: str) -> tuple[str | None, cache.RowRanges]:
    """A part file that failed to open, read again whole and parsed in memory: a parse error now is the
    file's own (key None: torn); a read error is the storage's, which the run does not act on."""
    try:
        with fs.open_input_file(file_path) as handle:
            payload = handle.read()
    except OSError as error:
        raise RaydpoError(
            f"cannot read {shown} ({one_line(error)}); it was kept: rerun the same command to resume"
        ) from None
    try:
        return _part_rows(pa.BufferReader(payload))
    except (OSError, pa.ArrowInvalid):
        return None, cache.RowRanges.empty()
