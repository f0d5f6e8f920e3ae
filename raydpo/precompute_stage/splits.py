"""Where the train and eval splits of a precompute come from, and an eval split carved from the training
data.

`plan_splits` decides it before Ray starts: `dataset` and `eval_dataset` (or `eval_split`, another split
of `dataset`), or one source carved in two by `eval_split_ratio` or `eval_split_count`. A carve sends each
pair to one side by a seeded hash of its pair id, not by its position: a rerun, a resumed run or a
reordered input gives the same split, and rows that share an id (duplicates) land on the same side.
`warn_shared_ids` counts the eval pairs that the train split also holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydpo import cache
from raydpo.config import PrecomputeConfig
from raydpo.errors import RaydpoError
from raydpo.hf_data import HfOptions, HfSplit, find_split
from raydpo.sources import DataFiles, find_files

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

HASH_RANGE = 2**64


def id_hashes(pair_ids: list[str], seed: int) -> np.ndarray:
    """Each pair id's 64-bit BLAKE2b hash keyed by SEED: the same on every run, process and machine."""
    key = str(seed).encode()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8, key=key).digest(), "big")
            for pair_id in pair_ids
        ),
        dtype=np.uint64,
        count=len(pair_ids),
    )


@dataclass(frozen=True)
class SplitFilter:
    """The rows one side of a carve keeps: the eval side those whose id hash is at most `threshold`."""

    side: str  # "train" or "eval"
    seed: int
    threshold: int

    def mask(self, table: pa.Table) -> pa.Array:
        """Which rows of a prepared batch this side keeps: its pairs and rejects (by their ids), and the
        rows an earlier run of this side already wrote ("done")."""
        in_eval = id_hashes(table.column("pair_id").to_pylist(), self.seed) <= np.uint64(self.threshold)
        done = pc.equal(table.column("status"), "done").to_numpy(zero_copy_only=False)
        return pa.array(done | (in_eval if self.side == "eval" else ~in_eval))


class EvalCarve:
    """An eval split carved from the training data, by a ratio (each pair with that probability) or a
    count (the pairs of smallest hash); the threshold is found once, for both sides."""

    def __init__(self, ratio: float | None, count: int | None, seed: int) -> None:
        self.ratio, self.count, self.seed = ratio, count, seed
        self.threshold: int | None = None

    @classmethod
    def of(cls, config: PrecomputeConfig) -> EvalCarve | None:
        if config.eval_split_ratio is None and config.eval_split_count is None:
            return None
        return cls(config.eval_split_ratio, config.eval_split_count, config.eval_split_seed)

    def settings(self) -> dict[str, Any]:
        """What the cache key records of the carve."""
        return {"ratio": self.ratio, "count": self.count, "seed": self.seed}

    def filter(self, side: str, prepared: Callable[[], ray.data.Dataset]) -> SplitFilter:
        """SIDE's filter; for a count, PREPARED() (the input validated and tokenized) is read once to
        rank the usable pairs' hashes."""
        if self.threshold is None:
            if self.count is None:
                self.threshold = max(0, int(self.ratio * HASH_RANGE) - 1)
            else:
                logger.info("finding the %d pairs of the eval split (eval_split_count)", self.count)
                self.threshold = _count_threshold(prepared(), self.count, self.seed)
        return SplitFilter(side, self.seed, self.threshold)


def _count_threshold(prepared: ray.data.Dataset, count: int, seed: int) -> int:
    """The hash of the COUNT-th smallest distinct usable pair id: the eval side gets exactly COUNT pairs."""
    batches = prepared.map_batches(
        _smallest_hashes, batch_format="pyarrow", fn_kwargs={"count": count, "seed": seed}
    ).iter_batches(batch_format="numpy")
    found = [batch["hash"] for batch in batches]
    distinct = np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    if len(distinct) <= count:
        raise RaydpoError(
            f"eval_split_count {count} leaves no pair to train on: the data has {len(distinct)} usable pairs"
        )
    return int(distinct[count - 1])


