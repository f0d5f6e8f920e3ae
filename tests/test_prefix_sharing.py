"""Prefix sharing: one row `prompt | chosen | rejected` per pair gives the values of two sequences apart.

Real sample pairs (English multi-turn and Chinese) through tiny random models of the architectures
users bring: Llama, Qwen2 (tied embeddings, qkv bias), Gemma 2 (soft-capping, alternating sliding and
full layers, eager attention), Mistral (a sliding window shorter than the sequences), GPT-2 (learned
absolute positions) and a mixture of experts (Qwen2-MoE).
"""

from __future__ import annotations

import contextlib
import json
import logging
from unittest import mock

import pytest
import torch
from transformers import (
    AttentionInterface,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.integrations import flex_attention as transformers_flex
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from raydpo import attention, logprobs
from raydpo.data import RowError, canonical_pair
from raydpo.layout import pack_pairs, pack_shared
from raydpo.logprobs import attention_mode, check_prefix_sharing, completion_logps, use_prefix_sharing
from raydpo.tokenize import pad_token_id, tokenize_pair

WINDOW = 16  # shorter than every sequence below: the sliding layers' mask matters


def architectures(vocab: int, hidden_size: int = 32) -> dict[str, torch.nn.Module]:
    """Tiny models of each attention variant; 4 heads of `hidden_size / 4` (GPU kernels want 16 or more)."""
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {
        "llama": LlamaForCausalLM(LlamaConfig(**common)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)),
        "gemma2": Gemma2ForCausalLM(
            Gemma2Config(
                **common,
                head_dim=hidden_size // 4,
                sliding_window=WINDOW,
                final_logit_softcapping=5.0,
                attn_logit_softcapping=10.0,
                attn_implementation="eager",
            )
        ),
        "mistral": MistralForCausalLM(MistralConfig(**common, sliding_window=WINDOW)),
        "gpt2": GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab, n_embd=hidden_size, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
            )
        ),
        "qwen2_moe": Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                **common,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
            )
        ),
    }


@pytest.fixture(scope="module")
def models(tokenizer):
    torch.manual_seed(0)
    return {name: model.eval() for name, model in architectures(len(tokenizer)).items()}


@pytest.fixture(scope="module")
def pairs(tokenizer, en_rows, zh_rows):
    """Four English multi-turn and four Chinese pairs, prompts cut to 96 tokens, pairs to 192."""
    out = []
    for rows in (en_rows, zh_rows):
        taken = []
        for row in rows:
            try:
                taken.append(tokenize_pair(tokenizer, canonical_pair(row), 192, 96))
            except RowError:
                continue
            if len(taken) == 4:
                break
        out += taken
    assert all(len(p.prompt_ids) + min(len(p.chosen_ids), len(p.rejected_ids)) > WINDOW for p in out)
    return out


def columns(pairs) -> tuple[list[list[int]], ...]:
    return [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]


