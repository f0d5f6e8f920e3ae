"""Stage 1: reference log-probs for every preference pair, computed once and cached as Parquet.

A Ray Data pipeline, streaming end to end: read -> validate and tokenize (CPU tasks) -> score on an
actor pool (one reference model per actor, batches sorted by length) -> write Parquet part files.

    raydpo precompute --model MODEL --dataset data.json --output cache/
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from raydpo import cache
from raydpo.cluster import check_cpu_headroom, check_shared_paths, init_ray, worker_env
from raydpo.config import PrecomputeConfig, coerce
from raydpo.data import RowError, canonical_pair, open_source, parse_row, reject_id, row_text
from raydpo.errors import RaydpoError, one_line
from raydpo.faults import fault_point
from raydpo.numerics import load_causal_lm, resolve_dtype, resolve_numerics
from raydpo.tokenize import (
    cached_tokenizer,
    load_tokenizer,
    pad_token_id,
    tokenize_pair,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)

PREPARED_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("status", pa.string()),  # "ok", "rejected" or "done" (already in the output: resumed run)
        ("reason", pa.string()),
        ("row_json", pa.string()),
        ("prompt_input_ids", cache.TOKEN_LIST),
        ("chosen_input_ids", cache.TOKEN_LIST),
        ("rejected_input_ids", cache.TOKEN_LIST),
        ("truncated", pa.bool_()),
    ]
)
FORWARD_TOKENS = "_forward_tokens"  # padded tokens each pair took in its forward (for the padding figure)
COMPUTED_TOKENS = "_computed_tokens"  # tokens of each pair the model computed (the prompt once if shared)


@dataclass
class SplitResult:
    """What one split's precompute produced (or found already cached)."""

    name: str
    path: str
    cached: bool
    manifest: dict[str, Any]

    @property
    def counts(self) -> dict[str, Any]:
        return self.manifest["counts"]

    def summary(self) -> str:
        counts, stats = self.counts, self.manifest["throughput"]
        head = "cached, nothing to do" if self.cached else f"{stats['wall_time_s']:.1f}s"
        saved = stats.get("tokens_saved_by_prefix_sharing", 0)
        sharing = f", prompts computed once ({saved / stats['tokens']:.1%} fewer tokens)" if saved else ""
        return (
            f"{self.name}: {counts['read']} rows read, {counts['written']} written, "
            f"{counts['rejected']} rejected; {stats['tokens']} tokens, {stats['tokens_per_s']:.0f} tokens/s, "
            f"{stats['padding_fraction']:.1%} padding{sharing} ({head}) -> {self.path}"
        )


@dataclass
class PrecomputeResult:
    """The output directory and, per split, its counts and manifest."""

    output: str
    splits: dict[str, SplitResult] = field(default_factory=dict)

    @property
    def train(self) -> SplitResult:
        return self.splits["train"]

    @property
    def eval(self) -> SplitResult | None:
        return self.splits.get("eval")

    def summary(self) -> str:
        return "\n".join(split.summary() for split in self.splits.values())


