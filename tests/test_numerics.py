"""The policy is trained as the reference was scored: dtype and attention-kernel rules, dropout off by
default (a GPT-2 with dropout 0.1 trained by real `raydpo.train` runs), and the strict step-1 check."""

from __future__ import annotations

import math

import pytest
import torch

import raydpo
from raydpo.config import TrainConfig
from raydpo.errors import RaydpoError
from raydpo.numerics import check_cache_numerics, load_causal_lm, resolve_dtype
from raydpo.toy import build_toy_model


def test_auto_dtype_is_bf16_on_gpu_and_fp32_on_cpu():
    assert resolve_dtype("auto", on_gpu=True) == "bfloat16"
    assert resolve_dtype("auto", on_gpu=False) == "float32"
    assert resolve_dtype("float16", on_gpu=False) == "float16"
    with pytest.raises(RaydpoError, match="dtype must be one of"):
        resolve_dtype("fp8", on_gpu=True)


def test_cache_numerics_rule():
    """Another dtype is refused naming both; another kernel passes in fp32 (with a note), not in bf16."""
    fp32_eager = {"dtype": "float32", "attn_implementation": "eager"}
    assert check_cache_numerics(fp32_eager, "float32", "eager") is None
    assert "agree to float32 rounding" in check_cache_numerics(fp32_eager, "float32", "sdpa")
    with pytest.raises(RaydpoError, match="computed in float32 but training runs in bfloat16"):
        check_cache_numerics(fp32_eager, "bfloat16", "eager")
    bf16_sdpa = {"dtype": "bfloat16", "attn_implementation": "sdpa"}
    with pytest.raises(RaydpoError, match="attention sdpa but training uses eager; in bfloat16"):
        check_cache_numerics(bf16_sdpa, "bfloat16", "eager")
    with pytest.raises(RaydpoError, match="records dtype 'auto'"):
        check_cache_numerics({"dtype": "auto", "attn_implementation": None}, "float32", "sdpa")


def completion_sums(
    model_dir, dtype: str, attn: str, batch, train_mode: bool = False, **load
) -> torch.Tensor:
    from raydpo.logprobs import completion_logps

    model = load_causal_lm(str(model_dir), dtype, attn, False, **load)
    model.train(train_mode)
    with torch.no_grad():
        return completion_logps(model, batch, 97).sums.double()


@pytest.fixture(scope="module")
def sample_batch(toy_model, en_rows):
    """8 real pairs of the English sample data, tokenized and packed as both stages pack them."""
    from raydpo.data import RowError, canonical_pair
    from raydpo.layout import pack_pairs
    from raydpo.tokenize import load_tokenizer, pad_token_id, tokenize_pair

    tokenizer = load_tokenizer(str(toy_model))
    pairs = []
    for row in en_rows:
        try:
            pairs.append(tokenize_pair(tokenizer, canonical_pair(row), 256))
        except RowError:
            continue
    pairs = pairs[:8]
    return pack_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        pad_token_id(tokenizer),
    )


def test_attention_kernels_agree_in_fp32_and_not_in_bf16(toy_model, sample_batch):
    """What the rule rests on: sdpa and eager sums agree to float32 rounding (measured ~1e-7 relative); in
    bf16 they differ by as much as bf16 differs from fp32 (~5e-5 relative here)."""
    reference = completion_sums(toy_model, "float32", "sdpa", sample_batch)
    fp32_gap = (completion_sums(toy_model, "float32", "eager", sample_batch) - reference).abs().max()
    bf16_sdpa = completion_sums(toy_model, "bfloat16", "sdpa", sample_batch)
    bf16_gap = (completion_sums(toy_model, "bfloat16", "eager", sample_batch) - bf16_sdpa).abs().max()
    dtype_gap = (bf16_sdpa - reference).abs().max()
    scale = reference.abs().max()
    assert fp32_gap <= 1e-5 * scale
    assert bf16_gap > 10 * fp32_gap and bf16_gap > 0.1 * dtype_gap


@pytest.fixture(scope="module")
def toy_gpt2(tmp_path_factory):
    return build_toy_model(
        tmp_path_factory.mktemp("models") / "gpt2",
        architecture="gpt2",
        dropout=0.1,
        max_position_embeddings=1024,
    )


