"""The two batch layouts of preference pairs, with the same values (`raydpo.logprobs` scores either):

- `PackedPairs`, as TRL lays them out: the chosen sequences of the B pairs, then their rejected
  sequences, right-padded to the longest sequence of the batch (the prompt goes through twice);
- `SharedPairs` (prefix sharing): one row per pair, `prompt | chosen | rejected`, with an attention
  mask that keeps the rejected tokens from seeing the chosen ones and position ids that restart the
  rejected branch at the prompt's end, so the prompt goes through the model once. The first token of
  each branch is scored from the last prompt position; backward through the prompt sums the
  gradients of both branches. Packed, the pairs of a batch lie end to end in a single row with no
  padding, for attention that runs a segment at a time (`raydpo.attention`), where that costs nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

Tokens = Sequence[Sequence[int]]  # token ids of one part (prompt, chosen or rejected) of each pair


@dataclass
class PackedPairs:
    """A batch of B pairs as 2B right-padded sequences: chosen rows first, then rejected rows."""

    input_ids: torch.Tensor  # [2B, T]
    attention_mask: torch.Tensor  # [2B, T]
    completion_mask: torch.Tensor  # [2B, T], 1 on completion tokens

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def pair_tokens(self) -> int:
        """Tokens of the pairs' sequences, each counted once per sequence it is in (TRL's num_tokens)."""
        return int(self.attention_mask.sum())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.completion_mask

    def to(self, device: torch.device | str) -> PackedPairs:
        return PackedPairs(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.completion_mask)
            )
        )


def pack_pairs(
    prompt_ids: Tokens, chosen_ids: Tokens, rejected_ids: Tokens, pad_token_id: int
) -> PackedPairs:
    """Pad a batch of tokenized pairs to the longest of its own sequences (no fixed-length padding)."""
    sequences, completion_starts = [], []
    for completions in (chosen_ids, rejected_ids):
        for prompt, completion in zip(prompt_ids, completions, strict=True):
            sequences.append([*prompt, *completion])
            completion_starts.append(len(prompt))
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (sequence, start) in enumerate(zip(sequences, completion_starts, strict=True)):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
        completion_mask[row, start : len(sequence)] = 1
    return PackedPairs(input_ids, attention_mask, completion_mask)


PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3  # segment of each position of a SharedPairs row


@dataclass
class SharedPairs:
    """A batch of B pairs as right-padded rows of `prompt | chosen | rejected`: the prompt is computed once.

    A row holds one pair, or (`packed`) every pair of the batch end to end, so no position is padding;
    position ids restart at each pair, and attention never crosses from one pair to another."""

    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]; the rejected branch restarts at the prompt's length
    segments: torch.Tensor  # [R, T]: PROMPT, CHOSEN, REJECTED or PAD
    predecessors: torch.Tensor  # [2B, C]: flat index (row * T + position) of the output that scores
    # each completion token; -1: none
    targets: torch.Tensor  # [2B, C]: completion token ids, chosen rows first, left-aligned
    spans: torch.Tensor  # [B, 5] on the host: row, start, prompt, chosen and rejected length of each pair

    @property
    def num_pairs(self) -> int:
        return self.spans.shape[0]

    @property
    def pair_tokens(self) -> int:
        """Tokens of the pairs' two sequences, the prompt counted twice as TRL counts it (num_tokens);
        the model computed the prompt once."""
        return int((self.segments != PAD).sum() + (self.segments == PROMPT).sum())

    def segment_lengths(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """(row, start, prompt, chosen, rejected) of each pair, in row order and then position order."""
        return tuple(tuple(span) for span in self.spans.tolist())

    def pair_index(self) -> torch.Tensor:
        """[R, T]: the pair each position belongs to, -1 for padding."""
        owner = torch.full(self.segments.shape, -1, dtype=torch.long)
        for pair, (row, start, prompt, chosen, rejected) in enumerate(self.segment_lengths()):
            owner[row, start : start + prompt + chosen + rejected] = pair
        return owner.to(self.segments.device)

    def to(self, device: torch.device | str) -> SharedPairs:
        moved = (self.input_ids, self.position_ids, self.segments, self.predecessors, self.targets)
        return SharedPairs(*(t.to(device, non_blocking=True) for t in moved), self.spans)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.position_ids, self.segments, self.predecessors, self.targets, self.spans


def pack_shared(
    prompt_ids: Tokens, chosen_ids: Tokens, rejected_ids: Tokens, pad_token_id: int, packed: bool = False
) -> SharedPairs:
    """Lay each pair out as one row `prompt | chosen | rejected`, padded to the batch's longest row, or
    (`packed`) all pairs in one row, end to end.

    A branch's first token is scored from the last prompt position, its others from the token before;
    with an empty prompt the first token of a branch is not scored, as in the unshared layout."""
    pairs = len(prompt_ids)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True)]
    if packed:
        rows, width = [0] * pairs, sum(lengths)
        starts = [0, *itertools.accumulate(lengths[:-1])]
    else:
        rows, width, starts = list(range(pairs)), max(lengths), [0] * pairs
    completion_width = max(max(len(c), len(r)) for c, r in zip(chosen_ids, rejected_ids, strict=True))
    num_rows = 1 if packed else pairs
    input_ids = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    segments = torch.full((num_rows, width), PAD, dtype=torch.long)
    predecessors = torch.full((2 * pairs, max(completion_width, 1)), -1, dtype=torch.long)
    targets = torch.full((2 * pairs, max(completion_width, 1)), pad_token_id, dtype=torch.long)
    spans = torch.zeros((pairs, 5), dtype=torch.long)
    for k, (prompt, chosen, rejected) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids, strict=True)):
        row, s = rows[k], starts[k]
        p, c, r = len(prompt), len(chosen), len(rejected)
        spans[k] = torch.tensor([row, s, p, c, r])
        input_ids[row, s : s + p + c + r] = torch.as_tensor([*prompt, *chosen, *rejected], dtype=torch.long)
        position_ids[row, s : s + p + c] = torch.arange(p + c)
        position_ids[row, s + p + c : s + p + c + r] = torch.arange(p, p + r)
        segments[row, s : s + p] = PROMPT
        segments[row, s + p : s + p + c] = CHOSEN
        segments[row, s + p + c : s + p + c + r] = REJECTED
        for out, start, length in ((k, s + p, c), (pairs + k, s + p + c, r)):
            # token i of the branch sits at start + i; its predecessor is the last prompt position for
            # i = 0 (none for an empty prompt), each as a flat index into the [R * T] outputs
            before = torch.arange(start - 1, start + length - 1)
            before[0:1] = s + p - 1 if p else -1
            predecessors[out, :length] = torch.where(before >= 0, row * width + before, -1)
            targets[out, :length] = input_ids[row, start : start + length]
    return SharedPairs(input_ids, position_ids, segments, predecessors, targets, spans)


def visibility(batch: SharedPairs, window: int | None):
    """Which keys each query of a SharedPairs row sees, as a FlexAttention `mask_mod`
    `(row, head, query, key) -> bool` that also takes broadcastable index tensors.

    Causal within each pair, except that rejected positions never see chosen ones, and padding is
    never seen. A sliding window limits the distance in positions (not in row offsets), as the model's
    own masks do."""
    segments, positions, owners = batch.segments, batch.position_ids, batch.pair_index()

    def visible(row, head, query, key):
        query_segment, key_segment = segments[row, query], segments[row, key]
        allowed = (
            (key <= query)
            & (owners[row, key] == owners[row, query])
            & (key_segment != PAD)
            & ((query_segment != REJECTED) | (key_segment != CHOSEN))
        )
        if window is not None:
            allowed = allowed & (positions[row, query] - positions[row, key] < window)
        return allowed

    return visible


def shared_attention_mask(
    batch: SharedPairs, model: torch.nn.Module, boolean: bool
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4D mask of a SharedPairs batch for `model`'s attention layers (`visibility` over every
    query and key). Models whose layers differ (full and sliding) get a mask per layer type. The mask
    is `boolean` (what SDPA takes) or additive in the model's dtype (eager kernels)."""
    num_rows, width = batch.segments.shape
    index = torch.arange(width, device=batch.segments.device)
    rows = torch.arange(num_rows, device=batch.segments.device)[:, None, None]

    def formatted(window: int | None) -> torch.Tensor:
        mask = visibility(batch, window)(rows, None, index[None, :, None], index[None, None, :])
        mask = mask[:, None]  # [B, 1, T, T], broadcast over heads
        if boolean:
            return mask
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )

    return _per_layer_type(model.config, formatted)


