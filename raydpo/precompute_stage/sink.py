"""The precompute stage's datasink and its finishing step.

`CacheSink` writes each scored block as atomic Parquet part files (pairs to data/, rejects to rejects/)
and sums what went through; `finish` then verifies the split directory (every pair exactly once,
duplicates moved to rejects) and writes the manifest last.
"""

from __future__ import annotations

import time
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
from raydpo.precompute_stage.scorer import COMPUTED_TOKENS, FORWARD_TOKENS


class CacheSink(Datasink):
    """Ray Data datasink: each block's pairs go to data/, its rejects to rejects/, in files of at most
    rows_per_file rows, each written atomically."""

    def __init__(self, path: str, key: str, store_token_logps: bool, rows_per_file: int):
        self.path = path  # a path or URI: the workers resolve it, with their own credentials
        self.key = key
        self.schema = cache.data_schema(store_token_logps)
        self.rows_per_file = rows_per_file
        self.totals: dict[str, Any] = {}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict[str, Any]:
        from ray.data.block import BlockAccessor

        fs, root = cache.resolve(self.path)
        totals: Counter = Counter()
        reasons: Counter = Counter()
        metadata = {cache.KEY_METADATA: self.key.encode()}
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            status = table.column("status")
            accepted = table.filter(pc.equal(status, "ok"))
            rejected = table.filter(pc.equal(status, "rejected"))
            totals["done"] += table.num_rows - accepted.num_rows - rejected.num_rows
            if accepted.num_rows:
                self._account(totals, accepted)
                data = _with_lengths(accepted).select(self.schema.names).cast(self.schema)
                for part in self._files(data):
                    cache.write_part(fs, f"{root}/{cache.DATA_DIR}", part, metadata)
                    fault_point("precompute.write")
            if rejected.num_rows:
                totals["rejected"] += rejected.num_rows
                reasons.update(rejected.column("reason").to_pylist())
                rejects = rejected.select(cache.REJECT_SCHEMA.names).cast(cache.REJECT_SCHEMA)
                for part in self._files(rejects):
                    cache.write_part(fs, f"{root}/{cache.REJECTS_DIR}", part, metadata)
        return {"totals": dict(totals), "reasons": dict(reasons)}

    def _files(self, table: pa.Table) -> list[pa.Table]:
        """A block's rows in files of at most rows_per_file (Ray Data may hand over larger blocks)."""
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
    """The part files of a split directory, read back: files, row counts and reject reasons."""

    files: list[cache.PartFile] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)


def finish(
    inputs: SplitInputs, config: PrecomputeConfig, totals: dict[str, Any], wall_time: float
) -> cache.Manifest:
    """Verify what is on disk (every pair exactly once), then write the manifest last."""
    fs, root = cache.resolve(inputs.path)
    _reject_duplicates(fs, root, inputs.key)
    on_disk = _read_back(fs, root, inputs.path)
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


def _read_back(fs: pafs.FileSystem, root: str, path: str) -> _OnDisk:
    """Every part file's pair ids (and reject reasons); a pair id written twice is an error."""
    on_disk, seen = _OnDisk(), set()
    for directory, counter in ((cache.DATA_DIR, "written"), (cache.REJECTS_DIR, "rejected")):
        for info in cache.list_parts(fs, f"{root}/{directory}"):
            table = pq.read_table(
                info.path, filesystem=fs, columns=["pair_id"] + (["reason"] if counter == "rejected" else [])
            )
            ids = table.column("pair_id").to_pylist()
            if counter == "written":
                if seen.intersection(ids) or len(set(ids)) != len(ids):  # _reject_duplicates failed us
                    raise RaydpoError(f"{path}: pair ids are not unique in the written data")
                seen.update(ids)
            else:
                on_disk.reasons.update(table.column("reason").to_pylist())
            on_disk.counts[counter] += len(ids)
            on_disk.files.append(cache.PartFile(f"{directory}/{info.base_name}", len(ids)))
    on_disk.counts["read"] = on_disk.counts["written"] + on_disk.counts["rejected"]
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
    )


def _reject_duplicates(fs: pafs.FileSystem, root: str, key: str) -> None:
    """Keep the first occurrence of each pair id; later ones move to rejects with the reason.

    Identical rows share a content-hash id (the sample data has some), and a repeated id column value
    would make joins ambiguous. Duplicates are found after scoring, so the stream never needs global
    state; only the part files that hold one are rewritten.
    """
    seen: set[str] = set()
    metadata = {cache.KEY_METADATA: key.encode()}
    for info in cache.list_parts(fs, f"{root}/{cache.DATA_DIR}"):
        keep = []
        for pair_id in (
            pq.read_table(info.path, filesystem=fs, columns=["pair_id"]).column("pair_id").to_pylist()
        ):
            keep.append(pair_id not in seen)
            seen.add(pair_id)
        if all(keep):
            continue  # only the ids were read; the token columns are read only for a file to rewrite
        table = pq.read_table(info.path, filesystem=fs)
        mask = pa.array(keep)
        extras = table.filter(pc.invert(mask)).column("pair_id")
        rejects = pa.table(
            {
                "pair_id": extras,
                "reason": pa.array(["duplicate pair_id: an earlier row has the same id"] * len(extras)),
                "row_json": pa.nulls(len(extras), pa.string()),
            },
            schema=cache.REJECT_SCHEMA,
        )
        cache.write_table_atomic(fs, f"{root}/{cache.REJECTS_DIR}/dup-{info.base_name}", rejects, metadata)
        kept = table.filter(mask).replace_schema_metadata(None)
        if kept.num_rows:
            cache.write_part(fs, f"{root}/{cache.DATA_DIR}", kept, metadata)
        fs.delete_file(info.path)