def test_disable_dropout_reaches_modules_and_config_floats(toy_gpt2, sample_batch, tmp_path):
    """GPT-2 keeps its dropout in nn.Dropout modules; OPT keeps it as floats copied from the config (which
    TRL's module-only `disable_dropout_in_model` misses). With dropout disabled, a training-mode forward
    equals the eval-mode one for both; with it kept, it does not."""
    from transformers import OPTConfig, OPTForCausalLM

    opt_dir = tmp_path / "opt"
    opt = OPTConfig(
        vocab_size=int(sample_batch.input_ids.max()) + 1,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        dropout=0.1,
        attention_dropout=0.1,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    OPTForCausalLM(opt).save_pretrained(opt_dir)
    for model_dir in (toy_gpt2, opt_dir):
        evaluated = completion_sums(model_dir, "float32", "eager", sample_batch)
        disabled = completion_sums(model_dir, "float32", "eager", sample_batch, True, disable_dropout=True)
        kept = completion_sums(model_dir, "float32", "eager", sample_batch, True)
        assert torch.equal(disabled, evaluated), model_dir
        assert (kept - evaluated).abs().max() > 1e-2, model_dir


def gpt2_settings(model, cache, output, **overrides):
    """One step of `test_train`'s run: 2 ZeRO-3 workers x micro batch 2, no eval, no checkpoint."""
    from test_train import run_settings

    return run_settings(
        model, cache, output, max_steps=1, eval_steps=None, checkpoint_steps=None, **overrides
    )


@pytest.fixture(scope="module")
def gpt2_cache(ray_session, toy_gpt2, tmp_path_factory):
    from test_train import precompute_english

    output = tmp_path_factory.mktemp("gpt2-cache") / "cache"
    precompute_english(toy_gpt2, output, limit=24)
    return output


def test_gpt2_with_dropout_starts_at_ln2_with_dropout_disabled(toy_gpt2, gpt2_cache, tmp_path):
    """The default (disable_dropout) makes step 1 reproduce the eval-mode reference: loss ln 2; kept
    dropout (--no-disable-dropout) gives another first loss and a warning, not a stop."""
    from test_train import metric_history
    from transformers import AutoConfig

    result = raydpo.train(gpt2_settings(toy_gpt2, gpt2_cache, tmp_path / "off"))
    assert metric_history(result, "loss")[1] == pytest.approx(math.log(2), abs=1e-5)
    assert metric_history(result, "ref_check/max_abs_logratio")[1] < 1e-3
    saved = AutoConfig.from_pretrained(result.model_path)
    assert (saved.resid_pdrop, saved.attn_pdrop, saved.use_cache) == (0.1, 0.1, True)  # its own settings

    kept = raydpo.train(gpt2_settings(toy_gpt2, gpt2_cache, tmp_path / "on", disable_dropout=False))
    assert abs(metric_history(kept, "loss")[1] - math.log(2)) > 1e-4
    assert metric_history(kept, "ref_check/max_abs_logratio")[1] > 1e-2


def test_step_one_mismatch_stops_naming_the_gap():
    """The strict check raises on every rank with one line: the largest gap, the tolerance, the likely
    cause; the driver's summary of a worker's traceback keeps exactly that line."""
    from raydpo.errors import one_line
    from raydpo.train_stage.checks import ReferenceMismatchError, enforce_reference_check

    check = {"ref_check/max_abs_logratio": 12.5, "ref_check/max_abs_ref_logps": 900.0}
    config = TrainConfig(model="m")
    with pytest.raises(ReferenceMismatchError, match=r"by up to 12\.5 \(tolerance 0\.9") as stopped:
        enforce_reference_check(check, config, dropout_on=False, rank=1)
    assert "\n" not in str(stopped.value) and "dtype, attention kernel" in str(stopped.value)
    wrapped = RuntimeError(
        "Worker group failed.\nTraceback (most recent call last):\n  File x\n"
        f"raydpo.train_stage.checks.ReferenceMismatchError: {stopped.value}\n"
    )
    assert one_line(wrapped, limit=1000).endswith(str(stopped.value))
    enforce_reference_check(check, TrainConfig(model="m", reference_is_different=True), False, 0)
    enforce_reference_check(check, config, dropout_on=True, rank=0)  # dropout kept: a warning
    enforce_reference_check({**check, "ref_check/max_abs_logratio": 0.8}, config, False, 0)
