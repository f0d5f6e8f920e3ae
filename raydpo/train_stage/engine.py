"""The one DeepSpeed layer of training: the run's DeepSpeed config, and the engine that owns backward,
the optimizer step, gradient clipping, checkpoints and the final model.

The config is built from the run's settings, or read from a user's JSON (`--deepspeed-config`) that
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
import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydpo.config import TrainConfig
from raydpo.errors import RaydpoError
from raydpo.faults import fault_point
from raydpo.hub import model_dir
from raydpo.numerics import load_causal_lm, load_config, resolve_dtype, restore_saved_config

if TYPE_CHECKING:
    import torch

    from raydpo.train_stage.plan import WorkerPlan

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
AUTO = "auto"
CHECKPOINT_TAG = "deepspeed"


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
    and releases every layer's weights and copies gradients through its flat buffers (on two CPU threads
    a 55M-parameter step took 3.0 s at stage 3 and 2.0 s at stage 0). Offloading needs ZeRO, so a run
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


# ---- the engine --------------------------------------------------------------------------------------


def zero3_loading(ds_config: dict[str, Any]):
    """Under ZeRO-3, make `from_pretrained` build the model partitioned (deepspeed.zero.Init), so no worker
    ever holds the whole model; transformers keeps only a weak reference to the returned object."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def load_policy(config: TrainConfig, dtype: str) -> torch.nn.Module:
    """The policy in the cache's numerics (dtype, attention kernel) with dropout off unless kept."""
    model = load_causal_lm(
        config.model,
        dtype,
        config.attn_implementation,
        config.trust_remote_code,
        disable_dropout=config.disable_dropout,
    )
    model.config.use_cache = False
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=_target_modules(config.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if config.activation_checkpointing:
            model.enable_input_require_grads()
    return model


def check_lora_targets(config: TrainConfig) -> None:
    """Before any worker starts: the LoRA target modules name modules of the policy (peft's own match,
    on the model built on the meta device, which allocates nothing)."""
    if not config.lora_r:
        return
    targets = _target_modules(config.lora_target_modules)
    if targets == "all-linear":
        return
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForCausalLM

    model_config = load_config(config.model, config.trust_remote_code)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    lora = LoraConfig(r=config.lora_r, target_modules=targets)
    names = [name for name, _ in built.named_modules()]
    if not any(check_target_module_exists(lora, name) for name in names):
        leaves = sorted(
            {name.rsplit(".", 1)[-1] for name, module in built.named_modules() if not list(module.children())}
        )
        raise RaydpoError(
            f"lora_target_modules {targets} match no module of {config.model}; its modules end in: "
            f"{', '.join(leaves)} (or use all-linear)"
        )


def _target_modules(value: list[str] | str) -> list[str] | str:
    if isinstance(value, list) and len(value) == 1 and value[0] == "all-linear":
        return "all-linear"  # peft takes this one as a string, not a module name
    return value


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay what Hugging Face's Trainer decays: every parameter but biases and norm weights, chosen by
    module type and name (under ZeRO-3 loading each parameter is a 1-D shard: shapes say nothing)."""
    from transformers import Trainer

    # the Trainer's own rule; it reads nothing of the Trainer instance
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if name in decayed else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]  # ZeRO drops empty groups; so must the scheduler


def initialize(module: torch.nn.Module, config: TrainConfig, ds_config: dict[str, Any], total_steps: int):
    """The DeepSpeed engine around `module`, and the scheduler it steps (torch's fused AdamW and
    transformers' schedule unless the DeepSpeed config names its own); checkpoints load weights-only."""
    import deepspeed
    import torch
    import transformers
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        # fused: one pass over each parameter and its moments, on CPUs too; the Trainer's (and TRL's)
        # default optimizer, adamw_torch_fused
        optimizer = torch.optim.AdamW(
            param_groups(module, config.weight_decay),
            lr=config.learning_rate,
            betas=ADAM_BETAS,
            eps=ADAM_EPS,
            fused=True,
        )
    if "scheduler" not in ds_config:
        # the run's schedule, around DeepSpeed's optimizer too (a callable DeepSpeed calls with the
        # optimizer it built), as the Hugging Face Trainer does for a DeepSpeed file without a scheduler
        def schedule(built: torch.optim.Optimizer):
            return transformers.get_scheduler(
                config.lr_scheduler,
                built,
                num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                num_training_steps=total_steps,
            )

        scheduler = schedule if optimizer is None else schedule(optimizer)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    load_checkpoints_weights_only(engine)
    if engine.dp_world_size == 1 and (
        not engine.zero_optimization() or isinstance(engine.optimizer, BF16_Optimizer)
    ):
        # One data-parallel rank: the all-reduce after backward would copy every gradient into a flat
        # bucket, scale it by 1/1, reduce it with itself and copy it back (the same values; a
        # gradient-sized buffer and about 5% of a step on CPUs). The bf16 optimizer has summed the
        # gradients into its fp32 buffer before; ZeRO's other optimizers reduce into their own buffers
        # there, so they keep it.
        engine.enable_backward_allreduce = False
    if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
        keep_clipped_grad_norm(engine)
    return engine, scheduler


def keep_clipped_grad_norm(engine) -> None:
    """Clipping at ZeRO stage 0 in fp32, with the norm kept where `get_global_grad_norm` reads it.

    DeepSpeed's stage-0 clipping drops the norm it computes, and computes it with fp32 sums, which on
    CPUs are off by 1e-4 relative on a tensor of a few million values. ZeRO's optimizers sum in fp64; so
    does this. Without clipping no norm is computed, and none is logged, as in the Trainer."""
    import torch

    def clip_fp32_gradients() -> None:
        params = [param for param in engine.module.parameters() if param.grad is not None]
        norms = [torch.linalg.vector_norm(param.grad, dtype=torch.float64) for param in params]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), norm)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_fp32_gradients


