"""The names and Parquet schemas of a precompute output: what one split directory holds.

Layout of one split (OUTPUT/train, OUTPUT/eval):

    _pending.json            the run's cache key, while a run is writing (removed when finished)
    data/part-<digest>.parquet      scored pairs, one file per written block, written atomically
    rejects/part-<digest>.parquet   rows that could not be used, with the reason
    data/_common_metadata    Parquet schema + the manifest in its key-value metadata
    manifest.json            written last: a split without it is not a finished cache

Part files are named by a digest of the input rows they hold, so a retried write task rewrites the same
file instead of adding a duplicate. Every row keeps its position in the input (`source_row`), and each
part file's footer holds the ranges of those positions (`rows.ROWS_METADATA`), for rejects the count of
each reason, and for pairs the count of rows with a non-finite reference value: a rerun after a crash
skips the rows already written, the manifest's counts and its proof that every input row is there
exactly once come from the footers without reading the rows, and so do training's counts of usable
pairs.
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
SIDES = ("chosen", "rejected")


def reference_column(side: str, part: str | None = None) -> str:
    """The one spelling of a reference column: `ref_chosen_logps` (TRL's name), or its `shared` or
    `tail` part (`ref_chosen_logps_shared`, LD-DPO), or with `part="token"` the per-token values
    (`ref_chosen_token_logps`)."""
    if part == "token":
        return f"ref_{side}_token_logps"
    return f"ref_{side}_logps" + (f"_{part}" if part else "")


REFERENCE_COLUMNS = tuple(reference_column(side) for side in SIDES)
LD_REFERENCE_COLUMNS = tuple(reference_column(side, part) for side in SIDES for part in ("shared", "tail"))
TOKEN_LOGPS_COLUMNS = tuple(reference_column(side, "token") for side in SIDES)
# the reference values a loss reads: the sums, or (LD-DPO) the shared and tail parts
REFERENCE_SETS = (REFERENCE_COLUMNS, LD_REFERENCE_COLUMNS)
DATA_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source_row", pa.int64()),  # the row's position in the input: see raydpo.sources.SOURCE_ROW
        ("prompt_input_ids", TOKEN_LIST),
        ("chosen_input_ids", TOKEN_LIST),
        ("rejected_input_ids", TOKEN_LIST),
        ("prompt_length", pa.int32()),
        ("chosen_length", pa.int32()),
        ("rejected_length", pa.int32()),
        ("truncated", pa.bool_()),
        *((name, pa.float32()) for name in REFERENCE_COLUMNS + LD_REFERENCE_COLUMNS),
    ]
)
TOKEN_LOGPS_FIELDS = [pa.field(name, pa.list_(pa.float32())) for name in TOKEN_LOGPS_COLUMNS]
REJECT_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source_row", pa.int64()),
        ("reason", pa.string()),
        ("row_json", pa.string()),
    ]
)
REASONS_METADATA = b"raydpo.reasons"  # a rejects file's count of each reason, as JSON, in its footer
# a data file's count of rows with a non-finite value, for each of REFERENCE_SETS, as JSON in its footer
NONFINITE_METADATA = b"raydpo.nonfinite_rows"


def finite_mask(table: pa.Table, names) -> pa.ChunkedArray:
    """Whether each row's values in the columns NAMES are all finite (a null is not)."""
    import pyarrow.compute as pc

    mask = None
    for name in names:
        finite = pc.fill_null(pc.is_finite(table.column(name)), False)
        mask = finite if mask is None else pc.and_(mask, finite)
    return mask


def nonfinite_counts(table: pa.Table) -> dict[str, int]:
    """For each of REFERENCE_SETS (named by its columns, comma-joined), the rows of TABLE with a
    non-finite value among them."""
    import pyarrow.compute as pc

    return {
        ",".join(names): table.num_rows - int(pc.sum(finite_mask(table, names)).as_py() or 0)
        for names in REFERENCE_SETS
    }


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