def shared_block_mask(batch: SharedPairs, model: torch.nn.Module) -> Any:
    """The mask of `shared_attention_mask` as FlexAttention's `BlockMask` (or one per layer type).

    The kernel skips the blocks of keys a block of queries cannot see, so a row costs about what its
    two causal sequences cost without the prompt's repeat, with no `[T, T]` mask in memory; the
    transformers `flex_attention` kernel takes it as it is and applies the model's soft-capping."""
    from torch.nn.attention.flex_attention import create_block_mask

    num_rows, width = batch.segments.shape

    def block_mask(window: int | None):
        # compiled on a GPU, as transformers builds its own block masks: no [B, T, T] tensor of the mask
        return create_block_mask(
            visibility(batch, window),
            num_rows,
            None,
            width,
            width,
            device=batch.segments.device,
            _compile=batch.segments.is_cuda,
        )

    return _per_layer_type(model.config, block_mask)


def _per_layer_type(config: Any, build) -> Any:
    """`build(window)` for a model whose attention layers share one window, else a mapping from each
    layer type to its own (how transformers takes masks that differ between layers)."""
    windows = layer_windows(config)
    if len(windows) == 1:
        return build(next(iter(windows.values())))
    return {layer_type: build(window) for layer_type, window in windows.items()}


def layer_windows(config: Any) -> dict[str, int | None]:
    """The attention window of each kind of layer the model has (None: full attention)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {"full_attention": window}
    windows = {}
    for layer_type in set(layer_types):
        if layer_type not in ("full_attention", "sliding_attention"):
            raise ValueError(f"attention layers of type {layer_type!r} are not supported by prefix sharing")
        windows[layer_type] = window if layer_type == "sliding_attention" else None
    return windows


def pack_batch(
    prompt_ids: Tokens,
    chosen_ids: Tokens,
    rejected_ids: Tokens,
    pad_token_id: int,
    shared: bool,
    packed: bool = False,
) -> PackedPairs | SharedPairs:
    """The batch in the layout the run uses: one row per pair (`shared`), all pairs in one row (`shared`
    and `packed`), or two rows per pair."""
    if shared:
        return pack_shared(prompt_ids, chosen_ids, rejected_ids, pad_token_id, packed)
    return pack_pairs(prompt_ids, chosen_ids, rejected_ids, pad_token_id)


def pair_width(prompt: int, chosen: int, rejected: int, shared: bool) -> int:
    """The row length a pair needs in its layout (what a batch is sorted and padded by)."""
    return prompt + chosen + rejected if shared else prompt + max(chosen, rejected)
