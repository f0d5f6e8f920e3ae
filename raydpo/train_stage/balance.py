"""Micro-batches of near-equal token counts on every worker.

Under ZeRO-3 every layer's forward and backward gathers its weights on all ranks together, so the
rank with the most tokens sets the pace of every layer and the others wait. Each rank reads its own
micro-batch from its shard; `balanced_micro_batches` gathers the token counts of all ranks' pairs,
groups the pairs into equal-sized groups of near-equal token counts, and sends each pair (token ids
and cached values) to the rank of its group. The pairs of a step are the same, so is
its gradient for losses that average over pairs. The regrouping depends on the data alone (a
pair's tokens, prompt + chosen + rejected), so a resumed run and a run with prefix sharing off get
the same groups.
"""

from __future__ import annotations

import heapq
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

IDS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def balanced_groups(costs: Sequence[int], groups: int) -> list[list[int]]:
    """Split indices `range(len(costs))` into `groups` equal-sized groups of near-equal cost sums.

    Greedy, costliest first, each index to the cheapest group with room; then swaps between the
    heaviest and the lightest group while one lowers the heavier of the two. Where that leaves the
    heaviest group heavier than in the split as given (consecutive runs of indices), the split as
    given is kept. Deterministic, so every rank computes the same groups; each group keeps its indices
    in their original order. `len(costs)` must be a multiple of `groups`."""
    size, rest = divmod(len(costs), groups)
    if rest:
        raise ValueError(f"{len(costs)} items cannot be split into {groups} equal groups")
    members: list[list[int]] = [[] for _ in range(groups)]
    room = [(0, group) for group in range(groups)]  # (load, group) of the groups with room, a heap
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, group = heapq.heappop(room)
        members[group].append(index)
        if len(members[group]) < size:
            heapq.heappush(room, (load + costs[index], group))
    for _ in range(len(costs)):  # each swap lowers the heaviest load or the number of groups at it
        loads = [sum(costs[i] for i in group) for group in members]
        heavy, light = loads.index(max(loads)), loads.index(min(loads))
        swap = _best_swap(costs, members[heavy], members[light], loads[heavy], loads[light])
        if swap is None:
            break
        a, b = swap
        members[heavy][a], members[light][b] = members[light][b], members[heavy][a]
    as_given = [list(range(g * size, (g + 1) * size)) for g in range(groups)]
    if _heaviest(costs, as_given) <= _heaviest(costs, members):
        return as_given
    return [sorted(group) for group in members]


def _best_swap(
    costs: Sequence[int], heavy: list[int], light: list[int], heavy_load: int, light_load: int
) -> tuple[int, int] | None:
    """The positions (in heavy, in light) whose swap most lowers max(heavy load, light load), if any."""
    best, found = heavy_load, None
    for a, i in enumerate(heavy):
        for b, j in enumerate(light):
            moved = costs[i] - costs[j]
            if moved > 0 and max(heavy_load - moved, light_load + moved) < best:
                best, found = max(heavy_load - moved, light_load + moved), (a, b)
    return found


def _heaviest(costs: Sequence[int], groups: list[list[int]]) -> int:
    return max(sum(costs[i] for i in group) for group in groups)


def pair_tokens(columns: dict[str, Any]) -> list[int]:
    """Each pair's tokens: prompt + chosen + rejected."""
    return [sum(len(ids) for ids in row) for row in zip(*(columns[name] for name in IDS), strict=True)]


def regroup(batches: Sequence[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The pairs of `batches` (one micro-batch per rank, rank order) that `rank` takes."""
    merged = {name: _concatenate([batch[name] for batch in batches]) for name in batches[0]}
    mine = balanced_groups(pair_tokens(merged), len(batches))[rank]
    return {name: values[mine] for name, values in merged.items()}


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    """One column of several micro-batches; rows of token ids stay one object each."""
    if any(array.dtype == object or array.ndim > 1 for array in arrays):
        out = np.empty(sum(len(array) for array in arrays), dtype=object)
        out[:] = [row for array in arrays for row in array]
        return out
    return np.concatenate(arrays)


def balanced_micro_batches(
    batches: Iterator[dict[str, Any]], rank: int, world_size: int, device=None
) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches regrouped with every rank's.

    Per micro-batch, the ranks all-gather their pairs' token counts only, every rank computes the same
    groups, and the pairs themselves go where their group is in one all-to-all: each rank receives
    about one micro-batch, whatever the number of ranks. `device` is where the collectives' buffers
    live (the GPU under NCCL). All ranks must call it in step; it ends on every rank when any rank's
    stream has ended."""
    import torch.distributed as dist

    if world_size == 1:
        yield from batches
        return
    while True:
        batch = next(batches, None)
        counts: list[list[int] | None] = [None] * world_size
        dist.all_gather_object(counts, None if batch is None else pair_tokens(batch))
        if any(costs is None for costs in counts):
            return
        groups = balanced_groups([cost for costs in counts for cost in costs], world_size)
        first = sum(len(costs) for costs in counts[:rank])  # this rank's pairs in the flat order
        mine = range(first, first + len(counts[rank]))
        sends = [[index - first for index in group if index in mine] for group in groups]
        payloads = [pickle.dumps({name: values[local] for name, values in batch.items()}) for local in sends]
        received = [pickle.loads(payload) for payload in _all_to_all_bytes(payloads, device)]
        yield {name: _concatenate([part[name] for part in received]) for name in batch}


def _all_to_all_bytes(payloads: list[bytes], device) -> list[bytes]:
    """`payloads[r]` to rank r, in one all-to-all; returns what each rank sent this one, in rank order."""
    import torch
    import torch.distributed as dist

    device = device or torch.device("cpu")
    sizes = torch.tensor([len(payload) for payload in payloads], dtype=torch.int64, device=device)
    incoming = torch.empty_like(sizes)
    dist.all_to_all_single(incoming, sizes)
    incoming_sizes = incoming.tolist()
    sent = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8).to(device)
    buffer = torch.empty(sum(incoming_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(buffer, sent, incoming_sizes, sizes.tolist())
    data = buffer.cpu().numpy().tobytes()
    offsets = np.cumsum([0, *incoming_sizes])
    return [data[start:stop] for start, stop in zip(offsets[:-1], offsets[1:], strict=True)]
