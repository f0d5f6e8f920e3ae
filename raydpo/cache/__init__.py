"""The precompute output, the contract between the two stages: its Parquet schema and layout
(`schema`), its manifest (`manifest`), the fingerprints that key it (`fingerprint`), where it lives and
how it is written (`store`), and how a finished split is read (`split`).

    from raydpo import cache
    split = cache.read_output("out/cache")      # a verified CacheSplit
    split.manifest.counts.written, split.to_ray_dataset()
"""

from raydpo.cache.fingerprint import cache_key, file_sha256, model_fingerprint
from raydpo.cache.manifest import Counts, Fingerprints, Manifest, PartFile, Throughput
from raydpo.cache.rows import ROWS_METADATA, RowRanges
from raydpo.cache.schema import (
    COMPLETE_MARKER,
    DATA_DIR,
    DATA_SCHEMA,
    FORMAT,
    KEY_METADATA,
    LOCK,
    MANIFEST,
    MANIFEST_METADATA,
    PART_PREFIXES,
    PENDING,
    REASONS_METADATA,
    REFERENCE_COLUMNS,
    REJECT_SCHEMA,
    REJECTS_DIR,
    SCHEMA_VERSION,
    TOKEN_LIST,
    data_schema,
    part_name,
)
from raydpo.cache.split import CacheSplit, open_split, read_manifest, read_output
from raydpo.cache.store import (
    concurrently,
    is_uri,
    join,
    list_parts,
    location,
    output_lock,
    publish_directory,
    published,
    read_footers,
    read_json,
    resolve,
    shown,
    split_state,
    write_bytes_atomic,
    write_part,
    write_table_atomic,
)

__all__ = [
    "COMPLETE_MARKER",
    "DATA_DIR",
    "DATA_SCHEMA",
    "FORMAT",
    "KEY_METADATA",
    "LOCK",
    "MANIFEST",
    "MANIFEST_METADATA",
    "PART_PREFIXES",
    "PENDING",
    "REASONS_METADATA",
    "REFERENCE_COLUMNS",
    "REJECTS_DIR",
    "REJECT_SCHEMA",
    "ROWS_METADATA",
    "SCHEMA_VERSION",
    "TOKEN_LIST",
    "CacheSplit",
    "Counts",
    "Fingerprints",
    "Manifest",
    "PartFile",
    "RowRanges",
    "Throughput",
    "cache_key",
    "concurrently",
    "data_schema",
    "file_sha256",
    "is_uri",
    "join",
    "list_parts",
    "location",
    "model_fingerprint",
    "open_split",
    "output_lock",
    "part_name",
    "published",
    "publish_directory",
    "read_footers",
    "read_json",
    "read_manifest",
    "read_output",
    "resolve",
    "shown",
    "split_state",
    "write_bytes_atomic",
    "write_part",
    "write_table_atomic",
]