@contextlib.contextmanager
def uncompiled_flex_attention():
    """transformers' `flex_attention` kernel with FlexAttention run eagerly: inductor's CPU template
    for FlexAttention does not compile masks that read tensors, and the GPU kernel is what it is for
    (`benchmarks/gpu.py` checks it there). The eager path applies the same block mask and score_mod."""
    from torch.nn.attention.flex_attention import flex_attention

    def eager(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    with mock.patch.object(transformers_flex, "compile_friendly_flex_attention", eager):
        yield


@contextlib.contextmanager
def reference_varlen():
    """Shared rows through `VarlenPlan` (one variable-length call per layer, as on a GPU in 16 bits),
    with the flash kernel, which needs a GPU, replaced by its definition: each sequence's queries
    causally over its keys, aligned to the last key, by the segment-wise SDPA tested above."""

    def kernel(query, key, value, plan, scaling):
        groups = query.shape[1] // key.shape[1]
        out = []
        for sequence in range(len(plan.cu_query) - 1):
            queries = slice(*plan.cu_query[sequence : sequence + 2].tolist())
            keys = slice(*plan.cu_key[sequence : sequence + 2].tolist())
            k, v = (s[keys].transpose(0, 1).repeat_interleave(groups, dim=0) for s in (key, value))
            out.append(attention._causal(query[queries].transpose(0, 1), k, v, 0.0, scaling).transpose(0, 1))
        return torch.cat(out)

    with (
        mock.patch.object(logprobs, "use_varlen", lambda device, dtype: True),
        mock.patch.object(attention, "_varlen_kernel", kernel),
    ):
        yield


@contextlib.contextmanager
def attending(model: torch.nn.Module, kernel: str):
    """The model attending over shared rows through a dense 4D `mask`, a `segment` at a time in
    blocks of 16 queries (so the sample's completions take several blocks), through a `varlen` plan,
    or FlexAttention's block
    mask (`flex`, run eagerly; the rows span several 128-key blocks), and with "checkpointed"
    recomputing each layer in backward (training mode, as `activation_checkpointing` runs it);
    restored afterwards. A kernel ending in "packed" gets the pairs end to end in one row."""
    implementation = model.config._attn_implementation
    if kernel.endswith("checkpointed"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    varlen = contextlib.nullcontext()
    if kernel.startswith(("segments", "varlen")):
        assert implementation == "sdpa", "segment-wise attention replaces SDPA only"
        attention.register()
        model.set_attn_implementation(attention.ATTENTION_NAME)
    if kernel.startswith("varlen"):
        varlen = reference_varlen()
    if kernel.startswith("flex"):
        model.set_attn_implementation("flex_attention")
    try:
        with mock.patch.object(attention, "QUERY_BLOCK", 16), uncompiled_flex_attention(), varlen:
            yield
    finally:
        model.set_attn_implementation(implementation)
        model.gradient_checkpointing_disable()
        model.eval()


@pytest.mark.parametrize(
    ("name", "kernel"),
    [(name, "mask") for name in ("llama", "qwen2", "gemma2", "mistral", "gpt2", "qwen2_moe")]
    + [(name, "segments") for name in ("llama", "qwen2", "mistral", "gpt2", "qwen2_moe")]  # SDPA models
    + [(name, "flex") for name in ("gemma2", "mistral")]  # soft-capping and windows in a block mask
    + [(name, "varlen") for name in ("llama", "qwen2", "gpt2")]
    # the pairs end to end in one row: attention must not cross from one pair to the next
    + [(name, "segments-packed") for name in ("llama", "qwen2", "gpt2", "qwen2_moe")]
    + [("llama", "varlen-packed"), ("gemma2", "mask-packed"), ("mistral", "flex-packed")],
)
def test_shared_equals_unshared(models, tokenizer, pairs, name, kernel):
    model = models[name]
    pad = pad_token_id(tokenizer)
    packed = kernel.endswith("packed")
    with attending(model, kernel), torch.inference_mode():
        unshared = completion_logps(model, pack_pairs(*columns(pairs), pad), chunk_tokens=61, with_stats=True)
        batch = pack_shared(*columns(pairs), pad, packed=packed)
        shared = completion_logps(model, batch, chunk_tokens=61, with_stats=True)
        reason = check_prefix_sharing(model)
    assert batch.input_ids.shape[0] == (1 if packed else len(pairs))
    torch.testing.assert_close(shared.lengths, unshared.lengths, rtol=0, atol=0)
    for field in ("sums", "shared_sums", "tail_sums", "logits_sums"):
        torch.testing.assert_close(
            getattr(shared, field), getattr(unshared, field), rtol=1e-5, atol=1e-6, msg=field
        )
    # per-token values too, completion token by completion token
    for row in range(2 * len(pairs)):
        torch.testing.assert_close(
            shared.token_logps[row][shared.target_mask[row]],
            unshared.token_logps[row][unshared.target_mask[row]],
            rtol=1e-5,
            atol=1e-5,
        )
    if kernel.startswith("flex"):  # the compiled kernel is for GPUs: on CPU, prefix sharing stays off
        assert reason is not None and "GPUs only" in reason
    else:
        assert reason is None


@pytest.mark.parametrize(
    ("name", "kernel"),
    [
        ("llama", "mask"),
        ("llama", "segments"),
        ("llama", "segments-checkpointed"),
        ("llama", "varlen"),
        ("gemma2", "mask"),
        ("llama", "segments-packed"),
        ("llama", "varlen-packed"),
    ],
)
def test_gradients_equal_unshared(models, tokenizer, pairs, name, kernel):
    """The prompt's gradient is the sum of both branches' gradients: every parameter's gradient of one
    DPO-like objective equals the unshared one's, within 1e-5 of its norm (elements near zero are sums
    of terms taken in another order, so an element-wise relative bound would measure rounding)."""
    model = models[name]
    with attending(model, kernel):
        assert_gradients_equal(model, tokenizer, pairs, torch.device("cpu"), packed=kernel.endswith("packed"))


def assert_gradients_equal(model, tokenizer, pairs, device: torch.device, packed: bool = False) -> None:
    pad = pad_token_id(tokenizer)
    weights = torch.linspace(0.5, 2.0, 2 * len(pairs), device=device)  # an upstream gradient per sequence

    def gradients(batch) -> dict[str, torch.Tensor]:
        model.zero_grad()
        (completion_logps(model, batch.to(device), chunk_tokens=61).sums * weights).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    unshared = gradients(pack_pairs(*columns(pairs), pad))
    shared = gradients(pack_shared(*columns(pairs), pad, packed=packed))
    model.zero_grad()
    assert shared.keys() == unshared.keys() and len(shared) == len(list(model.parameters()))
    for parameter, expected in unshared.items():
        gap = (shared[parameter] - expected).norm() / expected.norm()
        assert gap <= 1e-5, f"{parameter}: relative gap {gap:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention compiles and runs backward on GPUs")
@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_flex_block_mask_on_gpu(tokenizer, pairs, name):
    """The compiled FlexAttention kernel over shared rows: soft-capping, alternating windowed layers,
    a window shorter than the rows; the values and every gradient of the unshared rows (fp32)."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    # heads of 16: the compiled kernel's smallest
    model = architectures(len(tokenizer), hidden_size=64)[name].to(device).eval()
    model.set_attn_implementation("flex_attention")
    assert check_prefix_sharing(model) is None and attention_mode(model) == "through a block mask"
    pad = pad_token_id(tokenizer)
    with torch.inference_mode():
        unshared = completion_logps(model, pack_pairs(*columns(pairs), pad).to(device)).sums
        shared = completion_logps(model, pack_shared(*columns(pairs), pad).to(device)).sums
    torch.testing.assert_close(shared, unshared, rtol=1e-5, atol=1e-6)
    assert_gradients_equal(model, tokenizer, pairs, device)


def test_layout(tokenizer):
    """Rejected positions restart at the prompt's end; each branch's first token is scored from the
    last prompt position; an empty prompt leaves the first token of each branch unscored."""
    batch = pack_shared([[5, 6, 7], []], [[8, 9], [10, 11, 12]], [[13], [14, 15]], 0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 13], [10, 11, 12, 14, 15, 0]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]
    assert batch.position_ids[1, :5].tolist() == [0, 1, 2, 0, 1]
    # flat indices into the [rows * width] outputs: row 1 starts at 6
    assert batch.predecessors.tolist() == [[2, 3, -1], [-1, 6, 7], [2, -1, -1], [-1, 9, -1]]
    assert batch.targets[:, :2].tolist() == [[8, 9], [10, 11], [13, 0], [14, 15]]
    assert batch.segment_lengths() == ((0, 0, 3, 2, 1), (1, 0, 0, 3, 2))

    packed = pack_shared(
        [[5, 6, 7], [], [1]], [[8, 9], [10, 11, 12], [2]], [[13], [14, 15], [3]], 0, packed=True
    )
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 13, 10, 11, 12, 14, 15, 1, 2, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 0, 1, 0, 1, 1]]
    # the second pair's empty prompt leaves its branches' first tokens unscored, as above
    assert packed.predecessors.tolist() == [
        [2, 3, -1],
        [-1, 6, 7],
        [11, -1, -1],
        [2, -1, -1],
        [-1, 9, -1],
        [11, -1, -1],
    ]
    assert packed.segment_lengths() == ((0, 0, 3, 2, 1), (0, 6, 0, 3, 2), (0, 11, 1, 1, 1))
    assert packed.pair_tokens == batch.pair_tokens + 4  # the third pair: 3 tokens, its prompt twice


def ignores_mask(module, query, key, value, attention_mask, **kwargs):
    """An attention kernel that is causal within a row and takes no custom mask (like varlen kernels
    without segment ids): with prefix sharing its rejected tokens would see the chosen ones."""
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def test_check_refuses_attention_that_ignores_the_mask(tokenizer):
    AttentionInterface.register("raydpo_test_ignores_mask", ignores_mask)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        attn_implementation="raydpo_test_ignores_mask",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    reason = check_prefix_sharing(model)
    assert reason is not None and "does not follow the 4D mask" in reason
    model.set_attn_implementation("sdpa")
    assert check_prefix_sharing(model) is None


def test_sdpa_models_attend_a_segment_at_a_time(tokenizer, tmp_path, caplog):
    """`auto` switches an SDPA model to segment-wise attention (its saved config does not name it) and
    leaves an eager model (Gemma 2's soft-capping) on the 4D mask; both pass the load-time check."""
    torch.manual_seed(0)
    built = architectures(len(tokenizer))
    llama, gemma2 = built["llama"].eval(), built["gemma2"].eval()
    with caplog.at_level(logging.DEBUG, logger="raydpo.logprobs"):
        assert use_prefix_sharing(llama, "auto") and use_prefix_sharing(gemma2, "auto")
    assert llama.config._attn_implementation == attention.ATTENTION_NAME
    assert gemma2.config._attn_implementation == "eager"
    assert (attention_mode(llama), attention_mode(gemma2)) == (
        "a segment at a time, pairs packed in one row",
        "through a 4D mask",
    )
    assert [r.getMessage() for r in caplog.records] == [
        "prefix sharing: attention a segment at a time, pairs packed in one row",
        "prefix sharing: attention through a 4D mask",
    ]
    llama.save_pretrained(tmp_path)
    assert attention.ATTENTION_NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text()).get("attn_implementation") in (None, "sdpa")


def test_a_failing_varlen_kernel_falls_back_to_a_call_per_segment(tokenizer, caplog):
    """A GPU whose torch has no flash kernel for varlen (pre-Ampere) keeps segment-wise attention, a
    call per segment, saying why, rather than the dense 4D mask."""

    def unsupported(*args):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    torch.manual_seed(0)
    llama = architectures(len(tokenizer))["llama"].eval()
    with (
        mock.patch.object(logprobs, "use_varlen", lambda device, dtype: True),
        mock.patch.object(attention, "_varlen_kernel", unsupported),
        caplog.at_level(logging.DEBUG, logger="raydpo.logprobs"),
    ):
        assert use_prefix_sharing(llama, "on")
        assert attention_mode(llama) == "a segment at a time, pairs packed in one row"
    assert [r.getMessage() for r in caplog.records] == [
        "prefix sharing: the varlen kernel is off, attention a segment at a time: LlamaForCausalLM cannot take "
        "a shared-prefix mask: FlashAttention only supports Ampere GPUs or newer.",
        "prefix sharing: attention a segment at a time, pairs packed in one row",
    ]


def varlen_attn_of(version: str):
    """A stand-in for `torch.nn.attention.varlen.varlen_attn` with the keywords of torch `version`
    (2.10: `is_causal`; 2.11: `window_size`; 2.12 on: `enable_gqa` too), computing flash's definition.
    Without `enable_gqa` it takes as many key heads as query heads, as those versions' kernels do."""

    def attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal, gqa):
        assert causal, "the call asked for no causal mask"
        assert gqa or key.shape[1] == query.shape[1], "grouped heads without enable_gqa"
        groups = query.shape[1] // key.shape[1]
        out = []
        for sequence in range(len(cu_seq_q) - 1):
            queries = slice(*cu_seq_q[sequence : sequence + 2].tolist())
            keys = slice(*cu_seq_k[sequence : sequence + 2].tolist())
            k, v = (s[keys].transpose(0, 1).repeat_interleave(groups, dim=0) for s in (key, value))
            out.append(attention._causal(query[queries].transpose(0, 1), k, v, 0.0, scale).transpose(0, 1))
        return torch.cat(out)

    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, scale=None):
        return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, is_causal, False)

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        causal = tuple(window_size) == (-1, 0)
        return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal, False)

    def torch_2_13(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
    ):
        causal = tuple(window_size) == (-1, 0)
        return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal, enable_gqa)

    return {"2.10": torch_2_10, "2.11": torch_2_11, "2.13": torch_2_13}[version]


