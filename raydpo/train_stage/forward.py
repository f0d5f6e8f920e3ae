"""One micro-batch through the policy to its loss: the pairs packed into one forward (padded to the
batch's own longest sequence, or each prompt once with prefix sharing), completion log-probs summed
with the function the precompute stage used, and the configured preference loss against the cached
reference values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from raydpo.cache.schema import SIDES, reference_column
from raydpo.layout import PackedPairs, SharedPairs, pack_batch
from raydpo.logprobs import (
    CompletionLogps,
    attention_mode,
    completion_logps,
    packs_rows,
    use_prefix_sharing,
)
from raydpo.losses import LossInputs, LossOutput, LossSettings, ld_combine, preference_loss, wpo_weights

logger = logging.getLogger(__name__)


class PolicyScorer(torch.nn.Module):
    """The policy with `completion_logps` as its forward, so the DeepSpeed engine runs the forward.

    It takes the tensors of a `SharedPairs` batch (one row per pair, or one `packed` row) when `shared`,
    else of a `PackedPairs` batch; both are decided once the engine holds the model
    (`decide_prefix_sharing`)."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.shared = False
        self.packed = False

    def forward(self, *tensors: torch.Tensor) -> CompletionLogps:
        batch = SharedPairs(*tensors) if self.shared else PackedPairs(*tensors)
        return completion_logps(self.model, batch, self.chunk_tokens, with_stats=True)


def decide_prefix_sharing(engine, setting: str, rank: int) -> bool:
    """Check, on every rank alike (under ZeRO-3 the check's forwards gather weights), whether the
    policy's attention follows a shared-prefix mask; `auto` turns sharing off where it does not."""
    scorer: PolicyScorer = engine.module
    scorer.shared = use_prefix_sharing(scorer.model, setting)
    scorer.packed = scorer.shared and packs_rows(scorer.model)
    if rank == 0:
        if scorer.shared:
            logger.info(
                "prefix sharing: on, each prompt computed once (attention %s)", attention_mode(scorer.model)
            )
        else:
            logger.info("prefix sharing: off")
    return scorer.shared


@dataclass
class Forward:
    """A micro-batch's loss and what its metrics are made of; all tensors stay on the device."""

    loss: torch.Tensor
    scores: CompletionLogps
    output: LossOutput
    inputs: LossInputs
    tokens: int  # the pairs' tokens, counted on the host before the batch moved to the device


def loss_on_batch(
    engine, columns: dict[str, Any], settings: LossSettings, pad_token_id: int, device: torch.device
) -> Forward:
    """Forward one micro-batch through the engine."""
    batch = pack_batch(
        columns["prompt_input_ids"],
        columns["chosen_input_ids"],
        columns["rejected_input_ids"],
        pad_token_id,
        engine.module.shared,
        engine.module.packed,
    )
    tokens = batch.pair_tokens
    scores: CompletionLogps = engine(*batch.to(device).tensors())
    inputs = loss_inputs(scores, columns, settings, device)
    output = preference_loss(inputs, settings)
    return Forward(output.loss, scores, output, inputs, tokens)


def loss_inputs(
    scores: CompletionLogps, columns: dict[str, Any], settings: LossSettings, device
) -> LossInputs:
    """Policy log-probs from the forward, reference log-probs from the cache, combined as configured."""

    def cached(name: str) -> torch.Tensor:  # a copy: Ray Data hands read-only arrays
        return torch.tensor(columns[name], dtype=torch.float32, device=device)

    if settings.ld_alpha is not None:
        chosen, rejected = (
            ld_combine(shared, tail, settings.ld_alpha)
            for shared, tail in zip(
                scores.split(scores.shared_sums), scores.split(scores.tail_sums), strict=True
            )
        )
        ref = {
            side: ld_combine(
                cached(reference_column(side, "shared")),
                cached(reference_column(side, "tail")),
                settings.ld_alpha,
            )
            for side in SIDES
        }
    else:
        chosen, rejected = scores.split(scores.sums)
        ref = {side: cached(reference_column(side)) for side in SIDES}
    # the completions' token counts, as TRL counts them: with an empty prompt the first completion token
    # has no position to be predicted from and is not scored, yet it counts (ipo, sigmoid_norm)
    chosen_lengths, rejected_lengths = (
        torch.tensor([len(ids) for ids in columns[f"{side}_input_ids"]], device=device)
        for side in ("chosen", "rejected")
    )
    chosen_mask = scores.split(scores.target_mask)[0]
    chosen_token_logps = scores.split(scores.token_logps)[0]
    inputs = LossInputs(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref["chosen"],
        ref_rejected_logps=ref["rejected"],
        chosen_lengths=chosen_lengths.float(),
        rejected_lengths=rejected_lengths.float(),
    )
    if settings.needs_chosen_nll:
        inputs.chosen_nll = -(chosen_token_logps * chosen_mask).sum() / chosen_mask.sum().clamp_min(1)
    if settings.use_weighting:
        weights = wpo_weights(scores.token_logps, scores.token_log_sum_sq_probs, scores.target_mask.float())
        chosen_weights, rejected_weights = weights.chunk(2)
        inputs.wpo_weights = chosen_weights * rejected_weights
    return inputs


def micro_batches(
    shard, micro_batch_size: int, shuffle_buffer: int | None = None, seed: int | None = None
) -> Iterator[dict[str, Any]]:
    """The worker's shard as full micro-batches (the last partial one is left out; TRL trains on it), drawn
    from a seeded buffer of SHUFFLE_BUFFER pairs if given."""
    yield from shard.iter_batches(
        batch_size=micro_batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=seed if shuffle_buffer else None,
    )
