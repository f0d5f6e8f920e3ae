"""The names and Parquet schemas of a precompute output: what one split directory holds.

Layout of one split (OUTPUT/train, OUTPUT/eval):

    _pending.json            the run's cache key, while a run is writing (removed when finished)
    data/part-<digest>.parquet      scored pairs, one file per written block, written atomically
    rejects/part-<digest>.parquet   rows that could not be used, with the reason
    data/_common_metadata    Parquet schema + the manifest in its key-value metadata
    manifest.json            written last: a split without it is not a finished cache

Part files are named by a digest of the input rows they hold, so a retried write task rewrites the same
file instead of adding a duplicate. Every row keeps its position in the input (`source_row`), and each
part file's footer holds the ranges of those positions (`rows.ROWS_METADATA`) and, for rejects, the count
of each reason: a rerun after a crash skips the rows already written, and the manifest's counts and its
proof that every input row is there exactly once come from the footers, without reading the rows.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: source_row in data and rejects, row ranges and reasons in part footers
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
        ("source_row", pa.int64()),  # the row's position in the input: see raydpo.data.SOURCE_ROW
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
REJECT_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source_row", pa.int64()),
        ("reason", pa.string()),
        ("row_json", pa.string()),
    ]
)
REASONS_METADATA = b"raydpo.reasons"  # a rejects file's count of each reason, as JSON, in its footer
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def data_schema(store_token_logps: bool) -> pa.Schema:
    schema = DATA_SCHEMA
    for extra in TOKEN_LOGPS_FIELDS if store_token_logps else ():
        schema = schema.append(extra)
    return schema


def part_name(source_rows: list[int]) -> str:
    """A file name derived from the input rows it holds: a retried write produces the same name, and two
    rows with the same pair id (an exact duplicate) never share one."""
    digest = hashlib.sha256("\n".join(map(str, source_rows)).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"