@pytest.mark.parametrize("version", ["2.10", "2.11", "2.13"])
def test_the_varlen_call_fits_each_torch_versions_keywords(tokenizer, pairs, version):
    """torch 2.10 to 2.13 changed `varlen_attn`'s keywords (torch 2.11 has no `enable_gqa`; a GPU with it
    had fallen back to a call per segment). A grouped-query model's shared sums through the call equal
    its unshared sums on the sample pairs, whichever keywords the installed torch takes."""
    from torch.nn.attention import varlen as torch_varlen

    torch.manual_seed(0)
    qwen2 = architectures(len(tokenizer))["qwen2"].eval()
    assert qwen2.config.num_attention_heads != qwen2.config.num_key_value_heads
    pad = pad_token_id(tokenizer)
    attention._varlen_parameters.cache_clear()
    with (
        mock.patch.object(torch_varlen, "varlen_attn", varlen_attn_of(version)),
        mock.patch.object(logprobs, "use_varlen", lambda device, dtype: True),
        torch.inference_mode(),
    ):
        assert use_prefix_sharing(qwen2, "on")
        assert attention_mode(qwen2) == "a segment at a time (varlen), pairs packed in one row"
        unshared = completion_logps(qwen2, pack_pairs(*columns(pairs), pad)).sums
        shared = completion_logps(qwen2, pack_shared(*columns(pairs), pad, packed=True)).sums
    attention._varlen_parameters.cache_clear()
    torch.testing.assert_close(shared, unshared, rtol=1e-5, atol=1e-5)


