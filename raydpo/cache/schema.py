"""The names and Parquet schemas of a precompute output: what one split directory holds.

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

import hashlib

import pyarrow as pa

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


def part_name(pair_ids: list[str]) -> str:
    """A file name derived from the rows it holds: a retried write produces the same name."""
    digest = hashlib.sha256("\n".join(pair_ids).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"