def _smallest_hashes(batch: pa.Table, count: int, seed: int) -> dict[str, np.ndarray]:
    """A batch's COUNT + 1 smallest distinct hashes of usable pairs (the one more tells a COUNT that
    would leave no pair to train on)."""
    usable = batch.filter(pc.equal(batch.column("status"), "ok")).column("pair_id").to_pylist()
    return {"hash": np.unique(id_hashes(usable, seed))[: count + 1]}


@dataclass(frozen=True)
class SplitSource:
    """What one split of the output reads: the source as given, its split, what was found for it before
    Ray started (data files or a Hugging Face split; None for a ray.data.Dataset), and for a carved
    split, the carve and its side."""

    source: Any
    split: str
    found: DataFiles | HfSplit | None
    carve: EvalCarve | None = None
    side: str = "train"

    def key_settings(self) -> dict[str, Any]:
        """What the cache key adds for this split: the carve and the side, if carved."""
        return {} if self.carve is None else {"eval_carve": {**self.carve.settings(), "side": self.side}}


def plan_splits(
    config: PrecomputeConfig, dataset: Any = None, eval_dataset: Any = None
) -> dict[str, SplitSource]:
    """The train split's source and the eval split's, if any, found and checked before Ray starts: a
    missing source, or a split a Hugging Face dataset lacks, is one line. DATASET and EVAL_DATASET are the
    Python API's (a `ray.data.Dataset` perhaps), in place of the config's."""
    train = dataset if dataset is not None else config.dataset
    if train is None:
        raise RaydpoError("no dataset given (--dataset)")
    carve = EvalCarve.of(config)
    if carve is not None and eval_dataset is not None:
        raise RaydpoError("eval_dataset and eval_split_ratio/eval_split_count exclude each other")
    evaluated = eval_dataset if eval_dataset is not None else config.eval_dataset
    if evaluated is None and config.eval_split is not None:
        evaluated = train  # eval_split alone: another split of the same dataset
    options = HfOptions(config.dataset_config, config.dataset_revision, config.data_files)
    plan = {"train": _find(train, config.split, options, carve)}
    if carve is not None:
        plan["eval"] = dataclasses.replace(plan["train"], side="eval")
    elif evaluated is not None:
        same = evaluated is train or (isinstance(evaluated, str) and evaluated == train)
        plan["eval"] = _find(evaluated, config.eval_split or config.split, options if same else HfOptions())
        if same and not isinstance(plan["eval"].found, HfSplit):  # files have no splits: eval = train
            raise RaydpoError(
                f"eval_split {config.eval_split or config.split!r} names a split of a Hugging Face dataset, "
                "and the dataset is data files; set eval_dataset, eval_split_ratio or eval_split_count"
            )
    return plan


def _find(source: Any, split: str, options: HfOptions, carve: EvalCarve | None = None) -> SplitSource:
    if not isinstance(source, str):
        if options.given():
            raise RaydpoError("dataset_config, dataset_revision and data_files name a Hugging Face dataset")
        return SplitSource(source, split, None, carve)
    files = None if options.given() else find_files(source)
    found = files if files is not None else find_split(source, split, options)
    return SplitSource(source, split, found, carve)


def shared_pair_ids(train_path: str, eval_path: str) -> int:
    """How many of the eval split's pair ids the train split also holds; reads the `pair_id` column only,
    one train part file at a time (a split holds each id once)."""
    eval_ids = cache.open_split(eval_path).read_table(["pair_id"]).column("pair_id").combine_chunks()
    train = cache.open_split(train_path)
    shared = 0
    for path in train.files:
        ids = pq.read_table(path, filesystem=train.filesystem, columns=["pair_id"]).column("pair_id")
        shared += pc.sum(pc.is_in(ids, value_set=eval_ids)).as_py() or 0
    return shared


def warn_shared_ids(train_path: str, eval_path: str) -> int:
    """Log a warning with the count of eval pairs that are also train pairs (an eval file that overlaps
    the training data: its metrics then measure pairs trained on); returns the count."""
    shared = shared_pair_ids(train_path, eval_path)
    if shared:
        logger.warning(
            "%d pair%s of the eval split %s also in the train split (the same pair_id): eval metrics on "
            "them measure pairs the policy trains on",
            shared,
            "" if shared == 1 else "s",
            "is" if shared == 1 else "are",
        )
    return shared
