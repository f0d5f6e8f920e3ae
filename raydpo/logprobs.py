"""Per-sequence completion log-probs from a causal LM, shared by the precompute and training stages.

The model body runs once over the batch; the LM head and the log-softmax then run only on the hidden
states of completion positions, a chunk of tokens at a time, so a `[batch, seq, vocab]` fp32 tensor is
never built (with a 150k vocabulary it would dwarf the model's activations). Under autograd each chunk
is checkpointed, so its `[chunk, vocab]` logits are recomputed in backward rather than kept.

Batches are laid out as TRL lays them out: the chosen sequences of the B pairs, then their rejected
sequences, right-padded to the longest sequence of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class PackedPairs:
    """A batch of B pairs as 2B right-padded sequences: chosen rows first, then rejected rows."""

    input_ids: torch.Tensor  # [2B, T]
    attention_mask: torch.Tensor  # [2B, T]
    completion_mask: torch.Tensor  # [2B, T], 1 on completion tokens

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PackedPairs:
        return PackedPairs(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.completion_mask)
            )
        )


def pack_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_token_id: int,
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


@dataclass
class CompletionLogps:
    """Log-probs of each sequence's completion tokens under the model (fp32)."""

    token_logps: torch.Tensor  # [2B, T-1], zero outside the completion; position t scores token t+1
    target_mask: torch.Tensor  # [2B, T-1] bool, where token_logps holds a completion token
    sums: torch.Tensor  # [2B], sum over completion tokens
    shared_sums: torch.Tensor  # [2B], sum over the first min(len chosen, len rejected) completion tokens
    tail_sums: torch.Tensor  # [2B], sum over the rest (LD-DPO: shared + ld_alpha * tail)
    lengths: torch.Tensor  # [2B], completion token counts
    logits_sums: torch.Tensor | None = None  # [2B], sum over completion tokens of the mean logit (TRL metric)
    token_log_sum_sq_probs: torch.Tensor | None = None  # [2B, T-1], log sum_v p_v^2 (WPO weights)

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen half, rejected half) of a per-sequence tensor."""
        return values.chunk(2, dim=0)


def completion_logps(
    model: torch.nn.Module,
    batch: PackedPairs,
    chunk_tokens: int = 2048,
    with_stats: bool = False,
) -> CompletionLogps:
    """Score a packed batch: one forward of the model body, then the LM head over completion tokens only."""
    body, head, transform = _split_model(model)
    hidden = body(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    target_mask = batch.completion_mask[:, 1:].bool()
    targets = batch.input_ids[:, 1:][target_mask]  # [M]
    states = hidden[:, :-1][target_mask]  # [M, H]

    use_checkpoint = torch.is_grad_enabled()
    logps, mean_logits, log_sum_sq = [], [], []
    for start in range(0, targets.numel(), chunk_tokens):
        args = (states[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        if use_checkpoint:
            out = checkpoint(_chunk_scores, head, transform, with_stats, *args, use_reentrant=False)
        else:
            out = _chunk_scores(head, transform, with_stats, *args)
        logps.append(out[0])
        if with_stats:
            mean_logits.append(out[1])
            log_sum_sq.append(out[2])

    token_logps = _scatter(target_mask, logps, hidden)
    lengths = target_mask.sum(dim=1)
    positions = target_mask.cumsum(dim=1)  # 1-based index of each completion token within its sequence
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    shared_lengths = torch.minimum(chosen_lengths, rejected_lengths).repeat(2)
    shared_mask = target_mask & (positions <= shared_lengths[:, None])
    result = CompletionLogps(
        token_logps=token_logps,
        target_mask=target_mask,
        sums=token_logps.sum(dim=1),
        shared_sums=(token_logps * shared_mask).sum(dim=1),
        tail_sums=(token_logps * (target_mask & ~shared_mask)).sum(dim=1),
        lengths=lengths,
    )
    if with_stats:
        result.logits_sums = _scatter(target_mask, mean_logits, hidden).sum(dim=1)
        result.token_log_sum_sq_probs = _scatter(target_mask, log_sum_sq, hidden)
    return result


def _chunk_scores(head, transform, with_stats: bool, states: torch.Tensor, targets: torch.Tensor):
    logits = transform(head(states).float())  # [chunk, V] fp32: the only vocabulary-sized buffer
    normalizer = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - normalizer
    if not with_stats:
        return (logps,)
    with torch.no_grad():
        mean_logits = logits.mean(dim=-1)
        log_sum_sq = torch.logsumexp(2 * (logits - normalizer[:, None]), dim=-1)
    return logps, mean_logits, log_sum_sq


def _scatter(mask: torch.Tensor, chunks: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    values = torch.cat(chunks) if chunks else like.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.masked_scatter(mask, values.float())


def _split_model(model: torch.nn.Module):
    """(body, lm_head, logit transform) of a causal LM, so the head can run on selected positions only."""
    body = model.get_decoder()
    head = model.get_output_embeddings()
    if body is None or head is None or body is model:
        raise ValueError(f"{type(model).__name__} does not expose its decoder and LM head separately")
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    divisor = getattr(config, "logits_scaling", None)  # Granite divides

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return body, head, transform


@torch.no_grad()
def check_head_path(model: torch.nn.Module, vocab_size: int, atol: float = 1e-3) -> None:
    """Verify on a tiny input that body + head reproduces the model's own logits.

    Architectures that post-process logits in ways `_split_model` does not know would otherwise give
    silently wrong log-probs; this turns that into a clear error at load time.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (1, 12), generator=generator).to(device)
    body, head, transform = _split_model(model)
    expected = model(input_ids=input_ids, use_cache=False).logits.float()
    actual = transform(head(body(input_ids=input_ids, use_cache=False).last_hidden_state).float())
    error = (expected - actual).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    if error > atol * scale:
        raise ValueError(
            f"{type(model).__name__}: LM head applied to the decoder output differs from the model's logits "
            f"(max error {error:.3g}); this architecture post-processes logits in an unsupported way"
        )