def precompute(
    config: PrecomputeConfig | dict | None = None, /, *, dataset=None, eval_dataset=None, **overrides: Any
) -> PrecomputeResult:
    """Compute (or reuse) the reference log-prob cache. Usable from a notebook after `ray.init()`.

    `dataset` / `eval_dataset` may be `ray.data.Dataset` objects instead of paths in the config.
    """
    config = coerce(PrecomputeConfig, config, overrides)
    sources = {"train": (dataset if dataset is not None else config.dataset, config.split)}
    if eval_dataset is not None or config.eval_dataset is not None:
        eval_source = eval_dataset if eval_dataset is not None else config.eval_dataset
        sources["eval"] = (eval_source, config.eval_split or config.split)
    if sources["train"][0] is None:
        raise RaydpoError("no dataset given (--dataset)")

    tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    fingerprints = {
        "model": cache.model_fingerprint(config.model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    init_ray(config.ray_address)
    check_shared_paths(
        outputs={"the output": config.output},
        inputs={
            "the model": config.model,
            "the dataset": config.dataset if dataset is None else None,
            "the eval dataset": config.eval_dataset if eval_dataset is None else None,
        },
    )
    if not config.gpus_per_actor:
        check_cpu_headroom(
            config.num_actors,
            config.cpus_per_actor,
            "scorer actors",
            "lower --num-actors or --cpus-per-actor",
        )
    result = PrecomputeResult(output=cache.location(config.output))
    with cache.output_lock(config.output):
        for name, (source, split) in sources.items():
            result.splits[name] = _precompute_split(config, name, source, split, tokenizer, fingerprints)
    return result


def _precompute_split(
    config: PrecomputeConfig, name: str, source: Any, split: str, tokenizer, fingerprints: dict[str, Any]
) -> SplitResult:
    import ray.data

    ds, dataset_fingerprint = open_source(source, split)
    if config.limit is not None:
        ds = ds.limit(config.limit)
    _check_rows(ds, tokenizer, config)
    settings = {
        **config.tokenization_settings(),
        **resolve_numerics(
            config.model,
            config.dtype,
            config.attn_implementation,
            config.trust_remote_code,
            on_gpu=config.gpus_per_actor > 0,
        ),
        "id_column": config.id_column,
        "store_token_logps": config.store_token_logps,
    }
    key = cache.cache_key(
        {**fingerprints, "dataset": dataset_fingerprint, "split": split, "limit": config.limit, **settings}
    )
    path = cache.join(config.output, name)
    done_ids = _prepare_output(path, key, config.overwrite)
    if done_ids is None:
        logger.info("%s: up to date (same model, tokenizer, settings and data); nothing to do", path)
        return SplitResult(name, path, True, cache.open_split(path).manifest)

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    started = time.perf_counter()
    runtime_env = worker_env()  # RAYDPO_* variables (fault drills) reach the tasks and actors
    prepared = ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        fn_kwargs={
            "tokenizer_path": config.tokenizer or config.model,
            "trust_remote_code": config.trust_remote_code,
            "tokenizer_digest": cache.cache_key(fingerprints["tokenizer"]),
            "id_column": config.id_column,
            "max_length": config.max_length,
            "max_prompt_length": config.max_prompt_length,
            "done_ids": ray.put(done_ids) if done_ids else None,
        },
        runtime_env=runtime_env,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        scored = prepared.map_batches(
            ReferenceScorer,
            batch_format="pyarrow",
            batch_size=config.batch_size * config.sort_window,
            compute=ray.data.ActorPoolStrategy(size=config.num_actors),
            num_gpus=config.gpus_per_actor or None,
            num_cpus=config.cpus_per_actor,
            # a dead actor is restarted and its unfinished batches retried; a model that kills every actor
            # that loads it (out of memory) fails the run after this many restarts instead of looping.
            # (Ray 2.60 has no named parameter for these and warns about the generic route.)
            max_restarts=config.max_actor_restarts,
            max_task_retries=-1,
            runtime_env=runtime_env,
            fn_constructor_kwargs={
                "model": config.model,
                "dtype": settings["dtype"],
                "attn_implementation": settings["attn_implementation"],
                "trust_remote_code": config.trust_remote_code,
                "pad_token_id": pad_token_id(tokenizer),
                "batch_size": config.batch_size,
                "chunk_tokens": config.logits_chunk_tokens,
                "store_token_logps": config.store_token_logps,
                "prefix_sharing": config.prefix_sharing,
                "num_threads": config.cpu_threads_per_actor
                or cpu_threads(config.cpus_per_actor, config.num_actors),
            },
        )
    sink = CacheSink(path, key, config.store_token_logps, config.rows_per_file)
    scored.write_datasink(sink, ray_remote_args={"runtime_env": runtime_env} if runtime_env else None)
    wall_time = time.perf_counter() - started
    manifest = _finish(
        path,
        key,
        sink.totals,
        wall_time,
        config,
        name,
        source,
        fingerprints,
        dataset_fingerprint,
        settings,
    )
    return SplitResult(name, path, False, manifest)


def _check_rows(ds, tokenizer, config: PrecomputeConfig) -> None:
    """Fail fast on the first rows: a missing column or a missing chat template stops before any scoring."""
    try:
        head = ds.take(8)
    except Exception as error:  # reader errors (bad Parquet, unreadable files) surface here
        raise RaydpoError(f"could not read the dataset: {one_line(error)}") from None
    if not head:
        raise RaydpoError("the dataset is empty")
    rows, errors = [], []
    for row in head:
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


def _prepare_output(path: str, key: str, overwrite: bool) -> set[str] | None:
    """Decide what to do with the split directory: None if already finished with this key, else the set of
    pair ids to skip (those a crashed run with the same key already wrote)."""
    fs, root = cache.resolve(path)
    state = cache.split_state(path)
    if state == "finished":
        manifest = cache.read_json(fs, f"{root}/{cache.MANIFEST}")
        if manifest.get("key") == key:
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
            done = _written_ids(path, key)
            logger.warning(
                "%s: resuming an unfinished run; %d pairs already written are kept", path, len(done)
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
    return set()


def _written_ids(path: str, key: str) -> set[str]:
    """The pair ids that part files of this key already hold.

    A part file whose bytes can be read but do not parse is torn, and one written for another key is
    stale: both are deleted and their rows recomputed. A file that cannot be read at all (on an object
    store perhaps a passing network error) stops the run and is kept, for the rerun to read."""
    fs, root = cache.resolve(path)
    done: set[str] = set()
    for directory in (cache.DATA_DIR, cache.REJECTS_DIR):
        for info in cache.list_parts(fs, f"{root}/{directory}"):
            try:
                file_key, ids = _part_ids(info.path, fs)
            except (OSError, pa.ArrowInvalid):
                file_key, ids = _reread_part(fs, info.path, cache.join(path, directory, info.base_name))
            if file_key != key:
                fs.delete_file(info.path)
                continue
            done.update(ids)
    return done


def _part_ids(source, fs: pafs.FileSystem | None = None) -> tuple[str, list[str]]:
    """The cache key a part file was written for, and its pair ids."""
    parquet = pq.ParquetFile(source, filesystem=fs)
    key = (parquet.schema_arrow.metadata or {}).get(cache.KEY_METADATA, b"").decode()
    return key, parquet.read(columns=["pair_id"]).column("pair_id").to_pylist()


def _reread_part(fs: pafs.FileSystem, file_path: str, shown: str) -> tuple[str | None, list[str]]:
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
        return _part_ids(pa.BufferReader(payload))
    except (OSError, pa.ArrowInvalid):
        return None, []


def prepare_batch(
    batch: pa.Table,
    *,
    tokenizer_path: str,
    trust_remote_code: bool,
    tokenizer_digest: str,
    id_column: str | None,
    max_length: int | None,
    max_prompt_length: int | None,
    done_ids=None,
) -> pa.Table:
    """Validate and tokenize a batch of raw rows; every row comes out, as a pair or as a reject."""
    import ray

    tokenizer = cached_tokenizer(tokenizer_path, trust_remote_code, tokenizer_digest)
    skip = ray.get(done_ids) if isinstance(done_ids, ray.ObjectRef) else (done_ids or set())
    out: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
    for raw in batch.to_pylist():
        row = raw
        try:
            row = parse_row(raw)
            pair = canonical_pair(row, id_column)
            if pair.pair_id in skip:
                _append(out, pair.pair_id, "done")
                continue
            tokens = tokenize_pair(tokenizer, pair, max_length, max_prompt_length)
        except RowError as error:
            pair_id = reject_id(row, id_column)
            status = "done" if pair_id in skip else "rejected"
            _append(out, pair_id, status, str(error), row_text(raw))
            continue
        _append(
            out,
            pair.pair_id,
            "ok",
            prompt=tokens.prompt_ids,
            chosen=tokens.chosen_ids,
            rejected=tokens.rejected_ids,
            truncated=tokens.truncated,
        )
    return pa.table(out, schema=PREPARED_SCHEMA)


def _append(
    out: dict[str, list],
    pair_id: str,
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
        (pair_id, status, reason, row_json, prompt, chosen, rejected, truncated),
        strict=True,
    ):
        out[column].append(value)


def cpu_threads(cpus_per_actor: float, num_actors: int) -> int:
    """Torch threads of a CPU scorer: this machine's cores shared among the pool, at least its CPUs.

    A forward is matrix work that scales with threads, and the tokenize tasks beside it are light, so
    a single scorer on a 2-core machine runs 2 threads rather than the 1 CPU Ray reserved for it."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, int(cpus_per_actor), cores // num_actors)


class ReferenceScorer:
    """Scores prepared batches with the reference model: a plain callable class for `map_batches`.

    It loads the model once; each call sorts its pairs by length, runs forwards of `batch_size` pairs
    (chosen and rejected together: one row per pair with prefix sharing, else two), and returns the
    batch with the reference log-prob columns added.
    Ray restarts a dead scorer actor (up to `max_actor_restarts` times) and retries its unfinished
    batches, and part files are named by content, so a retried batch rewrites its own file rather than
    adding a second copy.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        pad_token_id: int = 0,
        batch_size: int = 8,
        chunk_tokens: int = 2048,
        store_token_logps: bool = False,
        prefix_sharing: str = "auto",
        num_threads: int | None = None,
        cpus: float = 1.0,
        pool_size: int = 1,
    ):
        import torch

        from raydpo.logprobs import check_head_path, use_prefix_sharing

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads or cpu_threads(cpus, pool_size))
        dtype = resolve_dtype(dtype, on_gpu=self.device.type == "cuda")
        loaded = load_causal_lm(model, dtype, attn_implementation, trust_remote_code)
        self.model = loaded.to(self.device).eval()
        check_head_path(self.model, self.model.config.vocab_size)
        self.shared = use_prefix_sharing(self.model, prefix_sharing)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens
        self.store_token_logps = store_token_logps

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from raydpo.logprobs import completion_logps, pack_batch, pair_width

        fault_point("precompute.score")

        ok = np.flatnonzero(pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False))
        prompts = batch.column("prompt_input_ids").to_pylist()
        chosens = batch.column("chosen_input_ids").to_pylist()
        rejecteds = batch.column("rejected_input_ids").to_pylist()
        columns = {name: [None] * batch.num_rows for name in self._output_names()}
        columns[FORWARD_TOKENS] = [0] * batch.num_rows
        columns[COMPUTED_TOKENS] = [0] * batch.num_rows
        width = {i: pair_width(len(prompts[i]), len(chosens[i]), len(rejecteds[i]), self.shared) for i in ok}
        order = sorted(ok, key=lambda i: width[i], reverse=True)  # longest first: memory peaks early
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            packed = pack_batch(
                [prompts[i] for i in rows],
                [chosens[i] for i in rows],
                [rejecteds[i] for i in rows],
                self.pad_token_id,
                self.shared,
            ).to(self.device)
            with torch.inference_mode():
                scores = completion_logps(self.model, packed, self.chunk_tokens)
            self._collect(columns, rows, scores, packed.input_ids.shape[1])
            for i in rows:
                columns[COMPUTED_TOKENS][i] = (
                    width[i] if self.shared else 2 * len(prompts[i]) + len(chosens[i]) + len(rejecteds[i])
                )
        out = batch
        for name, values in columns.items():
            dtype = (
                pa.list_(pa.float32())
                if name.endswith("token_logps")
                else (pa.int64() if name in (FORWARD_TOKENS, COMPUTED_TOKENS) else pa.float32())
            )
            out = out.append_column(name, pa.array(values, type=dtype))
        return out

    def _output_names(self) -> list[str]:
        names = [name for name in cache.DATA_SCHEMA.names if name.startswith("ref_")]
        if self.store_token_logps:
            names += ["ref_chosen_token_logps", "ref_rejected_token_logps"]
        return names

    def _collect(self, columns: dict[str, list], rows: list[int], scores, width: int) -> None:
        sums = [t.float().cpu().numpy() for t in (scores.sums, scores.shared_sums, scores.tail_sums)]
        pairs = len(rows)
        for k, i in enumerate(rows):
            columns["ref_chosen_logps"][i] = float(sums[0][k])
            columns["ref_rejected_logps"][i] = float(sums[0][pairs + k])
            columns["ref_chosen_logps_shared"][i] = float(sums[1][k])
            columns["ref_chosen_logps_tail"][i] = float(sums[2][k])
            columns["ref_rejected_logps_shared"][i] = float(sums[1][pairs + k])
            columns["ref_rejected_logps_tail"][i] = float(sums[2][pairs + k])
            columns[FORWARD_TOKENS][i] = width if self.shared else 2 * width
        if self.store_token_logps:
            token_logps = scores.token_logps.cpu()
            mask = scores.target_mask.cpu()
            for k, i in enumerate(rows):
                columns["ref_chosen_token_logps"][i] = token_logps[k][mask[k]].tolist()
                columns["ref_rejected_token_logps"][i] = token_logps[pairs + k][mask[pairs + k]].tolist()


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


