"""Per-sequence completion log-probs from a causal LM, shared by the precompute and training stages.

The model body runs once over the batch; the LM head and the log-softmax then run only on the hidden
states of completion positions, a chunk of tokens at a time, so a `[batch, seq, vocab]` fp32 tensor is
never built (with a 150k vocabulary it would dwarf the model's activations). Backward recomputes each
chunk's `[chunk, vocab]` logits instead of keeping them (`_HeadLogps`).

The head runs as one call of the head module per forward, whatever the number of chunks: under
DeepSpeed ZeRO-3 each module call gathers the module's sharded weight, a collective, so every rank
must make the same number of calls even though ranks hold different numbers of completion tokens.

Batches come in either layout of `raydpo.layout`: two rows per pair, or one row with the prompt shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raydpo.attention import ATTENTION_NAME, use_varlen, varlen_plan
from raydpo.attention import register as register_attention
from raydpo.config import PREFIX_SHARING
from raydpo.errors import RaydpoError, one_line
from raydpo.layout import (
    PackedPairs,
    SharedPairs,
    layer_windows,
    pack_pairs,
    pack_shared,
    shared_attention_mask,
    shared_block_mask,
)

logger = logging.getLogger(__name__)


@dataclass
class CompletionLogps:
    """Log-probs of each sequence's completion tokens under the model (fp32)."""

    token_logps: torch.Tensor  # [2B, W], zero outside the completion (W: T-1, or the longest completion)
    target_mask: torch.Tensor  # [2B, W] bool, where token_logps holds a completion token
    sums: torch.Tensor  # [2B], sum over completion tokens
    shared_sums: torch.Tensor  # [2B], sum over the first min(len chosen, len rejected) completion tokens
    tail_sums: torch.Tensor  # [2B], sum over the rest (LD-DPO: shared + ld_alpha * tail)
    lengths: torch.Tensor  # [2B], completion token counts
    logits_sums: torch.Tensor | None = None  # [2B], sum over completion tokens of the mean logit (TRL metric)
    token_log_sum_sq_probs: torch.Tensor | None = None  # [2B, T-1], log sum_v p_v^2 (WPO weights)
    entropy_sums: torch.Tensor | None = None  # [2B], sum over completion tokens of the entropy (TRL metric)
    top1_counts: torch.Tensor | None = (
        None  # [2B], completion tokens that are the argmax (mean_token_accuracy)
    )

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen half, rejected half) of a per-sequence tensor."""
        return values.chunk(2, dim=0)


def completion_logps(
    model: torch.nn.Module,
    batch: PackedPairs | SharedPairs,
    chunk_tokens: int = 2048,
    with_stats: bool = False,
) -> CompletionLogps:
    """Score a batch: one forward of the model body, then the LM head over completion tokens only."""
    body, head, transform = _split_model(model)
    if isinstance(batch, SharedPairs):
        hidden = body(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            **_shared_attention(batch, model),
        ).last_hidden_state
        target_mask = batch.predecessors >= 0
        states = hidden.flatten(0, 1)[batch.predecessors[target_mask]]  # [M, H]
        targets = batch.targets[target_mask]  # [M]
    else:
        hidden = body(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        target_mask = batch.completion_mask[:, 1:].bool()
        targets = batch.input_ids[:, 1:][target_mask]  # [M]
        states = hidden[:, :-1][target_mask]  # [M, H]
    logps, mean_logits, log_sum_sq, entropy, is_top1 = _call_head(
        head, states, targets, transform, chunk_tokens, with_stats
    )

    token_logps = _scatter(target_mask, logps)
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
        result.logits_sums = _scatter(target_mask, mean_logits).sum(dim=1)
        result.entropy_sums = _scatter(target_mask, entropy).sum(dim=1)
        result.top1_counts = _scatter(target_mask, is_top1).sum(dim=1)
        result.token_log_sum_sq_probs = _scatter(target_mask, log_sum_sq)
    return result


def _shared_attention(batch: SharedPairs, model: torch.nn.Module) -> dict:
    """How the body attends over shared rows: a segment at a time where the model runs
    `prefix_sdpa_forward` and no sliding window is shorter than the rows' positions (one varlen call
    per layer where `use_varlen`), through a block mask where it runs `flex_attention`, else through
    a dense 4D mask."""
    implementation = model.config._attn_implementation
    if implementation == ATTENTION_NAME:
        lengths = batch.segment_lengths()
        windows = [window for window in layer_windows(model.config).values() if window is not None]
        if not windows or max(p + max(c, r) for _, _, p, c, r in lengths) <= min(windows):
            # a 4D mask goes to the attention as it is; the segments say what each query sees
            device = batch.input_ids.device
            placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
            plan = None
            if _uses_varlen(model):
                plan = varlen_plan(lengths, batch.input_ids.shape[1], device)
            return {"attention_mask": placeholder, "prefix_segments": lengths, "prefix_plan": plan}
    if implementation == "flex_attention":
        return {"attention_mask": shared_block_mask(batch, model)}
    boolean = implementation in ("sdpa", ATTENTION_NAME)
    return {"attention_mask": shared_attention_mask(batch, model, boolean)}


def _call_head(head, states, targets, transform: LogitTransform, chunk_tokens: int, with_stats: bool):
    """Run `_HeadLogps` as the forward of the head module, so module hooks (ZeRO-3's gather) run once."""
    if not isinstance(head, torch.nn.Linear):
        raise RaydpoError(f"the LM head must be a torch.nn.Linear, got {type(head).__name__}")

    def forward(states, targets):
        return _HeadLogps.apply(states, head.weight, head.bias, targets, transform, chunk_tokens, with_stats)

    head.forward = forward  # an instance attribute: nn.Module.__call__ runs the hooks around it
    try:
        return head(states, targets)
    finally:
        del head.forward


HEAD_STATS = ("mean_logits", "log_sum_sq", "entropy", "is_top1")  # per token, besides the log-prob (metrics)


class _HeadLogps(torch.autograd.Function):
    """log p(target) under log_softmax(transform(states @ weight.T + bias)), a chunk of rows at a time.

    Forward keeps only the per-row log-normalizer; backward recomputes each chunk's logits and forms
    d logp / d logits = onehot(target) - softmax, so no `[rows, vocab]` tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, targets, transform, chunk_tokens, with_stats):
        logps, normalizers = [], []
        stats = {name: [] for name in HEAD_STATS}
        for start in range(0, targets.numel(), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits, _ = transform(F.linear(states[rows], weight, bias).float())
            normalizer = torch.logsumexp(logits, dim=-1)
            logps.append(logits.gather(-1, targets[rows, None]).squeeze(-1) - normalizer)
            normalizers.append(normalizer)
            if with_stats:  # two [rows, vocab] temporaries beside the logits
                stats["mean_logits"].append(logits.mean(dim=-1))
                stats["is_top1"].append(logits.argmax(dim=-1) == targets[rows])  # the first maximum, as TRL
                log_probs = logits - normalizer[:, None]
                probs = log_probs.exp()
                stats["log_sum_sq"].append(torch.linalg.vecdot(probs, probs).log())
                stats["entropy"].append(-torch.linalg.vecdot(probs, log_probs))
        empty = states.new_zeros(0, dtype=torch.float32)
        outputs = [torch.cat(values) if values else empty for values in (logps, *stats.values())]
        ctx.save_for_backward(states, weight, bias, targets, torch.cat(normalizers) if normalizers else empty)
        ctx.transform, ctx.chunk_tokens = transform, chunk_tokens
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_logps, *_grad_stats):
        states, weight, bias, targets, normalizers = ctx.saved_tensors
        need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_states = torch.zeros_like(states) if need_states else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, targets.numel(), ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            logits, slope = ctx.transform(F.linear(states[rows], weight, bias).float())
            upstream = grad_logps[rows, None].float()
            grad_logits = torch.exp(logits - normalizers[rows, None]).mul_(-upstream)
            grad_logits.scatter_add_(-1, targets[rows, None], upstream)
            if slope is not None:
                grad_logits.mul_(slope)
            if need_states:
                grad_states[rows] = (grad_logits.to(weight.dtype) @ weight).to(states.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), states[rows].float())
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_states, grad_weight, grad_bias, None, None, None, None


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.masked_scatter(mask, values.float())


class LogitTransform:
    """What some architectures apply to the head's output (scale, divide, soft-cap), with its slope."""

    def __init__(self, scale: float | None, divisor: float | None, softcap: float | None):
        self.factor = (scale or 1.0) / (divisor or 1.0)
        self.softcap = softcap

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float | None]:
        """(transformed logits, d transformed / d logits, or None where that is 1)."""
        if self.factor != 1.0:
            logits = logits * self.factor
        if self.softcap is None:
            return logits, (self.factor if self.factor != 1.0 else None)
        capped = torch.tanh(logits / self.softcap)
        return capped * self.softcap, (1 - capped.square()) * self.factor


