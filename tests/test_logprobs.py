"""Chunked completion log-probs equal a plain one-example-at-a-time transformers forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from raydpo.data import canonical_pair
from raydpo.layout import pack_pairs
from raydpo.logprobs import check_head_path, completion_logps
from raydpo.tokenize import pad_token_id, tokenize_pair


@pytest.fixture(scope="module")
def model(toy_model):
    return AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs(tokenizer, en_rows):
    return [
        tokenize_pair(tokenizer, canonical_pair(row), max_length=768)
        for row in en_rows[:40]
        if len(tokenize_pair(tokenizer, canonical_pair(row), max_length=None).prompt_ids) < 700
    ][:6]


def plain_logps(model, prompt: list[int], completion: list[int]) -> float:
    """Sum of log p(completion | prompt) from the model's full logits, one unpadded example."""
    ids = torch.tensor([prompt + completion])
    logps = model(input_ids=ids).logits.float().log_softmax(-1)[0, len(prompt) - 1 : -1]
    return logps.gather(-1, torch.tensor(completion)[:, None]).sum().item()


def score(model, tokenizer, pairs, chunk_tokens=2048):
    batch = pack_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        pad_token_id(tokenizer),
    )
    with torch.inference_mode():
        return completion_logps(model, batch, chunk_tokens=chunk_tokens)


def test_equals_plain_forward_one_example_at_a_time(model, tokenizer, pairs):
    out = score(model, tokenizer, pairs, chunk_tokens=97)
    chosen, rejected = out.split(out.sums)
    with torch.inference_mode():
        for k, pair in enumerate(pairs):
            expected_chosen = plain_logps(model, pair.prompt_ids, pair.chosen_ids)
            expected_rejected = plain_logps(model, pair.prompt_ids, pair.rejected_ids)
            assert chosen[k].item() == pytest.approx(expected_chosen, rel=1e-5)
            assert rejected[k].item() == pytest.approx(expected_rejected, rel=1e-5)


def test_independent_of_chunking_batching_and_padding(model, tokenizer, pairs):
    whole = score(model, tokenizer, pairs, chunk_tokens=4096).sums
    chunked = score(model, tokenizer, pairs, chunk_tokens=13).sums
    torch.testing.assert_close(whole, chunked, rtol=1e-6, atol=1e-3)
    singles = torch.cat([score(model, tokenizer, [p]).sums for p in pairs])  # [chosen, rejected] per pair
    chosen, rejected = whole.chunk(2)
    torch.testing.assert_close(
        singles, torch.stack([chosen, rejected], dim=1).flatten(), rtol=1e-5, atol=1e-3
    )


def test_shared_and_tail_split(model, tokenizer, pairs):
    out = score(model, tokenizer, pairs)
    torch.testing.assert_close(out.shared_sums + out.tail_sums, out.sums, rtol=1e-6, atol=1e-3)
    chosen_len, rejected_len = out.split(out.lengths)
    shared = torch.minimum(chosen_len, rejected_len)
    for row in range(out.sums.shape[0]):
        positions = out.target_mask[row].nonzero().squeeze(-1)
        expected = out.token_logps[row, positions[: shared[row % len(pairs)]]].sum()
        torch.testing.assert_close(out.shared_sums[row], expected)


def all_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_head_gradients_equal_full_logits_autograd(model, tokenizer, pairs, softcap):
    """Every parameter's gradient (head, body, embeddings) equals autograd through the full logits,
    also with a soft-capped head, whose slope the hand-written backward must apply."""
    batch = pack_pairs(
        [p.prompt_ids for p in pairs[:2]],
        [p.chosen_ids for p in pairs[:2]],
        [p.rejected_ids for p in pairs[:2]],
        pad_token_id(tokenizer),
    )
    weights = torch.linspace(0.5, 2.0, batch.input_ids.shape[0])  # different upstream gradient per row
    model.zero_grad()
    model.config.final_logit_softcapping = softcap
    try:
        (completion_logps(model, batch, chunk_tokens=50).sums * weights).sum().backward()
        chunked = all_grads(model)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        if softcap is not None:  # Llama does not cap; the reference applies the cap by hand
            logits = torch.tanh(logits / softcap) * softcap
    finally:
        model.config.final_logit_softcapping = None
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    ((logps * batch.completion_mask[:, 1:]).sum(dim=1) * weights).sum().backward()
    full = all_grads(model)
    assert chunked.keys() == full.keys() and len(full) == len(list(model.parameters()))
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-4, atol=1e-5, msg=name)


