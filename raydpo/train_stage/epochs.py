"""The pairs a training worker takes, epoch after epoch: each epoch its own seeded order, split equally.

Every epoch is the cached pairs in a new seeded order (`epoch_order`), split equally between the
workers by Ray Data (`streaming_split`, order preserved, so a restarted run sees the same pairs). Rank 0
starts each epoch's split when the workers reach it and hands every rank its part (`split_epoch`). A
split is served by a coordinator actor, a process of about 115 MiB: rank 0 owns them and kills the
ones whose epoch every rank has finished, so at most two are alive however many epochs a run streams
(a long `--max-steps` on a small cache streams hundreds).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from raydpo.config import TrainConfig
from raydpo.train_stage.balance import balanced_micro_batches
from raydpo.train_stage.forward import micro_batches
from raydpo.train_stage.plan import RunPlan

logger = logging.getLogger(__name__)


def epoch_order(train, config: TrainConfig, epoch: int):
    """Epoch `epoch`'s order of the pairs (a lazy Ray Dataset): a full seeded shuffle, or with
    `shuffle: files` the files in a seeded order, which the workers' buffers then shuffle within."""
    if config.shuffle == "full":
        return train.random_shuffle(seed=config.seed + epoch)
    return train.randomize_block_order(seed=config.seed + epoch)


def split_epoch(train, config: TrainConfig, epoch: int, rank: int, world: int, device: torch.device):
    """This rank's equal part of epoch `epoch` (a Ray `DataIterator`), as Ray Train would split a dataset
    it was given (`DataConfig`: order preserved, parts local to each worker's node). A collective:
    every rank calls it together. Rank 0 starts the split and owns its coordinator actor."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions

    dataset = epoch_order(train, config, epoch)
    data_config = ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True))
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return data_config.configure({"train": dataset}, 1, None, [node])[0]["train"]
    import torch.distributed as dist

    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    parts: list[Any] = [None]
    if rank == 0:
        parts = [[split["train"] for split in data_config.configure({"train": dataset}, world, None, nodes)]]
    dist.broadcast_object_list(parts, src=0, device=device)
    return parts[0][rank]


def release_split(part) -> None:
    """Kills the coordinator actor behind a split that every rank has finished reading."""
    import ray

    coordinator = getattr(part, "_coord_actor", None)  # a StreamSplitDataIterator's actor
    if coordinator is not None:
        ray.kill(coordinator)


class EpochBatches:
    """The worker's micro-batches, epoch after epoch.

    An epoch's steps take its first micro-batches; what is left when they are done (fewer than a step's,
    or the spares of skipped micro-batches) is not used. A step whose skipped micro-batches used up its
    epoch takes its replacements from the next one, which then goes on from there. `epoch` and `taken`
    (the micro-batches taken from it, skipped ones too) say where the next one comes from."""

    def __init__(
        self,
        train,
        config: TrainConfig,
        run: RunPlan,
        rank: int,
        device: torch.device,
        epoch: int,
        taken: int,
    ):
        self.train, self.config, self.run, self.rank, self.device = train, config, run, rank, device
        self.epoch, self.taken = epoch, taken
        self.reading: Iterator[dict[str, Any]] | None = None  # the epoch's micro-batches as read
        self.stream: Iterator[dict[str, Any]] | None = None  # the same, regrouped when balanced
        self.opened: dict[int, Any] = {}  # rank 0: the splits it started, by epoch, until released

    def _open(self) -> Iterator[dict[str, Any]]:
        """The epoch's micro-batches after the `taken` ones (skipped as read, before any regrouping)."""
        config, world = self.config, self.run.world_size
        part = split_epoch(self.train, config, self.epoch, self.rank, world, self.device)
        if self.rank == 0:
            self.opened[self.epoch] = part
        batches = self.reading = micro_batches(
            part,
            config.micro_batch_size,
            config.shuffle_buffer if config.shuffle == "files" else None,
            config.seed + self.rank + self.epoch * world,  # one seed per worker and epoch
        )
        for _ in range(self.taken):
            next(batches)
        if config.balance_ranks:
            batches = balanced_micro_batches(batches, self.rank, world, self.device)
        return batches

    def _take(self) -> dict[str, Any] | None:
        if self.stream is None:
            self.stream = self._open()
        columns = next(self.stream, None)
        if columns is not None:
            self.taken += 1
        return columns

    def _next_epoch(self) -> None:
        for stream in (self.stream, self.reading):  # this rank's reading of the split ends here
            if stream is not None:
                stream.close()
        self.epoch, self.taken, self.reading, self.stream = self.epoch + 1, 0, None, None

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        columns = self._take()
        if columns is None:  # skipped micro-batches used up this epoch's spares
            if self.epoch + 1 >= self.run.epochs_streamed:
                raise StopIteration
            self._next_epoch()
            columns = self._take()
            if columns is None:
                raise StopIteration
        return columns

    def end_epoch(self, epoch: int) -> None:
        """The steps of `epoch` are done: its leftovers are dropped, the next epoch comes next (unless a
        step of it already went on into the next).

        Rank 0 then releases the splits of the epochs before `epoch`: every rank stopped reading them
        before it took a step of `epoch`, and every rank has taken the last one with rank 0."""
        if self.epoch == epoch:
            self._next_epoch()
        for done in [opened for opened in self.opened if opened < epoch]:
            release_split(self.opened.pop(done))
            logger.debug("released the split of epoch %d", done)

    def record(self, state) -> None:
        """Where the next micro-batch comes from, into the checkpoint's `TrainState`."""
        state.epoch, state.epoch_batches = self.epoch, self.taken
