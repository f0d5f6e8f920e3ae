"""How both stages load a model, so that step 1 of training reproduces the cached reference.

At step 1 the policy is the reference: its log-probs must equal the cached ones, and the first
sigmoid loss is ln 2. That holds only if both stages compute the same numbers, so both decide here:

- dtype: `resolve_dtype` turns "auto" into bf16 on GPU, fp32 on CPU. The precompute records the
  resolved name in its manifest (and cache key); training resolves its own setting the same way.
- attention kernel: `resolve_attn_implementation` gives the kernel transformers actually picks (its
  default, usually sdpa, when none is asked for), recorded the same way.
- dropout: the reference is scored in eval mode; the policy trains with every dropout probability set
  to 0 (`load_causal_lm(disable_dropout=True)`, as TRL's `disable_dropout` default does), so its training
  forward is the same function.

The rule training applies to the cache's settings (`check_cache_numerics`): another dtype changes the
values by the dtype's rounding and is refused. Another attention kernel is accepted in float32, where
the kernels compute the same sums and differ by float32 rounding (below 1e-5 relative; measured in
tests/test_numerics.py), and refused in 16-bit dtypes, where the kernels round the attention
probabilities at different points and differ by bf16/fp16 rounding, as much as a dtype change.
"""

from __future__ import annotations

import re
from typing import Any

from raydpo.errors import RaydpoError, one_line
from raydpo.hub import model_dir

DTYPES = ("auto", "float32", "bfloat16", "float16")
# config attributes holding a dropout probability: GPT-2's resid/embd/attn_pdrop, OPT's dropout,
# attention_dropout and layerdrop, Llama's attention_dropout, BERT-style hidden_dropout_prob, ...
DROPOUT_ATTRIBUTE = re.compile(r"dropout|pdrop|layerdrop", re.IGNORECASE)


def resolve_dtype(dtype: str, on_gpu: bool) -> str:
    """The dtype a stage runs in: "auto" is bfloat16 on GPU and float32 on CPU; others name themselves."""
    if dtype not in DTYPES:
        raise RaydpoError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


def torch_dtype(name: str):
    """The torch dtype of a resolved dtype name."""
    import torch

    return getattr(torch, resolve_dtype(name, on_gpu=False))


def load_config(model: str, trust_remote_code: bool):
    """The model's transformers config; a model whose code ships with it needs `trust_remote_code`."""
    from transformers import AutoConfig

    directory = model_dir(model)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise RaydpoError(
                f"{model} ships its own model code: pass --trust-remote-code if you trust that repository"
            ) from None
        raise RaydpoError(f"could not load the config of {model}: {one_line(error)}") from None


def resolve_attn_implementation(model: str, requested: str | None, trust_remote_code: bool) -> str:
    """The attention kernel transformers uses for this model: the requested one, or its default.

    The default depends on the architecture (sdpa where supported, else eager); it is read from the
    model built on the meta device, which allocates nothing.
    """
    if requested:
        return requested
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(model, trust_remote_code)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return built.config._attn_implementation


def resolve_numerics(
    model: str, dtype: str, attn_implementation: str | None, trust_remote_code: bool, on_gpu: bool
) -> dict[str, str]:
    """The dtype and attention kernel a stage runs the model with, resolved (never "auto" or None): the
    precompute records them in its manifest and cache key, training compares its own with those."""
    return {
        "dtype": resolve_dtype(dtype, on_gpu),
        "attn_implementation": resolve_attn_implementation(model, attn_implementation, trust_remote_code),
    }


def dropout_settings(config) -> dict[str, float]:
    """The dropout probabilities of a transformers config (and of its text config), by attribute name."""
    found = {}
    for part in _config_parts(config):
        for name, value in vars(part).items():
            if (
                DROPOUT_ATTRIBUTE.search(name)
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                found[name] = float(value)
    return found


def _config_parts(config) -> list:
    """The config, and its text config when that is a separate object (multimodal models)."""
    text = config.get_text_config()
    return [config] if text is config else [config, text]


def _set_config_values(config, values: dict[str, Any]) -> None:
    for part in _config_parts(config):
        for name, value in values.items():
            if name in vars(part):
                setattr(part, name, value)


def disable_dropout_modules(model) -> None:
    """Every `torch.nn.Dropout` gets p = 0, as TRL's `disable_dropout_in_model` does.

    That alone misses models that keep the probability as a float read from the config at build time
    (OPT's `dropout`, `attention_dropout`, `layerdrop`; Llama's `attention_dropout`): `load_causal_lm`
    zeroes the config before the model is built, and both together cover either kind.
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def has_dropout(model) -> bool:
    """Whether the model's forward in training mode is random: a dropout module or setting above 0."""
    import torch

    modules = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    return modules or any(value > 0 for value in dropout_settings(model.config).values())


def load_causal_lm(
    model: str,
    dtype: str,
    attn_implementation: str | None,
    trust_remote_code: bool,
    disable_dropout: bool = False,
):
    """Load a causal LM as both stages do: this dtype and kernel, and (for the policy) dropout off."""
    from transformers import AutoModelForCausalLM

    config = load_config(model, trust_remote_code)
    if disable_dropout:
        _set_config_values(config, dict.fromkeys(dropout_settings(config), 0.0))
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": torch_dtype(dtype),
        "trust_remote_code": trust_remote_code,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    loaded = AutoModelForCausalLM.from_pretrained(model_dir(model), **kwargs)
    if disable_dropout:
        disable_dropout_modules(loaded)
    return loaded


def restore_saved_config(loaded, model: str, trust_remote_code: bool) -> None:
    """Put back in `loaded.config` what training changed for itself (dropout, use_cache), so the saved
    model has its own settings."""
    original = load_config(model, trust_remote_code)
    values = dropout_settings(original)
    values["use_cache"] = getattr(original.get_text_config(), "use_cache", True)
    _set_config_values(loaded.config, values)


def check_cache_numerics(cache_settings: dict[str, Any], dtype: str, attn_implementation: str) -> str | None:
    """Refuse a cache scored with numerics that change the values (the rule in this module's docstring).

    Returns a note when the settings differ harmlessly, None when they are the same.
    """
    cached_dtype = cache_settings.get("dtype")
    cached_attn = cache_settings.get("attn_implementation")
    if cached_dtype not in DTYPES[1:]:
        raise RaydpoError(
            f"the cache records dtype {cached_dtype!r}, not the dtype it was scored in (an older raydpo "
            "wrote it); precompute again"
        )
    if cached_dtype != dtype:
        raise RaydpoError(
            f"the reference log-probs were computed in {cached_dtype} but training runs in {dtype}; "
            f"set dtype={cached_dtype} (or precompute in {dtype}), or pass --reference-is-different"
        )
    if cached_attn is None or cached_attn == attn_implementation:
        return None
    if dtype != "float32":
        raise RaydpoError(
            f"the reference log-probs were computed with attention {cached_attn} but training uses "
            f"{attn_implementation}; in {dtype} the kernels round differently: set "
            f"attn_implementation={cached_attn}, or pass --reference-is-different"
        )
    return f"attention {cached_attn} (cache) vs {attn_implementation} (training) agree to float32 rounding"
