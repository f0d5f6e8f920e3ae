"""Micro-batches of near-equal token counts across workers: the grouping, and the regrouping through a
real gloo all-gather between two processes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from raydpo.toy import sample_data_dir
from raydpo.train_stage.balance import balanced_groups, balanced_micro_batches, pair_tokens, regroup

MICRO_BATCH = 2


def sample_columns(count: int) -> dict[str, np.ndarray]:
    """The first English sample pairs as a worker gets them from Ray Data: object arrays of token ids
    (here the UTF-8 bytes of the last turns, so lengths vary as real ones do), a string id, a float."""

    def ids(text: str) -> np.ndarray:
        return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)

    rows = json.loads((sample_data_dir() / "dpo_en_demo.json").read_text())[:count]
    columns = {
        "pair_id": np.array([f"pair-{i}" for i in range(count)]),
        "prompt_input_ids": [ids(row["conversations"][-1]["value"]) for row in rows],
        "chosen_input_ids": [ids(row["chosen"]["value"]) for row in rows],
        "rejected_input_ids": [ids(row["rejected"]["value"]) for row in rows],
        "ref_chosen_logps": np.arange(count, dtype=np.float32) * -1.5,
    }
    for name in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        array = np.empty(count, dtype=object)
        array[:] = columns[name]
        columns[name] = array
    return columns


def test_balanced_groups_by_hand():
    """Costliest first, each to the cheapest group with room: 5 -> g0, 4 -> g1, 2 -> g1, 1 -> g0, so
    6 and 6 where the split as given has 9 and 3. Where balancing gains nothing, the split as given."""
    assert balanced_groups([5, 4, 2, 1], 2) == [[0, 3], [1, 2]]
    assert balanced_groups([5, 1, 4, 2], 2) == [[0, 1], [2, 3]]  # 6 and 6 as given
    assert balanced_groups([3, 3, 3, 3], 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot be split into 2 equal groups"):
        balanced_groups([1, 2, 3], 2)


@pytest.mark.parametrize("groups,size", [(2, 2), (2, 8), (4, 2), (8, 4)])
def test_balanced_groups_on_sample_lengths(groups, size):
    """On the sample pairs' lengths, every draw is split into equal-sized groups that cover it once, and
    the largest group never has more tokens than in the split as drawn; on average far fewer."""
    costs = pair_tokens(sample_columns(200))
    draws = random.Random(0)
    as_drawn, balanced = [], []
    for _ in range(300):
        draw = draws.sample(costs, groups * size)
        split = balanced_groups(draw, groups)
        assert sorted(i for group in split for i in group) == list(range(groups * size))
        assert all(len(group) == size for group in split)
        largest = max(sum(draw[i] for i in group) for group in split)
        drawn = max(sum(draw[g * size : (g + 1) * size]) for g in range(groups))
        assert largest <= drawn
        as_drawn.append(drawn / (sum(draw) / groups))
        balanced.append(largest / (sum(draw) / groups))
    assert np.mean(balanced) - 1 < 0.5 * (np.mean(as_drawn) - 1)


def test_regroup_keeps_each_pair_whole():
    """The ranks' groups of one micro-step are a partition of its pairs, each row's columns together."""
    columns = sample_columns(4)
    batches = [{name: values[:2] for name, values in columns.items()}]
    batches.append({name: values[2:] for name, values in columns.items()})
    parts = [regroup(batches, rank) for rank in range(2)]
    assert sorted(pair for part in parts for pair in part["pair_id"]) == list(columns["pair_id"])
    for part in parts:
        assert len(part["pair_id"]) == 2
        for position, pair in enumerate(part["pair_id"]):
            source = list(columns["pair_id"]).index(pair)
            for name, values in columns.items():
                assert np.array_equal(part[name][position], values[source]), (pair, name)


def _worker(rank: int, world_size: int, port: int, streams: list[list[dict]], results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results.put((rank, list(balanced_micro_batches(iter(streams[rank]), rank, world_size))))
    finally:
        dist.destroy_process_group()


def test_balanced_micro_batches_between_processes():
    """Three gloo processes, each with its own micro-batches of the sample pairs (rank 2's stream one
    shorter). Each micro-step, each rank gets exactly the group `regroup` gives it from all ranks'
    micro-batches (every column, pairs in order), sent by all-to-all from the ranks that read them:
    no pair lost or repeated, the token counts closer than as read; all stop when the shorter
    stream ends."""
    world_size = 3
    columns = sample_columns(30)
    micro_batches = [
        {name: values[start : start + MICRO_BATCH] for name, values in columns.items()}
        for start in range(0, 30, MICRO_BATCH)
    ]
    streams = [micro_batches[rank::world_size] for rank in range(world_size)]
    streams[-1] = streams[-1][:-1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = mp.start_processes(
        _worker,
        (world_size, free_port(), streams, results),
        nprocs=world_size,
        start_method="spawn",
        join=False,
    )
    got = dict(results.get() for _ in range(world_size))  # before joining: a full pipe blocks the put
    while not processes.join():
        pass
    steps = len(streams[-1])
    assert [len(got[rank]) for rank in range(world_size)] == [steps] * world_size
    spread_as_read, spread_balanced = 0, 0
    for step in range(steps):
        read = [streams[rank][step] for rank in range(world_size)]
        ids = sorted(pair for rank in range(world_size) for pair in got[rank][step]["pair_id"])
        assert ids == sorted(pair for batch in read for pair in batch["pair_id"])
        for rank in range(world_size):
            expected, batch = regroup(read, rank), got[rank][step]
            assert batch.keys() == expected.keys()
            for name, values in expected.items():
                assert len(batch[name]) == len(values) == MICRO_BATCH
                for mine, theirs in zip(batch[name], values, strict=True):
                    assert np.array_equal(mine, theirs), (step, rank, name)
        loads = [sum(pair_tokens(got[rank][step])) for rank in range(world_size)]
        spread_balanced += max(loads) - min(loads)
        loads = [sum(pair_tokens(batch)) for batch in read]
        spread_as_read += max(loads) - min(loads)
    assert spread_balanced < spread_as_read