def test_auto_leaves_prefix_sharing_off_on_a_gpu_without_the_varlen_kernel(tokenizer, caplog):
    """On a GPU, attention a segment at a time costs 2.5-6x the unshared step (measured on an H200), so
    `auto` keeps sharing off there when the varlen kernel is out (fp32, torch < 2.10, a failing kernel)
    and says why; `on` keeps it, with the same warning."""
    torch.manual_seed(0)
    llama = architectures(len(tokenizer))["llama"].eval()
    with (
        mock.patch.object(logprobs, "_on_gpu", lambda model: True),
        caplog.at_level(logging.WARNING, logger="raydpo.logprobs"),
    ):
        assert not use_prefix_sharing(llama, "auto")
        assert llama.config._attn_implementation == "sdpa"
        assert use_prefix_sharing(llama, "on")
    assert attention_mode(llama) == "a segment at a time, pairs packed in one row"
    slow = "attention a segment at a time is slower on a GPU than unshared rows"
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"prefix sharing is off: {slow}",
        f"prefix sharing: {slow}",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length flash kernel runs on GPUs")
def test_varlen_on_gpu(tokenizer, pairs):
    """An SDPA model in bf16 on a GPU attends over shared rows with one varlen call per layer: the
    load-time check passes, the sums match the unshared rows to bf16 rounding, and backward runs."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = architectures(len(tokenizer))["qwen2"].to(device, torch.bfloat16).eval()
    assert use_prefix_sharing(model, "on")
    assert attention_mode(model) == "a segment at a time (varlen), pairs packed in one row"
    pad = pad_token_id(tokenizer)
    with torch.inference_mode():
        unshared = completion_logps(model, pack_pairs(*columns(pairs), pad).to(device)).sums
        shared = completion_logps(model, pack_shared(*columns(pairs), pad, packed=True).to(device)).sums
    torch.testing.assert_close(shared, unshared, rtol=2e-2, atol=1e-2)
    completion_logps(model, pack_shared(*columns(pairs), pad, packed=True).to(device)).sums.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_flex_attention_on_cpu_keeps_prefix_sharing_off(tokenizer, caplog):
    """FlexAttention's block mask is for GPUs: on CPU `auto` leaves sharing off saying why, `on` stops."""
    torch.manual_seed(0)
    llama = architectures(len(tokenizer))["llama"].eval()
    llama.set_attn_implementation("flex_attention")
    with caplog.at_level(logging.WARNING, logger="raydpo.logprobs"):
        assert not use_prefix_sharing(llama, "auto")
    assert "use attn_implementation=sdpa" in caplog.records[-1].getMessage()
    with pytest.raises(
        ValueError, match="prefix_sharing=on: flex_attention runs shared-prefix rows on GPUs only"
    ):
        use_prefix_sharing(llama, "on")
