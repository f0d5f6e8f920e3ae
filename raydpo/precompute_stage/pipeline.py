"""Stage 1: reference log-probs for every preference pair, computed once and cached as Parquet.

The Ray Data plan, streaming end to end: read -> validate and tokenize (CPU tasks, `prepare_batch`) ->
score on an actor pool (`ReferenceScorer`, one reference model per actor, batches sorted by length) ->
write Parquet part files (`CacheSink`) -> verify and write the manifest (`finish`).

    raydpo precompute --model MODEL --dataset data.json --output cache/
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, NoReturn

from raydpo import cache
from raydpo.cluster import init_ray, worker_env
from raydpo.config import PrecomputeConfig, coerce
from raydpo.errors import DEATH_CAUSES, PrecomputeFailed, one_line, process_died, raised_within
from raydpo.numerics import resolve_numerics
from raydpo.precompute_stage.output import prepare_output
from raydpo.precompute_stage.prepare import check_rows, prepare_batch
from raydpo.precompute_stage.progress import Progress, restarts_phrase
from raydpo.precompute_stage.scorer import ReferenceScorer
from raydpo.precompute_stage.sink import CacheSink, SplitInputs, finish
from raydpo.precompute_stage.splits import SplitFilter, SplitSource, plan_splits, warn_shared_ids
from raydpo.resources import (
    check_cpu_headroom,
    cpu_process_env,
    default_processes,
    processes_per_node,
    warn_unused_gpus,
)
from raydpo.shared_paths import Markers, check_shared_paths, remove_markers
from raydpo.sources import open_source
from raydpo.tokenize import (
    load_tokenizer,
    pad_token_id,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)


@dataclass
class SplitResult:
    """What one split's precompute produced (or found already cached)."""

    name: str
    path: str
    cached: bool
    manifest: cache.Manifest

    @property
    def counts(self) -> cache.Counts:
        return self.manifest.counts

    def summary(self) -> str:
        counts, stats = self.counts, self.manifest.throughput
        head = "cached, nothing to do" if self.cached else f"{stats.wall_time_s:.1f}s"
        saved = stats.tokens_saved_by_prefix_sharing
        sharing = f", prompts computed once ({saved / stats.tokens:.1%} fewer tokens)" if saved else ""
        restarted = f", {restarts_phrase(stats.scorer_restarts)}" if stats.scorer_restarts else ""
        rejected = f"{counts.rejected} rejected"
        if counts.reject_reasons:  # the commonest reason; every row's in OUTPUT/<split>/rejects
            reason, count = max(counts.reject_reasons.items(), key=lambda item: item[1])
            rejected += f" ({count} {reason}; see rejects/)"
        return (
            f"{self.name}: {counts.read} rows read, {counts.written} written, "
            f"{rejected}; {stats.tokens} tokens, {stats.tokens_per_s:.0f} tokens/s, "
            f"{stats.padding_fraction:.1%} padding{sharing}{restarted} ({head}) -> {self.path}"
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
    # the sources found and checked before Ray starts: a missing or unreadable source, or a split the
    # dataset lacks, is one line
    plan = plan_splits(config, dataset, eval_dataset)
    tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    fingerprints = {
        "model": cache.model_fingerprint(config.model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    init_ray(config.ray_address)
    markers = check_shared_paths(  # left in the output for writers on nodes that join later
        outputs={"the output": config.output},
        inputs={
            "the model": config.model,
            "the dataset": config.dataset if dataset is None else None,
            "the eval dataset": config.eval_dataset if eval_dataset is None else None,
        },
    )
    try:
        config, actors_reason = _with_actors(config)
        if not config.gpus_per_actor:
            warn_unused_gpus("scorer actors", "set --gpus-per-actor 1")
            check_cpu_headroom(
                config.num_actors,
                config.cpus_per_actor,
                "scorer actors",
                "lower --num-actors or --cpus-per-actor",
            )
        result = PrecomputeResult(output=cache.location(config.output))
        with cache.output_lock(config.output), _progress_bars_off():
            for name, planned in plan.items():
                result.splits[name] = _precompute_split(
                    config, name, planned, tokenizer, fingerprints, (actors_reason, markers)
                )
    finally:
        remove_markers(markers)
    if result.eval is not None and plan["eval"].carve is None:  # a carve shares no id by construction
        warn_shared_ids(result.train.path, result.eval.path)
    return result


def _with_actors(config: PrecomputeConfig) -> tuple[PrecomputeConfig, str]:
    """The config with its number of scorer actors, and why: as set, else `default_processes` of the
    cluster joined."""
    if config.num_actors is not None:
        return config, "as num_actors sets"
    actors, reason = default_processes(
        config.gpus_per_actor, config.cpus_per_actor, "gpus_per_actor", "--num-actors"
    )
    return dataclasses.replace(config, num_actors=actors), f"{reason}; --num-actors sets them"


def _actors(count: int) -> str:
    return f"{count} scorer actor{'s' if count != 1 else ''}"


@contextlib.contextmanager
def _progress_bars_off():
    """Ray Data's progress bars (one per operator and dataset) off for the datasets made meanwhile: the
    stage prints a line of its own (`Progress`)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = before


def _precompute_split(
    config: PrecomputeConfig,
    name: str,
    planned: SplitSource,
    tokenizer,
    fingerprints: dict[str, Any],
    placement: tuple[str, Markers],
) -> SplitResult:
    """One split: check its first rows, key it by what determines the values, then reuse, resume or
    compute its output directory."""
    ds, dataset_fingerprint = open_source(planned.source, planned.split, planned.found)
    if config.limit is not None:
        ds = ds.limit(config.limit)
    check_rows(ds, tokenizer, config)
    settings = _settings(config)
    key = cache.cache_key(
        {
            **fingerprints,
            "dataset": dataset_fingerprint,
            "split": planned.split,
            "limit": config.limit,
            **settings,
            **planned.key_settings(),
        }
    )
    inputs = SplitInputs(
        name=name,
        path=cache.join(config.output, name),
        source=planned.source,
        key=key,
        fingerprints={**fingerprints, "dataset": dataset_fingerprint},
        settings=settings,
    )
    done_rows = prepare_output(inputs.path, key, config.overwrite)
    if done_rows is None:
        logger.info("%s: up to date (same model, tokenizer, settings and data); nothing to do", inputs.path)
        return SplitResult(name, inputs.path, True, cache.open_split(inputs.path).manifest)

    actors_reason, markers = placement  # why this many actors; the markers each writer looks for
    logger.info("%s for the %s split: %s", _actors(config.num_actors), name, actors_reason)
    started = time.perf_counter()
    runtime_env = worker_env()  # RAYDPO_* variables (fault drills) reach the scorers and the writers
    tokenizer_digest = cache.cache_key(fingerprints["tokenizer"])
    keep = planned.carve and planned.carve.filter(name, lambda: _prepared(ds, config, tokenizer_digest, None))
    total = None if keep else _known_rows(ds, dataset_fingerprint, config.limit)  # a carve reads a share
    with Progress(name, total=total) as progress:
        prepared = _prepared(ds, config, tokenizer_digest, done_rows, progress.tally, keep)
        scored = _scored(prepared, config, tokenizer, settings, scorer_env(config), progress.tally)
        sink = CacheSink(
            inputs.path, key, config.store_token_logps, config.rows_per_file, progress.tally, markers
        )
        # The writes take no CPU slot: each is short, and a tokenizing task holds its slot for the whole of
        # its input file (paced by the scorers), so with the slots taken by tokenizing and scoring, writes
        # needing one would wait until a file is done while scored pairs pile up unwritten.
        try:
            _streamed(scored).write_datasink(
                sink, ray_remote_args={"num_cpus": 0, **({"runtime_env": runtime_env} if runtime_env else {})}
            )
        except Exception as error:
            _stopped(error, inputs.path, config.max_actor_restarts)
    totals = {**sink.totals, "scorer_restarts": progress.counts.get("restarts", 0)}
    manifest = finish(inputs, config, totals, time.perf_counter() - started)
    return SplitResult(name, inputs.path, False, manifest)


def _stopped(error: Exception, path: str, restarts: int) -> NoReturn:
    """The one line of a split's run that stopped: a check that failed in a scorer or a task (a GPU torch
    cannot use, a model that fails its load-time check) is bad input; anything else failed the run,
    whose written part files a rerun keeps."""
    bad_input = raised_within(error)
    if bad_input is not None:
        raise bad_input from error
    died = process_died(error)
    reason = (
        f"a scorer actor's process died ({died}) and --max-actor-restarts {restarts} allows no more "
        f"restarts; {DEATH_CAUSES}"
        if died
        else one_line(error, limit=1000)
    )
    raise PrecomputeFailed(
        f"precompute failed: {reason}; rerun the same command to resume: the pairs written to {path} are kept"
    ) from error


def scorer_env(config: PrecomputeConfig) -> dict[str, Any] | None:
    """The scorer actors' runtime env: the stage's, and on CPUs no GPU visible and `cpu_allocator`
    preloaded (with glibc's malloc a scorer's heap grows with the pairs it scores)."""
    return worker_env(None if config.gpus_per_actor else cpu_process_env(config.cpu_allocator))


def _known_rows(ds, fingerprint: dict[str, Any], limit: int | None) -> int | None:
    """The input's row count where it is known without reading the data (a Hugging Face or in-memory
    dataset is held in blocks of known size), else None."""
    if fingerprint["kind"] not in ("huggingface", "ray_dataset"):
        return None
    rows = ds.count()
    return rows if limit is None else min(rows, limit)


def _settings(config: PrecomputeConfig) -> dict[str, Any]:
    """The settings that determine the values: tokenization, numerics as resolved, id column, layout."""
    return {
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


def _prepared(
    ds,
    config: PrecomputeConfig,
    tokenizer_digest: str,
    done_rows: cache.RowRanges | None,
    progress=None,
    keep: SplitFilter | None = None,
):
    """DS validated and tokenized by CPU tasks into PREPARED_SCHEMA; the rows in DONE_ROWS (already
    written by an earlier run) come out as "done", unparsed; with KEEP, a carved split's rows only.

    The tasks get no runtime env of their own (tokenizing has no fault point): the read fuses with them
    only where the two ask for the same. Unfused, a read task paused until its output is consumed holds
    a CPU slot, and on a small machine whose other slot the scorer holds the tokenizing never starts."""
    import ray

    return ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        fn_kwargs={
            "tokenizer_path": config.tokenizer or config.model,
            "trust_remote_code": config.trust_remote_code,
            "tokenizer_digest": tokenizer_digest,
            "id_column": config.id_column,
            "max_length": config.max_length,
            "max_prompt_length": config.max_prompt_length,
            # a few ranges in the usual case; a large list travels once through the object store
            "done_rows": (ray.put(done_rows) if len(done_rows) > 1024 else done_rows) if done_rows else None,
            "progress": progress,
            "keep": keep,
        },
    )


def _scored(
    prepared,
    config: PrecomputeConfig,
    tokenizer,
    settings: dict[str, Any],
    runtime_env: dict | None,
    progress=None,
):
    """PREPARED scored on an actor pool of reference models, `batch_size * sort_window` rows a call."""
    import ray.data

    # one scorer call per block of a call's rows, each returning its block, which goes on to the writers
    call_rows = config.batch_size * config.sort_window
    calls = prepared.repartition(target_num_rows_per_block=call_rows)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return calls.map_batches(
            ReferenceScorer,
            batch_format="pyarrow",
            batch_size=call_rows,
            # two calls in flight per actor: one running, one queued; the queue does not grow with the data
            compute=ray.data.ActorPoolStrategy(size=config.num_actors, max_tasks_in_flight_per_actor=2),
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
                # on CPUs each actor sizes its threads by the cores of the node it runs on
                "num_threads": config.cpu_threads_per_actor,
                "cpus": config.cpus_per_actor,
                "pool_size": processes_per_node(config.num_actors),
                "cpu_allocator": config.cpu_allocator,
                "progress": progress,
            },
        )


STREAM_BLOCK_BYTES = 2**20  # what a task's output gathers before it is handed on (Ray Data's: 128 MiB)


def _streamed(ds):
    """DS set to keep its blocks in order and to stream them in small blocks, on its own copy of the Data
    context.

    With Ray Data's default block size, a task's output is handed on when the task ends: an input file
    read and tokenized whole before the scorers see a pair of it, and its scored pairs written when all
    are scored. Blocks of STREAM_BLOCK_BYTES keep reading, tokenizing, scoring and writing going
    together. A dataset shares its context with the datasets it derives from (a caller's
    `ray.data.Dataset` among them), and some share the process-wide `DataContext`; a copy changes
    neither."""
    import ray.data

    ordered = ray.data.Dataset.copy(ds, _deep_copy=True)
    ordered.context.execution_options.preserve_order = True
    ordered.context.target_max_block_size = STREAM_BLOCK_BYTES
    return ordered
