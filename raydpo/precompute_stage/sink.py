"""The precompute stage's datasink and its finishing step.

`CacheSink` writes each scored block as atomic Parquet part files (pairs to data/, rejects to rejects/)
and sums what went through; `finish` then verifies the split directory (every pair exactly once,
duplicates moved to rejects) and writes the manifest last.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from raydpo import cache
from raydpo.config import PrecomputeConfig
from raydpo.errors import RaydpoError
from raydpo.faults import fault_point
from raydpo.precompute_stage.progress import report
from raydpo.precompute_stage.scorer import COMPUTED_TOKENS, FORWARD_TOKENS
from raydpo.shared_paths import Markers, check_visible


class CacheSink(Datasink):
    """Ray Data datasink: each block's pairs go to data/, its rejects to rejects/, in files of at most
    rows_per_file rows, each written atomically."""

    def __init__(
        self,
        path: str,
        key: str,
        store_token_logps: bool,
        rows_per_file: int,
        progress=None,
        markers: Markers | None = None,
    ):
        self.path = path  # a path or URI: the workers resolve it, with their own credentials
        self.key = key
        self.progress = progress  # a `progress.Tally` handle, or None
        self.schema = cache.data_schema(store_token_logps)
        self.rows_per_file = rows_per_file
        self.totals: dict[str, Any] = {}
        self.markers = markers or {}  # the driver's markers in the output, for nodes that joined later

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict[str, Any]:
        from ray.data.block import BlockAccessor

        check_visible(self.markers)
        fs, root = cache.resolve(self.path)
        totals: Counter = Counter()
        reasons: Counter = Counter()
        # the blocks of one write (at least rows_per_file rows, in order) make its files together
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        if not tables:
            return {"totals": {}, "reasons": {}}
        table = pa.concat_tables(tables)
        status = table.column("status")
        accepted = table.filter(pc.equal(status, "ok"))
        rejected = table.filter(pc.equal(status, "rejected"))
        totals["done"] += table.num_rows - accepted.num_rows - rejected.num_rows
        if accepted.num_rows:
            self._account(totals, accepted)
            data = _with_lengths(accepted).select(self.schema.names).cast(self.schema)
            for part in self._files(data):
                cache.write_part(fs, f"{root}/{cache.DATA_DIR}", part, part_metadata(part, self.key))
                report(self.progress, written=part.num_rows)
                fault_point("precompute.write")
        if rejected.num_rows:
            totals["rejected"] += rejected.num_rows
            reasons.update(map(reason_kind, rejected.column("reason").to_pylist()))
            rejects = rejected.select(cache.REJECT_SCHEMA.names).cast(cache.REJECT_SCHEMA)
            for part in self._files(rejects):
                cache.write_part(fs, f"{root}/{cache.REJECTS_DIR}", part, part_metadata(part, self.key))
        return {"totals": dict(totals), "reasons": dict(reasons)}

    def _files(self, table: pa.Table) -> list[pa.Table]:
        """A write's rows in files of at most rows_per_file (Ray Data may hand over more rows)."""
        return [
            table.slice(start, self.rows_per_file) for start in range(0, table.num_rows, self.rows_per_file)
        ]

    @staticmethod
    def _account(totals: Counter, accepted: pa.Table) -> None:
        lengths = {
            name: pc.list_value_length(accepted.column(f"{name}_input_ids")).to_numpy()
            for name in ("prompt", "chosen", "rejected")
        }
        totals["written"] += accepted.num_rows
        totals["tokens"] += int((2 * lengths["prompt"] + lengths["chosen"] + lengths["rejected"]).sum())
        totals["forward_tokens"] += int(pc.sum(accepted.column(FORWARD_TOKENS)).as_py() or 0)
        totals["computed_tokens"] += int(pc.sum(accepted.column(COMPUTED_TOKENS)).as_py() or 0)
        totals["truncated"] += int(pc.sum(accepted.column("truncated").cast(pa.int64())).as_py() or 0)

    def on_write_complete(self, write_result) -> None:
        totals: Counter = Counter()
        reasons: Counter = Counter()
        for result in write_result.write_returns:
            totals.update(result["totals"])
            reasons.update(result["reasons"])
        self.totals = {**totals, "reasons": dict(reasons)}


