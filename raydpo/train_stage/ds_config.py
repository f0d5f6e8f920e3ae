"""The run's DeepSpeed config.

It is built from the run's settings, or read from a user's JSON (`--deepspeed-config`) that
may say "auto" where Hugging Face's Trainer integration allows it
(`HfTrainerDeepSpeedConfig.trainer_config_process` / `trainer_config_finalize`): the batch sizes,
`gradient_clipping`, `bf16`/`fp16.enabled`, the optimizer's lr, betas, eps and weight decay, the
scheduler's warmup and total steps, and the ZeRO bucket sizes that follow the model's hidden size.
They are filled with the run's values; an explicit value that disagrees with a setting of the run
(batch sizes, clipping, dtype, lr, weight decay, steps) is refused, as the Trainer refuses it, and so
is any "auto" left elsewhere: DeepSpeed would not know what it means.
"""

from __future__ import annotations

import json
import math
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

    In 16 bits, stage 0 (a single worker's, or one set) runs as stage 1: fp32 master weights, gradients
    and AdamW state in flat buffers, as ZeRO keeps them; in bf16 with fp32 gradient sums, which is
    DeepSpeed's bf16 optimizer. At stage 0 DeepSpeed wraps a 16-bit model in its unfused fp16 optimizer,
    which reads every gradient's overflow check back to the host and creates AdamW's state with a step
    of zero gradients that AdamW counts, so every bias correction comes one step late (figures in
    docs/benchmarks.md).
    """
    zero_stage = effective_zero_stage(zero_stage, world_size, offload_optimizer or offload_params)
    bf16_optimizer = zero_stage == 0 and dtype == "bfloat16"
    if zero_stage == 0 and dtype in ("bfloat16", "float16"):
        zero_stage = 1  # bf16: DeepSpeed's bf16 optimizer (fp32 sums, below); fp16: ZeRO-1's fp16 optimizer
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
    config: dict[str, Any] = {
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
    if bf16_optimizer:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def effective_zero_stage(zero_stage: int, world_size: int, offload: bool) -> int:
    """The ZeRO stage a built config runs: 0 for a single worker that offloads nothing.

    ZeRO partitions the optimizer state, gradients and (stage 3) weights across workers; with one worker
    every partition is the whole, so memory and values are those of stage 0, while stage 3 still gathers
    and releases every layer's weights and copies gradients through its flat buffers (slower for the same
    values; docs/benchmarks.md). Offloading needs ZeRO, so a run
    that offloads keeps its stage. (In bf16, `build` runs stage 0 as 1.)
    """
    return 0 if world_size == 1 and not offload else zero_stage


def _bucket_sizes(zero_stage: int, hidden_size: int | None) -> dict[str, int]:
    if not hidden_size or zero_stage < 2:
        return {}
    sizes = {"reduce_bucket_size": hidden_size * hidden_size}
    if zero_stage == 3:
        sizes["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        sizes["stage3_param_persistence_threshold"] = 10 * hidden_size
    return sizes


def for_run(config: TrainConfig, world_size: int, total_steps: int) -> dict[str, Any]:
    """The run's DeepSpeed config: `config.deepspeed_config` with "auto" resolved, or the built one."""
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
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        loaded.setdefault(key, AUTO)  # the run's settings decide them
    for section in ("bf16", "fp16"):  # and the dtype: the model is loaded in it
        if isinstance(loaded.setdefault(section, {}), dict):
            loaded[section].setdefault("enabled", AUTO)
    stage = loaded.get("zero_optimization", {}).get("stage", 0)
    needs_hidden = any(_get(loaded, f"zero_optimization.{key}") == AUTO for key in _bucket_sizes(3, 1))
    buckets = _bucket_sizes(
        stage, hidden_size(config.model, config.trust_remote_code) if needs_hidden else None
    )
    matched = {  # filled when "auto", refused when different
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch_size * config.grad_accum * world_size,
        "gradient_clipping": config.gradient_clipping,
        "bf16.enabled": dtype == "bfloat16",
        "fp16.enabled": dtype == "float16",
        "optimizer.params.lr": config.learning_rate,
        "optimizer.params.weight_decay": config.weight_decay,
        "scheduler.params.warmup_max_lr": config.learning_rate,
        "scheduler.params.warmup_num_steps": max(1, math.ceil(config.warmup_ratio * total_steps)),
        "scheduler.params.total_num_steps": total_steps,
    }
    filled_only = {  # filled when "auto"; an explicit value is the user's choice (no setting of the run)
        "optimizer.params.betas": list(ADAM_BETAS),
        "optimizer.params.eps": ADAM_EPS,
        "scheduler.params.warmup_min_lr": 0,
        **{f"zero_optimization.{key}": value for key, value in buckets.items()},
    }
    source = config.deepspeed_config
    for key, value in {**matched, **filled_only}.items():
        current = _get(loaded, key)
        if current == AUTO:
            _set(loaded, key, value)
        elif key in matched and current is not None and current != value:
            raise RaydpoError(
                f'{source}: {key}={current} but the run\'s settings give {value}; set it to "auto" or match it'
            )
    left = auto_keys(loaded)
    if left:
        raise RaydpoError(
            f'{source}: {left[0]} is "auto", which raydpo cannot fill (for the hidden-size buckets: the model '
            "config has no hidden_size, or the ZeRO stage does not use it); give a value"
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


def _get(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        node = node[part]
    node[leaf] = value


def auto_keys(values: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose value is "auto", in document order."""
    if isinstance(values, dict):
        return [key for name, value in values.items() for key in auto_keys(value, f"{prefix}{name}.")]
    return [prefix.rstrip(".")] if values == AUTO else []


def hidden_size(model: str, trust_remote_code: bool = False) -> int | None:
    """The model's hidden size (the largest of `hidden_sizes`), for bucket sizes; None when it has none."""
    config = load_config(model, trust_remote_code).get_text_config()
    size = getattr(config, "hidden_size", None)
    sizes = getattr(config, "hidden_sizes", None)
    return size if size is not None else (max(sizes) if sizes else None)
