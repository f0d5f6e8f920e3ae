"""Preference data sources -> a Ray Dataset of numbered rows, with a fingerprint of what was opened.

A source is a JSON, JSONL, CSV or Parquet file or folder (local or a pyarrow URI such as `s3://`), a
Hugging Face dataset (a hub id, a `save_to_disk` folder, a checked-out dataset repository or files named
by split; one split of it, found by `hf_data`), or an in-memory Ray Dataset. Every row is numbered by its place in the source (`SOURCE_ROW`); the rows are
parsed into pairs by `data.parse_row` and `data.canonical_pair`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydpo.data import JSON_RECORD
from raydpo.digests import data_file_sha256
from raydpo.errors import RaydpoError
from raydpo.hf_data import HfSplit, find_split, is_hf_folder

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

# Every input row's position in the source, carried from the reader to the output (`source_row`):
# `file_index << FILE_SHIFT | record` for files (in the fingerprint's sorted order), the row's index for a
# Hugging Face or Ray dataset. It orders the rows ("first occurrence" of a duplicate id is the smallest)
# and lets a resumed run skip whole ranges of rows already written.
SOURCE_ROW = "_raydpo_source_row"
FILE_SHIFT = 32

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_NAMES = {"json": "JSON", "csv": "CSV", "parquet": "Parquet"}


@dataclass(frozen=True)
class DataFiles:
    """A path's or URI's data files, listed and checked (one kind, none that would be left unread), and
    their fingerprint: the kind and each file's content digest in the files' order (`digests`: a file is
    read once, so a copy elsewhere or a `touch` keeps the fingerprint; the paths are not part of it)."""

    paths: list[str]
    kind: str  # "json" (JSON or JSONL), "csv" or "parquet"
    filesystem: Any  # pyarrow's
    fingerprint: dict[str, Any]


def find_files(source: str) -> DataFiles | None:
    """The data files of `source`, or None where it names a Hugging Face dataset (a hub id, or one saved
    or checked out locally). Needs no Ray: a stage calls it before it joins a cluster, so a missing or
    unreadable source is refused at once."""
    if not isinstance(source, str) or not source:
        raise RaydpoError("dataset must be a path, a URI or a ray.data.Dataset")
    files, filesystem = _list_files(source)
    if files is None:
        return None
    formats = {FILE_FORMATS.get(_suffix(info.path)) for info in files} - {None}
    if not formats:
        raise RaydpoError(f"no .json, .jsonl, .csv or .parquet files under {source}")
    if len(formats) > 1:
        mixed = " and ".join(sorted(FORMAT_NAMES[kind] for kind in formats))
        raise RaydpoError(f"{source} mixes {mixed} files; point to one kind")
    unread = [info.base_name for info in files if _suffix(info.path) in UNREAD_DATA_SUFFIXES]
    if unread:  # rows in them would be left out without a word
        shown = ", ".join(unread[:3]) + (f" and {len(unread) - 3} more" if len(unread) > 3 else "")
        raise RaydpoError(
            f"{source} also holds data files raydpo does not read ({shown}): convert them to JSON, JSONL, "
            "CSV or Parquet, or move them out"
        )
    paths = [info.path for info in files if _suffix(info.path) in FILE_FORMATS]
    kind = formats.pop()
    digests = [data_file_sha256(filesystem, path) for path in paths]
    return DataFiles(paths, kind, filesystem, {"kind": "files", "format": kind, "files": digests})


def open_source(
    source: str | ray.data.Dataset, split: str = "train", files: DataFiles | HfSplit | None = None
) -> tuple[ray.data.Dataset, dict]:
    """Open a preference data source as a Ray Dataset of numbered rows (`SOURCE_ROW`), with a fingerprint
    of what was opened: `files` where `find_files` or `hf_data.find_split` found them already.

    Files are fingerprinted by their contents, a Hugging Face dataset by its own fingerprint, an
    in-memory Ray Dataset by its rows.
    """
    import ray.data

    if isinstance(source, ray.data.Dataset):
        # digested before numbering: a dataset's blocks may have different columns (rows of `from_items`
        # with and without `tools`), and dropping the number column would project every block to the first's
        materialized = source.materialize()
        return _numbered(materialized), {
            "kind": "ray_dataset",
            "content": dataset_content_digest(materialized),
        }
    files = files or find_files(source) or find_split(source, split)
    if isinstance(files, HfSplit):
        return _open_hf(files)
    if files.kind == "parquet":
        return _read_parquet_numbered(files.paths, files.filesystem), files.fingerprint
    listing = ray.data.from_items(
        [{"path": path, "file_index": index} for index, path in enumerate(files.paths)],
        override_num_blocks=len(files.paths),
    )
    records = csv_records if files.kind == "csv" else json_records
    return listing.flat_map(records, fn_kwargs={"filesystem": files.filesystem}), files.fingerprint


def json_records(file: dict[str, Any], filesystem=None) -> list[dict[str, Any]]:
    """Split one JSON or JSONL file into raw records: a top-level array's items, else its non-blank lines.

    Records stay bytes until `parse_row`, so types may differ between records (Arrow's JSON reader wants
    one schema per file) and a record with invalid UTF-8 spoils only itself. An array that does not
    parse is one record, and so one reject with the parser's reason. Each record is numbered
    (`SOURCE_ROW`) by its file's index and its place in the file.
    """
    data = _read_bytes(file["path"], filesystem)
    if data.lstrip()[:1] != b"[":
        records = [line for line in data.split(b"\n") if line.strip()]
    else:
        try:
            records = [
                json.dumps(item).encode() for item in json.loads(data.decode("utf-8", "surrogateescape"))
            ]
        except json.JSONDecodeError:
            records = [data]
    return _numbered_records(file["file_index"], records)


def csv_records(file: dict[str, Any], filesystem=None) -> list[dict[str, Any]]:
    """Split one CSV file into raw records: each row below the header becomes a JSON record of its cells
    (text, as the standard format has it), parsed and rejected as a JSON record is. Invalid UTF-8 in a
    cell spoils only its row; a row shorter than the header lacks the last columns."""
    text = _read_bytes(file["path"], filesystem).decode("utf-8", "surrogateescape")
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a long answer is one cell, not an error
    rows = csv.DictReader(io.StringIO(text, newline=""))
    return _numbered_records(file["file_index"], [json.dumps(row).encode() for row in rows])


def _read_bytes(path: str, filesystem) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read().removeprefix(codecs.BOM_UTF8)


def _numbered_records(file_index: int, records: list[bytes]) -> list[dict[str, Any]]:
    """Raw records numbered (`SOURCE_ROW`) by their file's index and their place in the file."""
    base = file_index << FILE_SHIFT
    return [{JSON_RECORD: record, SOURCE_ROW: base + index} for index, record in enumerate(records)]