def _split_model(model: torch.nn.Module):
    """(body, lm_head, logit transform) of a causal LM, so the head can run on selected positions only."""
    body = model.get_decoder()
    head = model.get_output_embeddings()
    if body is None or head is None or body is model:
        raise RaydpoError(f"{type(model).__name__} does not expose its decoder and LM head separately")
    config = getattr(model, "config", None)
    transform = LogitTransform(
        scale=getattr(config, "logit_scale", None),  # Cohere multiplies
        divisor=getattr(config, "logits_scaling", None),  # Granite divides
        softcap=getattr(config, "final_logit_softcapping", None),
    )
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
    actual = transform(head(body(input_ids=input_ids, use_cache=False).last_hidden_state).float())[0]
    error = (expected - actual).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    if error > atol * scale:
        raise RaydpoError(
            f"{type(model).__name__}: LM head applied to the decoder output differs from the model's logits "
            f"(max error {error:.3g}); this architecture post-processes logits in an unsupported way, or "
            "the model is not a causal (decoder-only) language model"
        )


@torch.no_grad()
def check_prefix_sharing(model: torch.nn.Module, rtol: float | None = None) -> str | None:
    """Whether `model` scores a shared-prefix batch as it scores the two sequences apart, on a tiny input
    of two pairs of unequal lengths. Returns None when it does, else the reason it does not (an
    attention kernel that takes no 4D mask, a layer type or an architecture that ignores the mask,
    FlexAttention on CPU)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if model.config._attn_implementation == "flex_attention" and device.type == "cpu":
        # inductor's CPU template fails to compile windowed block masks once shapes turn dynamic,
        # and FlexAttention has no backward on CPU: the block mask is for GPUs
        return (
            "flex_attention runs shared-prefix rows on GPUs only; on CPU use attn_implementation=sdpa "
            "(it attends a segment at a time)"
        )
    was_training = model.training
    model.eval()  # dropout would tell the two layouts apart
    try:
        return _prefix_sharing_gap(model, device, dtype, rtol)
    finally:
        model.train(was_training)


def _prefix_sharing_gap(model: torch.nn.Module, device, dtype, rtol: float | None) -> str | None:
    if rtol is None:
        rtol = 1e-4 if dtype == torch.float32 else 2e-2
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    prompts, chosen, rejected = [tokens(7), tokens(3)], [tokens(5), tokens(9)], [tokens(8), tokens(4)]
    try:
        layer_windows(model.config)
        batch = pack_shared(prompts, chosen, rejected, 0, packed=packs_rows(model))  # the layout it will get
        shared = completion_logps(model, batch.to(device)).sums
    except (ValueError, RuntimeError, TypeError) as error:
        return f"{type(model).__name__} cannot take a shared-prefix mask: {one_line(error, limit=200)}"
    unshared = completion_logps(model, pack_pairs(prompts, chosen, rejected, 0).to(device)).sums
    gap = ((shared - unshared).abs() / unshared.abs().clamp_min(1.0)).max().item()
    if not gap <= rtol:  # also catches NaN
        return (
            f"{type(model).__name__} with {model.config._attn_implementation} attention scores a shared-prefix "
            f"batch differently from the sequences apart (relative gap {gap:.3g} > {rtol:g}): its attention "
            "does not follow the 4D mask"
        )
    return None


def use_prefix_sharing(model: torch.nn.Module, setting: str) -> bool:
    """Decide prefix sharing for a loaded model: `off`; `on` (stop when the model cannot take it); `auto`
    (on where `check_prefix_sharing` passes, else off with the reason logged)."""
    if setting not in PREFIX_SHARING:
        raise ValueError(f"prefix_sharing must be one of {', '.join(PREFIX_SHARING)}, got {setting!r}")
    if setting == "off":
        return False
    segmented = _use_segmented_attention(model)
    reason = check_prefix_sharing(model)
    if reason is not None and segmented and _uses_varlen(model):
        # a GPU whose torch has no flash kernel for it (pre-Ampere): the same attention, a call per segment
        logger.warning("prefix sharing: the varlen kernel is off, attention a segment at a time: %s", reason)
        model._raydpo_no_varlen = True
        reason = check_prefix_sharing(model)
    if reason is not None and segmented:
        logger.warning("prefix sharing: segment-wise attention is off, a 4D mask is used: %s", reason)
        model.set_attn_implementation("sdpa")
        segmented, reason = False, check_prefix_sharing(model)
    if reason is None and segmented and _on_gpu(model) and not _uses_varlen(model):
        slow = (
            "attention a segment at a time is slower on a GPU than unshared rows (docs/benchmarks.md); "
            "the varlen kernel (bf16 or fp16, torch >= 2.10) or flex_attention shares at speed"
        )
        if setting == "auto":
            logger.warning("prefix sharing is off: %s", slow)
            model.set_attn_implementation("sdpa")
            return False
        logger.warning("prefix sharing: %s", slow)
    if reason is None:
        logger.debug("prefix sharing: attention %s", attention_mode(model))
        return True
    if setting == "on":
        raise RaydpoError(f"prefix_sharing=on: {reason}")
    logger.warning("prefix sharing is off: %s", reason)
    return False


def packs_rows(model: torch.nn.Module) -> bool:
    """Whether a model that shares prefixes takes each batch as one packed row (`pack_shared`): where it
    attends a segment at a time, so a packed row costs its pairs' attention and no padding, and no
    layer has a sliding window (a pair longer than the window sends the batch to a dense mask, whose
    size is the square of the row)."""
    implementation = model.config._attn_implementation
    return implementation == ATTENTION_NAME and all(w is None for w in layer_windows(model.config).values())


def attention_mode(model: torch.nn.Module) -> str:
    """How a model that shares prefixes attends: a segment at a time, through a block mask, or through
    a 4D mask."""
    implementation = model.config._attn_implementation
    if implementation == ATTENTION_NAME:
        mode = "a segment at a time" + (" (varlen)" if _uses_varlen(model) else "")
        return mode + (", pairs packed in one row" if packs_rows(model) else "")
    return "through a block mask" if implementation == "flex_attention" else "through a 4D mask"


def _uses_varlen(model: torch.nn.Module) -> bool:
    """Whether the model's shared rows go through one varlen call per layer (`attention.use_varlen`),
    unless `use_prefix_sharing` found that kernel failing on this model's device."""
    parameter = next(model.parameters())
    return not getattr(model, "_raydpo_no_varlen", False) and use_varlen(parameter.device, parameter.dtype)


def _on_gpu(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def _use_segmented_attention(model: torch.nn.Module) -> bool:
    """Switch a model that runs SDPA to `prefix_sdpa_forward` (SDPA for two-row batches, a segment at a
    time for shared rows); whether it did."""
    if model.config._attn_implementation != "sdpa":
        return False
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    return model.config._attn_implementation == ATTENTION_NAME