def load_checkpoint_file(path: str, map_location=None) -> Any:
    """`torch.load(weights_only=True)` of one DeepSpeed checkpoint file: tensors, containers and the
    DeepSpeed classes a ZeRO checkpoint holds (its stage, its loss scaler and, at stages 1 and 2, where
    each parameter's slice lies in the flat partition), never arbitrary pickled objects."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoints_weights_only(engine) -> None:
    """DeepSpeed's torch checkpoint engine unpickles whatever a checkpoint file holds
    (`weights_only=False`); every load of model, optimizer and client state goes through this method."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.load = load_checkpoint_file
    else:
        logger.warning(
            "checkpoints are loaded by DeepSpeed's %s, which may unpickle them",
            type(engine.checkpoint_engine).__name__,
        )


def load_checkpoint(engine, checkpoint) -> dict[str, Any]:
    """Load a Ray Train checkpoint's ZeRO state into the engine; returns the client state saved with it."""
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
    return client_state or {}


def save_checkpoint(engine, client_state: dict[str, Any], metrics: dict[str, Any], rank: int) -> None:
    """Every rank saves its ZeRO shard; Ray Train merges the ranks' directories into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raydpo-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state=dict(client_state))
        fault_point("train.checkpoint_write", rank=rank)  # after the local shard, before Ray Train has it
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint-{client_state['step']:08d}",
        )


def save_final_model(engine, plan: WorkerPlan, rank: int) -> str | None:
    """Gather the sharded weights and write a Hugging Face model directory (rank 0), published atomically."""
    from transformers import AutoTokenizer

    from raydpo.cache import publish_directory

    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state_dict = engine.module.state_dict()
    if rank != 0:
        return None
    config = plan.config
    policy = engine.module.model
    state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
    with tempfile.TemporaryDirectory(prefix="raydpo-model-") as directory:
        if config.lora_r:
            merge_lora(policy, state_dict, config, Path(directory))
        else:
            restore_saved_config(policy, config.model, config.trust_remote_code)
            policy.save_pretrained(directory, state_dict=state_dict)
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir(plan.tokenizer, what="tokenizer", weights=False),
            trust_remote_code=config.trust_remote_code,
        )
        tokenizer.save_pretrained(directory)
        publish_directory(directory, plan.model_output)
    return plan.model_output


def merge_lora(peft_model, state_dict: dict[str, torch.Tensor], config: TrainConfig, directory: Path) -> None:
    """Save the adapter (DIR/adapter) and the base model with the adapter merged in (DIR)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = directory / "adapter"
    peft_model.save_pretrained(adapter_dir, state_dict=state_dict)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir(config.model),
        dtype=next(iter(state_dict.values())).dtype,
        trust_remote_code=config.trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(directory)


def grad_norm(engine) -> dict[str, float]:
    """The last step's gradient norm as a metric (a host read: taken at logging steps only); none when
    the step computed none (stage 0 without clipping)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return {}
    return {"grad_norm": float(norm.item() if hasattr(norm, "item") else norm)}


def learning_rate(engine, scheduler) -> float:
    if scheduler is not None:
        return float(scheduler.get_last_lr()[0])
    return float(engine.get_lr()[0])
