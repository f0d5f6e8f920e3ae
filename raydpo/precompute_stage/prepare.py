"""Raw rows to prepared rows, the CPU tasks of the precompute: each row validated and tokenized into a
pair, or a counted reject with its reason; the first rows checked before any scoring."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raydpo import cache
from raydpo.config import PrecomputeConfig
from raydpo.data import RowError, canonical_pair, parse_row, reject_id, row_text
from raydpo.errors import RaydpoError, one_line
from raydpo.precompute_stage.progress import report
from raydpo.precompute_stage.splits import SplitFilter
from raydpo.sources import SOURCE_ROW
from raydpo.tokenize import cached_tokenizer, tokenize_pair

PREPARED_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source_row", pa.int64()),  # the row's position in the input (`sources.SOURCE_ROW`)
        ("status", pa.string()),  # "ok", "rejected" or "done" (already in the output: resumed run)
        ("reason", pa.string()),
        ("row_json", pa.string()),
        ("prompt_input_ids", cache.TOKEN_LIST),
        ("chosen_input_ids", cache.TOKEN_LIST),
        ("rejected_input_ids", cache.TOKEN_LIST),
        ("truncated", pa.bool_()),
    ]
)


def check_rows(ds, tokenizer, config: PrecomputeConfig) -> None:
    """Fail fast on the first rows: a missing column or a missing chat template stops before any scoring."""
    try:
        head = ds.take(8)
    except Exception as error:  # reader errors (bad Parquet, unreadable files) surface here
        raise RaydpoError(f"could not read the dataset: {one_line(error)}") from None
    if not head:
        raise RaydpoError("the dataset is empty")
    rows, errors = [], []
    for row in head:
        row.pop(SOURCE_ROW, None)
        try:
            rows.append(parse_row(row))
        except RowError as error:
            errors.append(str(error))
    if not rows:
        raise RaydpoError(
            f"could not read the dataset: none of its first {len(head)} records is usable ({errors[0]})"
        )
    columns = set().union(*rows)
    if not {"chosen", "rejected"} <= columns:
        raise RaydpoError(
            f"the dataset needs 'chosen' and 'rejected' columns (with 'prompt' or 'conversations', or neither "
            f"for an implicit prompt); it has: {', '.join(sorted(columns)) or 'none'}"
        )
    if config.id_column and config.id_column not in columns:
        raise RaydpoError(f"id column {config.id_column!r} is not in the dataset")
    pairs = []
    for row in rows:
        try:
            pairs.append(canonical_pair(row, config.id_column))
        except RowError:
            continue
    if any(pair.conversational for pair in pairs) and tokenizer.chat_template is None:
        raise RaydpoError("the data is conversational but the tokenizer has no chat template")


def prepare_batch(
    batch: pa.Table,
    *,
    tokenizer_path: str,
    trust_remote_code: bool,
    tokenizer_digest: str,
    id_column: str | None,
    max_length: int | None,
    max_prompt_length: int | None,
    done_rows=None,
    progress=None,
    keep: SplitFilter | None = None,
) -> pa.Table:
    """Validate and tokenize a batch of raw rows; every row comes out, as a pair or as a reject (or as
    "done", unparsed, where an earlier run of the same key wrote it), but those KEEP sends to the other
    side of a carve."""
    import ray

    tokenizer = cached_tokenizer(tokenizer_path, trust_remote_code, tokenizer_digest)
    positions = batch.column(SOURCE_ROW).to_numpy()
    ranges = ray.get(done_rows) if isinstance(done_rows, ray.ObjectRef) else done_rows
    done = ranges.contains(positions) if ranges else np.zeros(len(positions), dtype=bool)
    out: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
    rows = batch.drop_columns([SOURCE_ROW]).to_pylist()
    for raw, position, skip in zip(rows, positions, done, strict=True):
        position = int(position)
        if skip:
            _append(out, "", position, "done")
            continue
        row = raw
        try:
            row = parse_row(raw)
            pair = canonical_pair(row, id_column)
            tokens = tokenize_pair(tokenizer, pair, max_length, max_prompt_length)
        except RowError as error:
            _append(out, reject_id(row, id_column), position, "rejected", str(error), row_text(raw))
            continue
        _append(
            out,
            pair.pair_id,
            position,
            "ok",
            prompt=tokens.prompt_ids,
            chosen=tokens.chosen_ids,
            rejected=tokens.rejected_ids,
            truncated=tokens.truncated,
        )
    table = pa.table(out, schema=PREPARED_SCHEMA)
    if keep is not None:
        table = table.filter(keep.mask(table))
    statuses = table.column("status").to_pylist()
    report(progress, read=len(statuses), rejected=statuses.count("rejected"), done=statuses.count("done"))
    return table


def _append(
    out: dict[str, list],
    pair_id: str,
    source_row: int,
    status: str,
    reason: str | None = None,
    row_json: str | None = None,
    prompt=None,
    chosen=None,
    rejected=None,
    truncated=None,
) -> None:
    for column, value in zip(
        PREPARED_SCHEMA.names,
        (pair_id, source_row, status, reason, row_json, prompt, chosen, rejected, truncated),
        strict=True,
    ):
        out[column].append(value)