def part_metadata(table: pa.Table, key: str) -> dict[bytes, bytes]:
    """A part file's footer metadata: its cache key, the ranges of its input rows, for rejects the count
    of each reason, and for pairs the count of rows with non-finite reference values (training plans
    its steps from these counts without reading the values)."""
    metadata = {
        cache.KEY_METADATA: key.encode(),
        cache.ROWS_METADATA: cache.RowRanges.of(table.column("source_row").to_numpy()).to_json().encode(),
    }
    if "reason" in table.column_names:
        reasons = Counter(map(reason_kind, table.column("reason").to_pylist()))
        metadata[cache.REASONS_METADATA] = json.dumps(reasons, ensure_ascii=False).encode()
    if cache.REFERENCE_COLUMNS[0] in table.column_names:
        metadata[cache.NONFINITE_METADATA] = json.dumps(cache.nonfinite_counts(table)).encode()
    return metadata


def _with_lengths(table: pa.Table) -> pa.Table:
    for name in ("prompt", "chosen", "rejected"):
        lengths = pc.list_value_length(table.column(f"{name}_input_ids")).cast(pa.int32())
        table = table.append_column(f"{name}_length", lengths)
    return table


@dataclass(frozen=True)
class SplitInputs:
    """What a split's output is computed from: where it goes, its cache key and what the manifest records."""

    name: str  # "train" or "eval"
    path: str  # OUTPUT/<name>, a path or URI
    source: Any  # the dataset as given: a path, a URI or a ray.data.Dataset
    key: str
    fingerprints: dict[str, Any]  # model, tokenizer and dataset
    settings: dict[str, Any]


@dataclass
class _OnDisk:
    """The part files of a split directory as their footers describe them: files, row counts, reject
    reasons and the input rows they hold."""

    files: list[cache.PartFile] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    rows: cache.RowRanges = field(default_factory=cache.RowRanges.empty)


def finish(
    inputs: SplitInputs, config: PrecomputeConfig, totals: dict[str, Any], wall_time: float
) -> cache.Manifest:
    """Verify what is on disk (every input row exactly once, every pair id once), then write the
    manifest last."""
    fs, root = cache.resolve(inputs.path)
    reject_duplicates(inputs.path, inputs.key)
    on_disk = _read_back(fs, root)
    _check_complete(inputs, on_disk, totals)
    manifest = _manifest(inputs, config, on_disk, totals, wall_time)
    payload = manifest.to_json()
    common = cache.data_schema(config.store_token_logps).with_metadata(
        {cache.KEY_METADATA: inputs.key.encode(), cache.MANIFEST_METADATA: payload}
    )
    with fs.open_output_stream(f"{root}/{cache.DATA_DIR}/_common_metadata") as stream:
        pq.write_metadata(common, stream)
    cache.write_bytes_atomic(fs, f"{root}/{cache.MANIFEST}", payload)
    fs.delete_file(f"{root}/{cache.PENDING}")
    return manifest


def _read_back(fs: pafs.FileSystem, root: str) -> _OnDisk:
    """Every part file's rows, reject reasons and input rows, from the footers alone."""
    on_disk, ranges = _OnDisk(), []
    for directory, counter in ((cache.DATA_DIR, "written"), (cache.REJECTS_DIR, "rejected")):
        infos = cache.list_parts(fs, f"{root}/{directory}")
        for info, footer in zip(infos, cache.read_footers(fs, [info.path for info in infos]), strict=True):
            metadata = footer.metadata or {}
            ranges.append(cache.RowRanges.from_json(metadata.get(cache.ROWS_METADATA, b"[]")))
            on_disk.reasons.update(json.loads(metadata.get(cache.REASONS_METADATA, b"{}")))
            on_disk.counts[counter] += footer.num_rows
            on_disk.files.append(cache.PartFile(f"{directory}/{info.base_name}", footer.num_rows))
    on_disk.counts["read"] = on_disk.counts["written"] + on_disk.counts["rejected"]
    on_disk.rows = cache.RowRanges.union(ranges)
    return on_disk