def _finish(
    path: str,
    key: str,
    totals: dict[str, Any],
    wall_time: float,
    config: PrecomputeConfig,
    name: str,
    source: Any,
    fingerprints: dict[str, Any],
    dataset_fingerprint: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Verify what is on disk (every pair exactly once), then write the manifest last."""
    from raydpo import __version__

    fs, root = cache.resolve(path)
    _reject_duplicates(fs, root, key)
    files, counts, seen = [], Counter(), set()
    reasons: Counter = Counter()
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
                reasons.update(table.column("reason").to_pylist())
            counts[counter] += len(ids)
            files.append({"path": f"{directory}/{info.base_name}", "rows": len(ids)})
    counts["read"] = counts["written"] + counts["rejected"]
    if counts["written"] == 0:
        top = reasons.most_common(1)[0][0] if reasons else "none"
        raise RaydpoError(
            f"no usable rows in {source!r}: all {counts['rejected']} rejected (see {cache.join(path, cache.REJECTS_DIR)}); "
            f"most common reason: {top}"
        )
    rows_seen = totals.get("written", 0) + totals.get("rejected", 0) + totals.get("done", 0)
    if rows_seen != counts["read"]:
        raise RaydpoError(
            f"{path}: {rows_seen} rows went through the pipeline but {counts['read']} are on disk; "
            "the output is incomplete, rerun the same command to resume"
        )
    tokens = totals.get("tokens", 0)
    forward_tokens = totals.get("forward_tokens", 0)
    computed_tokens = totals.get("computed_tokens", 0)
    manifest = {
        "format": cache.FORMAT,
        "schema_version": cache.SCHEMA_VERSION,
        "raydpo_version": __version__,
        "key": key,
        "split": name,
        "source": source if isinstance(source, str) else type(source).__name__,
        "fingerprints": {**fingerprints, "dataset": dataset_fingerprint},
        "model": config.model,
        "tokenizer": config.tokenizer or config.model,
        "settings": settings,
        "counts": {
            "read": counts["read"],
            "written": counts["written"],
            "rejected": counts["rejected"],
            "truncated_this_run": totals.get("truncated", 0),
            "resumed": totals.get("done", 0),
            "reject_reasons": dict(reasons.most_common()),
        },
        "throughput": {
            "wall_time_s": round(wall_time, 3),
            "tokens": tokens,
            "tokens_per_s": tokens / wall_time if wall_time > 0 else 0.0,
            "pairs_per_s": totals.get("written", 0) / wall_time if wall_time > 0 else 0.0,
            "padding_fraction": 1 - computed_tokens / forward_tokens if forward_tokens else 0.0,
            "prefix_sharing": "on" if computed_tokens < tokens else "off",  # as the scorers decided
            "tokens_computed": computed_tokens,
            "tokens_saved_by_prefix_sharing": tokens - computed_tokens,
            "num_actors": config.num_actors,
            "batch_size": config.batch_size,
        },
        "schema": cache.data_schema(config.store_token_logps).names,
        "files": files,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    payload = json.dumps(manifest, indent=2, sort_keys=False).encode()
    common = cache.data_schema(config.store_token_logps).with_metadata(
        {cache.KEY_METADATA: key.encode(), cache.MANIFEST_METADATA: payload}
    )
    with fs.open_output_stream(f"{root}/{cache.DATA_DIR}/_common_metadata") as stream:
        pq.write_metadata(common, stream)
    cache.write_bytes_atomic(fs, f"{root}/{cache.MANIFEST}", payload)
    fs.delete_file(f"{root}/{cache.PENDING}")
    return manifest


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


def read_output(path: str, split: str = "train"):
    """Open a finished precompute output (OUTPUT or OUTPUT/<split>, a path or URI) for inspection or
    training."""
    fs, root = cache.resolve(path)
    if (
        fs.get_file_info(f"{root}/{cache.MANIFEST}").type != pafs.FileType.File
        and fs.get_file_info(f"{root}/{split}").type == pafs.FileType.Directory
    ):
        path = cache.join(path, split)
    return cache.open_split(path)