def per_sequence(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-token values at `mask`'s positions summed per row."""
    return torch.zeros(mask.shape).masked_scatter(mask, values.float()).sum(dim=1)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_statistics_equal_trls_chunked_head(model, tokenizer, pairs, softcap):
    """Entropy, mean logit, log sum_v p_v^2 and top-1 hits per token equal TRL's chunked LM head, which
    makes its `entropy`, `logits/*` and `mean_token_accuracy` metrics and the WPO weights. The chosen
    completions are the model's own greedy continuations, so each of their tokens is a top-1 hit."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    prompts = [p.prompt_ids[-48:] for p in pairs[:3]]
    with torch.no_grad():
        greedy = [
            model.generate(
                torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
            for prompt in prompts
        ]
    batch = pack_pairs(prompts, greedy, [p.chosen_ids[: 10 + 7 * i] for i, p in enumerate(pairs[:3])], 0)
    model.config.final_logit_softcapping = softcap
    try:
        with torch.no_grad():
            ours = completion_logps(model, batch, chunk_tokens=7, with_stats=True)
            hidden = model.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).last_hidden_state
    finally:
        model.config.final_logit_softcapping = None
    mask = batch.completion_mask[:, 1:].bool()
    head = model.lm_head
    _, entropy, log_sum_sq, mean_logits, is_top1 = ChunkedLogProbFunction.apply(
        hidden[:, :-1][mask],
        head.weight,
        head.bias,
        batch.input_ids[:, 1:][mask],
        1.0,
        64,
        softcap,
        1.0,
        OPTIONAL_OUTPUTS,
    )
    torch.testing.assert_close(ours.entropy_sums, per_sequence(mask, entropy), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.logits_sums, per_sequence(mask, mean_logits), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.token_log_sum_sq_probs[mask], log_sum_sq, rtol=1e-5, atol=1e-5)
    assert ours.top1_counts.tolist() == per_sequence(mask, is_top1).tolist()
    chosen_hits, rejected_hits = ours.split(ours.top1_counts)
    assert chosen_hits.tolist() == [10.0, 10.0, 10.0]
    assert (rejected_hits < ours.split(ours.lengths)[1]).all()


def test_head_path_check_catches_unknown_logit_processing(model):
    check_head_path(model, model.config.vocab_size)
    model.config.final_logit_softcapping = 0.5  # the split path now transforms, the model does not
    try:
        with pytest.raises(ValueError, match="post-processes logits"):
            check_head_path(model, model.config.vocab_size)
    finally:
        model.config.final_logit_softcapping = None


def test_a_model_that_is_not_a_causal_lm_is_bad_input():
    """BERT loads as `BertLMHeadModel` through AutoModelForCausalLM, but its head transforms the states
    first: the check stops it as bad input (one line, exit 2), not as a failed run."""
    from transformers import BertConfig, BertLMHeadModel

    from raydpo.errors import RaydpoError

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.intermediate_size, config.is_decoder = 32, True
    bert = BertLMHeadModel(config).eval()
    with pytest.raises(RaydpoError, match="not a causal"):
        check_head_path(bert, config.vocab_size)


def test_length_normalised_losses_count_completion_tokens_as_trl_does(model, tokenizer, pairs):
    """ipo and sigmoid_norm divide by each completion's token count, TRL's `completion_mask` sum, also
    with an empty prompt, where the first completion token has nothing to be predicted from."""
    from raydpo.losses import LossSettings
    from raydpo.train_stage.forward import loss_inputs

    prompts = [[], pairs[0].prompt_ids]
    chosens, rejecteds = [pairs[0].chosen_ids, pairs[1].chosen_ids], [pairs[0].rejected_ids] * 2
    batch = pack_pairs(prompts, chosens, rejecteds, pad_token_id(tokenizer))
    with torch.inference_mode():
        scores = completion_logps(model, batch, with_stats=True)
    columns = {"chosen_input_ids": chosens, "rejected_input_ids": rejecteds}
    columns |= {f"ref_{side}_logps": [0.0, 0.0] for side in ("chosen", "rejected")}
    inputs = loss_inputs(scores, columns, LossSettings(loss_types=["ipo"]), torch.device("cpu"))
    trl_lengths = batch.completion_mask.sum(dim=1).float()  # TRL divides by this mask's sums
    assert inputs.chosen_lengths.tolist() == trl_lengths[:2].tolist() == [len(c) for c in chosens]
    assert inputs.rejected_lengths.tolist() == trl_lengths[2:].tolist()
    assert scores.lengths[0].item() == len(chosens[0]) - 1  # one token fewer is scored
