"""The DeepSpeed config of a training run: built from its settings, or a user's JSON.

The built config follows the run's dtype (`bf16`/`fp16.enabled`) and the model's hidden size (bucket
sizes). A user's file (`--deepspeed-config`) may say "auto" for the batch sizes, which the run's
settings decide.
"""

from __future__ import annotations

import json
from typing import Any

from raydpo.config import TrainConfig
from raydpo.errors import RaydpoError
from raydpo.numerics import load_config, resolve_dtype

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
AUTO = "auto"


def build(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    gradient_clipping: float,
    dtype: str,
    on_gpu: bool,
    hidden_size: int | None = None,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config of a run, built from its settings.

    Bucket sizes follow the model's hidden size as Hugging Face's "auto" values do, instead of
    DeepSpeed's fixed defaults (5e8 elements), which are sized for billion-parameter models.
    """
    zero: dict[str, Any] = {"stage": zero_stage}
    zero.update(_bucket_sizes(zero_stage, hidden_size))
    if zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            contiguous_gradients=True,
            overlap_comm=on_gpu,  # overlapping helps on GPUs; with gloo on CPUs it only adds threads
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": gradient_clipping,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_optimization": zero,
        # torch's AdamW is the client optimizer, also when its state lives on the CPU
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _bucket_sizes(zero_stage: int, hidden_size: int | None) -> dict[str, int]:
    if not hidden_size or zero_stage < 2:
        return {}
    sizes = {"reduce_bucket_size": hidden_size * hidden_size}
    if zero_stage == 3:
        sizes["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        sizes["stage3_param_persistence_threshold"] = 10 * hidden_size
    return sizes


def for_run(config: TrainConfig, world_size: int, total_steps: int) -> dict[str, Any]:
    """The run's DeepSpeed config: `config.deepspeed_config` with the batch sizes filled, or the built one."""
    dtype = resolve_dtype(config.dtype, config.use_gpu)
    if not config.deepspeed_config:
        return build(
            zero_stage=config.zero_stage,
            micro_batch_size=config.micro_batch_size,
            grad_accum=config.grad_accum,
            world_size=world_size,
            gradient_clipping=config.gradient_clipping,
            dtype=dtype,
            on_gpu=config.use_gpu,
            hidden_size=hidden_size(config.model, config.trust_remote_code),
            offload_optimizer=config.offload_optimizer,
            offload_params=config.offload_params,
        )
    loaded = _read(config.deepspeed_config)
    values = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch_size * config.grad_accum * world_size,
    }
    for key, value in values.items():  # "auto" means: take the run's value, as in HF's integration
        if loaded.get(key, AUTO) == AUTO:
            loaded[key] = value
        elif loaded[key] != value:
            raise RaydpoError(
                f"{config.deepspeed_config}: {key}={loaded[key]} but the run's settings give {value}"
            )
    return loaded


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            loaded = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise RaydpoError(f"cannot read the DeepSpeed config {path}: {error}") from None
    if not isinstance(loaded, dict):
        raise RaydpoError(f"{path} must hold a JSON object")
    return loaded


def hidden_size(model: str, trust_remote_code: bool = False) -> int | None:
    """The model's hidden size (the largest of `hidden_sizes`), for bucket sizes; None when it has none."""
    config = load_config(model, trust_remote_code).get_text_config()
    size = getattr(config, "hidden_size", None)
    sizes = getattr(config, "hidden_sizes", None)
    return size if size is not None else (max(sizes) if sizes else None)