def _read_parquet_numbered(paths: list[str], filesystem) -> ray.data.Dataset:
    """Parquet files read a row group per block, each row numbered by its file and place in the file."""
    import pyarrow.parquet as pq
    import ray.data

    pieces = []
    for file_index, path in enumerate(paths):  # footers only: the cost grows with the files, not the rows
        metadata = pq.read_metadata(path, filesystem=filesystem)
        offset = file_index << FILE_SHIFT
        for group in range(metadata.num_row_groups):
            pieces.append({"path": path, "row_group": group, "first": offset})
            offset += metadata.row_group(group).num_rows
    if not pieces:
        raise RaydpoError(f"no rows in {', '.join(paths)}")
    listing = ray.data.from_items(pieces, override_num_blocks=len(pieces))
    return listing.map_batches(
        _read_row_groups, batch_size=1, batch_format="pyarrow", fn_kwargs={"filesystem": filesystem}
    )


def _read_row_groups(pieces, filesystem) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for piece in pieces.to_pylist():
        table = pq.ParquetFile(piece["path"], filesystem=filesystem).read_row_group(piece["row_group"])
        rows = pa.array(range(piece["first"], piece["first"] + table.num_rows), pa.int64())
        tables.append(table.append_column(SOURCE_ROW, rows))
    return pa.concat_tables(tables)


