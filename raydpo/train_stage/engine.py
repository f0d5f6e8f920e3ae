"""The one DeepSpeed layer of training: the engine that owns backward, the optimizer step, gradient
clipping, checkpoints and the final model, around the policy (LoRA or all weights) and the run's
DeepSpeed config (`ds_config`).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydpo.config import TrainConfig
from raydpo.errors import RaydpoError
from raydpo.faults import fault_point
from raydpo.hub import model_dir
from raydpo.numerics import load_causal_lm, load_config, restore_saved_config
from raydpo.train_stage.deepspeed_patches import (
    keep_clipped_grad_norm,
    load_checkpoints_weights_only,
    skip_allreduce_with_itself,
)
from raydpo.train_stage.ds_config import ADAM_BETAS, ADAM_EPS

if TYPE_CHECKING:
    import torch

    from raydpo.train_stage.plan import WorkerPlan

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"


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
    skip_allreduce_with_itself(engine)
    if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
        keep_clipped_grad_norm(engine)
    return engine, scheduler


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