def _check_complete(inputs: SplitInputs, on_disk: _OnDisk, totals: dict[str, Any]) -> None:
    """Some pair was usable, and every row that went through the pipeline is on disk."""
    counts = on_disk.counts
    if counts["written"] == 0:
        top = on_disk.reasons.most_common(1)[0][0] if on_disk.reasons else "none"
        raise RaydpoError(
            f"no usable rows in {inputs.source!r}: all {counts['rejected']} rejected "
            f"(see {cache.join(inputs.path, cache.REJECTS_DIR)}); most common reason: {top}"
        )
    rows_seen = totals.get("written", 0) + totals.get("rejected", 0) + totals.get("done", 0)
    if on_disk.rows.overlap or on_disk.rows.rows != counts["read"]:
        raise RaydpoError(
            f"{inputs.path}: the part files hold {counts['read']} rows for {on_disk.rows.rows} input rows "
            f"({on_disk.rows.overlap} held twice); rerun the same command to repair it"
        )
    if rows_seen != counts["read"]:
        raise RaydpoError(
            f"{inputs.path}: {rows_seen} rows went through the pipeline but {counts['read']} are on disk; "
            "the output is incomplete, rerun the same command to resume"
        )


def _manifest(
    inputs: SplitInputs,
    config: PrecomputeConfig,
    on_disk: _OnDisk,
    totals: dict[str, Any],
    wall_time: float,
) -> cache.Manifest:
    from raydpo import __version__

    source = inputs.source
    return cache.Manifest(
        raydpo_version=__version__,
        key=inputs.key,
        split=inputs.name,
        source=source if isinstance(source, str) else type(source).__name__,
        fingerprints=cache.Fingerprints(**inputs.fingerprints),
        model=config.model,
        tokenizer=config.tokenizer or config.model,
        settings=inputs.settings,
        counts=cache.Counts(
            read=on_disk.counts["read"],
            written=on_disk.counts["written"],
            rejected=on_disk.counts["rejected"],
            truncated_this_run=totals.get("truncated", 0),
            resumed=totals.get("done", 0),
            reject_reasons=dict(on_disk.reasons.most_common()),
        ),
        throughput=_throughput(config, totals, wall_time),
        schema=tuple(cache.data_schema(config.store_token_logps).names),
        files=tuple(on_disk.files),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _throughput(config: PrecomputeConfig, totals: dict[str, Any], wall_time: float) -> cache.Throughput:
    tokens = totals.get("tokens", 0)
    forward_tokens = totals.get("forward_tokens", 0)
    computed_tokens = totals.get("computed_tokens", 0)
    return cache.Throughput(
        wall_time_s=round(wall_time, 3),
        tokens=tokens,
        tokens_per_s=tokens / wall_time if wall_time > 0 else 0.0,
        pairs_per_s=totals.get("written", 0) / wall_time if wall_time > 0 else 0.0,
        padding_fraction=1 - computed_tokens / forward_tokens if forward_tokens else 0.0,
        prefix_sharing="on" if computed_tokens < tokens else "off",  # as the scorers decided
        tokens_computed=computed_tokens,
        tokens_saved_by_prefix_sharing=tokens - computed_tokens,
        num_actors=config.num_actors,
        batch_size=config.batch_size,
        scorer_restarts=totals.get("scorer_restarts", 0),
    )


def reason_kind(reason: str) -> str:
    """What a reject is counted under in the manifest: its reason without the row's own figures
    (`prompt fills max_length (1372 prompt tokens >= max_length 1024)` counts as `prompt fills
    max_length`); the rejects files keep each row's whole reason."""
    return re.sub(r"\d+", "N", re.sub(r" \([^()]*\d[^()]*\)", "", reason))


DUPLICATE_REASON = "duplicate pair_id: an earlier row of the input has the same id"
IDS_PER_TASK = 2_000_000  # ids one duplicate-finding task holds at once (~100 MB)


def reject_duplicates(path: str, key: str) -> int:
    """Keep the first occurrence of each pair id (the smallest `source_row`: first in input order); later
    ones move to rejects with the reason. Returns how many moved.

    Identical rows share a content-hash id (the sample data has some), and a repeated id column value
    would make joins ambiguous. Ray tasks find the duplicates, each over the ids of one hash bucket (one
    bucket per IDS_PER_TASK ids), reading only the id columns; the driver holds only what they return,
    the rows to move, and rewrites just the part files that hold one. Each rewrite writes the rejects
    first and then replaces the file, so an interrupted one is done again by the next run.
    """
    import ray

    fs, root = cache.resolve(path)
    infos = cache.list_parts(fs, f"{root}/{cache.DATA_DIR}")
    rows = sum(footer.num_rows for footer in cache.read_footers(fs, [info.path for info in infos]))
    buckets = max(1, -(-rows // IDS_PER_TASK))
    find = ray.remote(num_cpus=1)(_later_occurrences)
    files = [info.path for info in infos]
    found = ray.get([find.remote(path, files, bucket, buckets) for bucket in range(buckets)])
    later: dict[int, list[int]] = {}
    for file_indices, source_rows in found:
        for file_index, source_row in zip(file_indices, source_rows, strict=True):
            later.setdefault(int(file_index), []).append(int(source_row))
    for file_index, source_rows in sorted(later.items()):
        _move_to_rejects(fs, root, infos[file_index], source_rows, key)
    return sum(len(source_rows) for source_rows in later.values())


def _later_occurrences(path: str, files: list[str], bucket: int, buckets: int) -> tuple[list, list]:
    """In one hash bucket of pair ids: (file index, source_row) of every row whose id an earlier input
    row also has."""
    import numpy as np

    fs, _ = cache.resolve(path)
    tables = []
    for index, file in enumerate(files):
        table = pq.read_table(file, filesystem=fs, columns=["pair_id", "source_row"])
        if buckets > 1:
            hashes = np.fromiter(
                (zlib.crc32(v.encode()) for v in table.column("pair_id").to_pylist()), np.int64
            )
            table = table.filter(pa.array(hashes % buckets == bucket))
        tables.append(table.append_column("file", pa.array(np.full(table.num_rows, index, np.int32))))
    if not tables:
        return [], []
    ids = pa.concat_tables(tables)
    ids = ids.take(pc.sort_indices(ids, [("pair_id", "ascending"), ("source_row", "ascending")]))
    names = ids.column("pair_id").combine_chunks()
    repeat = pc.equal(names.slice(1), names.slice(0, len(names) - 1)).to_numpy(zero_copy_only=False)
    mask = np.concatenate([[False], repeat]) if len(names) else np.zeros(0, bool)
    return ids.column("file").to_numpy()[mask].tolist(), ids.column("source_row").to_numpy()[mask].tolist()


def _move_to_rejects(fs: pafs.FileSystem, root: str, info: pafs.FileInfo, source_rows: list[int], key: str):
    table = pq.read_table(info.path, filesystem=fs).replace_schema_metadata(None)
    later = pc.is_in(table.column("source_row"), pa.array(source_rows, pa.int64()))
    moved = table.filter(later)
    rejects = pa.table(
        {
            "pair_id": moved.column("pair_id"),
            "source_row": moved.column("source_row"),
            "reason": pa.array([DUPLICATE_REASON] * moved.num_rows),
            "row_json": pa.nulls(moved.num_rows, pa.string()),
        },
        schema=cache.REJECT_SCHEMA,
    )
    reject_path = (
        f"{root}/{cache.REJECTS_DIR}/dup-{cache.part_name(rejects.column('source_row').to_pylist())}"
    )
    cache.write_table_atomic(fs, reject_path, rejects, part_metadata(rejects, key))
    kept = table.filter(pc.invert(later))
    if kept.num_rows:
        cache.write_table_atomic(fs, info.path, kept, part_metadata(kept, key))
    else:
        fs.delete_file(info.path)