def _numbered(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """A Ray Dataset's rows numbered in its block order (it is materialized once for that)."""
    import ray
    import ray.data

    number = ray.remote(_number_block)
    refs, first = [], 0
    for bundle in dataset.materialize().iter_internal_ref_bundles():
        for block, metadata in zip(bundle.block_refs, bundle.metadata, strict=True):
            refs.append(number.remote(block, first))
            first += metadata.num_rows
    return ray.data.from_arrow_refs(refs)


def _number_block(block, first: int):
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    table = BlockAccessor.for_block(block).to_arrow()
    rows = pa.array(range(first, first + table.num_rows), pa.int64())
    return table.append_column(SOURCE_ROW, rows)


def _suffix(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:].lower() if dot >= 0 else ""


def _list_files(source: str):
    """Files under a local path or pyarrow URI; (None, None) if it is not a file or folder of data files."""
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(source)
    except (ValueError, TypeError):  # a plain path; pyarrow's ArrowInvalid is a ValueError
        filesystem, path = pafs.LocalFileSystem(), source
    if isinstance(filesystem, pafs.LocalFileSystem):
        path = str(Path(path).resolve())
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info], filesystem
    if info.type != pafs.FileType.Directory:
        if not is_hub_id(source):
            raise RaydpoError(f"dataset not found: {source}")
        return None, None  # a name for datasets.load_dataset
    if is_hf_folder(filesystem, path):
        return None, None  # saved with datasets.save_to_disk, or laid out for datasets.load_dataset
    selector = pafs.FileSelector(path, recursive=True)
    files = [
        entry
        for entry in filesystem.get_file_info(selector)
        if entry.type == pafs.FileType.File and not entry.base_name.startswith((".", "_"))
    ]
    return sorted(files, key=lambda entry: entry.path), filesystem


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
DATA_SUFFIXES = (*FILE_FORMATS, ".txt", ".arrow", ".gz", ".zst")
UNREAD_DATA_SUFFIXES = (".arrow", ".gz", ".zst")  # in a folder: data left out unless refused


def is_hub_id(source: str) -> bool:
    """Whether a source that is not an existing file or folder reads as a Hugging Face hub dataset id.

    Hub ids are `name` or `org/name` of letters, digits, `-`, `_` and `.` (`org/name-2.5-data` is one);
    a URI, a path starting with `/`, `.` or `~`, a deeper path, or a name ending in a data file's suffix
    is a path that does not exist.
    """
    return (
        HUB_ID.fullmatch(source) is not None
        and ".." not in source
        and not source.lower().endswith(DATA_SUFFIXES)
    )


def _open_hf(split: HfSplit) -> tuple[ray.data.Dataset, dict]:
    """A Hugging Face dataset's split (`hf_data`), its rows numbered in blocks of 1024."""
    import ray.data

    loaded = split.load()
    # from_arrow, not from_huggingface: the latter asks the hub for Parquet files of datasets it
    # believes come from there, which a local or offline dataset does not have.
    import pyarrow as pa

    table = loaded.data.table
    rows_per_block = max(1, min(table.num_rows, 1024))
    blocks = [
        table.slice(start, rows_per_block).append_column(
            SOURCE_ROW, pa.array(range(start, min(start + rows_per_block, table.num_rows)), pa.int64())
        )
        for start in range(0, table.num_rows, rows_per_block)
    ]
    return ray.data.from_arrow(blocks or [table]), {"kind": "huggingface", "fingerprint": loaded._fingerprint}


def dataset_content_digest(dataset: ray.data.Dataset) -> str:
    """An order-independent digest of a Ray Dataset's rows: one cheap pass, no model.

    Each row hashes to two 32-bit numbers; their sums (which cannot overflow int64 below 2**31 rows) and
    the row count make the digest.
    """

    def row_digests(batch: Any) -> dict[str, Any]:
        import numpy as np

        hashes = [
            hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).digest()
            for row in batch.to_dict("records")
        ]
        return {
            "high": np.asarray([int.from_bytes(h[:4], "big") for h in hashes], dtype=np.int64),
            "low": np.asarray([int.from_bytes(h[4:8], "big") for h in hashes], dtype=np.int64),
            "one": np.ones(len(hashes), dtype=np.int64),
        }

    sums = dataset.map_batches(row_digests, batch_format="pandas").sum(["high", "low", "one"]) or {}
    return "{}:{:x}:{:x}".format(*(int(sums.get(f"sum({key})", 0) or 0) for key in ("one", "high", "low")))
