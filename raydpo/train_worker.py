"""The Ray Train worker loop: DeepSpeed ZeRO DPO on the policy alone, against cached reference log-probs.

Each worker reads its equal shard of the precompute output, packs chosen and rejected of a micro-batch
into one forward (padded to the batch's own longest sequence), sums completion log-probs with the same
function the precompute stage used, and takes the configured preference loss against the cached
reference values. DeepSpeed owns backward, the optimizer step, gradient clipping and checkpoints; Ray
Train owns the process group, restarts and checkpoint storage. Metrics are summed into one tensor and
all-reduced once per logging step; rank 0 logs them with TRL's names.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raydpo.cluster import MIMALLOC_LIBRARY, preloaded
from raydpo.deepspeed_config import ADAM_BETAS, ADAM_EPS
from raydpo.faults import fault_point
from raydpo.logprobs import (
    CompletionLogps,
    PackedPairs,
    SharedPairs,
    completion_logps,
    pack_batch,
    use_prefix_sharing,
)
from raydpo.losses import LossInputs, LossSettings, ld_combine, preference_loss, wpo_weights
from raydpo.numerics import has_dropout, load_causal_lm, restore_saved_config

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"
STATE_KEYS = ("step", "num_tokens", "skipped_batches")
REFERENCE_TOLERANCE = 1e-3  # relative gap between policy and cached reference at step 1 that stops the run

# Per-rank sums, all-reduced together; means are formed after the reduction.
SUMS = (
    "loss",
    "micro_batches",
    "pairs",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "chosen_tokens",
    "logits/rejected",
    "rejected_tokens",
    "tokens",
)
PAIR_MEANS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
PAIR_MEANS += ("logps/chosen", "logps/rejected")


class PolicyScorer(torch.nn.Module):
    """The policy with `completion_logps` as its forward, so the DeepSpeed engine runs the forward.

    It takes the tensors of a `SharedPairs` batch (one row per pair) when `shared`, else of a
    `PackedPairs` batch; `shared` is decided once the engine holds the model (`decide_prefix_sharing`)."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.shared = False

    def forward(self, *tensors: torch.Tensor) -> CompletionLogps:
        batch = SharedPairs(*tensors) if self.shared else PackedPairs(*tensors)
        return completion_logps(self.model, batch, self.chunk_tokens, with_stats=True)


def decide_prefix_sharing(engine, setting: str, rank: int) -> bool:
    """Check, on every rank alike (under ZeRO-3 the check's forwards gather weights), whether the
    policy's attention follows a shared-prefix mask; `auto` turns sharing off where it does not."""
    scorer: PolicyScorer = engine.module
    scorer.shared = use_prefix_sharing(scorer.model, setting)
    if rank == 0:
        logger.info("prefix sharing: %s", "on (each prompt computed once)" if scorer.shared else "off")
    return scorer.shared


@dataclass
class MetricWindow:
    """Per-rank sums of the metrics over a logging window (or an eval pass)."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(len(SUMS), dtype=torch.float64))
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, scores: CompletionLogps, output, chosen_logps, rejected_logps) -> None:
        chosen_rewards, rejected_rewards = output.chosen_rewards, output.rejected_rewards
        chosen_logits, rejected_logits = scores.split(scores.logits_sums)
        chosen_lengths, rejected_lengths = scores.split(scores.lengths)
        values = {
            "loss": loss.detach().float(),
            "micro_batches": 1.0,
            "pairs": chosen_rewards.numel(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen_logps.detach().sum(),
            "logps/rejected": rejected_logps.detach().sum(),
            "logits/chosen": chosen_logits.sum(),
            "chosen_tokens": chosen_lengths.sum(),
            "logits/rejected": rejected_logits.sum(),
            "rejected_tokens": rejected_lengths.sum(),
        }
        for name, value in values.items():
            self.sums[SUMS.index(name)] += float(value)

    def add_tokens(self, tokens: int) -> None:
        self.sums[SUMS.index("tokens")] += tokens

    def reduce(self, device: torch.device) -> dict[str, float]:
        """All-reduce the sums (one collective) and form TRL's means."""
        import torch.distributed as dist

        total = self.sums.to(device)
        if dist.is_initialized():
            dist.all_reduce(total)
        s = dict(zip(SUMS, total.double().cpu().tolist(), strict=True))
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {"loss": s["loss"] / max(s["micro_batches"], 1)}
        metrics.update({name: s[name] / max(s["pairs"], 1) for name in PAIR_MEANS})
        metrics["logits/chosen"] = s["logits/chosen"] / max(s["chosen_tokens"], 1)
        metrics["logits/rejected"] = s["logits/rejected"] / max(s["rejected_tokens"], 1)
        metrics["tokens_per_second"] = s["tokens"] / elapsed
        metrics["samples_per_second"] = s["pairs"] / elapsed
        metrics["_tokens"] = s["tokens"]
        return metrics


def loss_on_batch(engine, columns: dict[str, Any], settings: LossSettings, pad_token_id: int, device):
    """Forward one micro-batch through the engine; returns (loss, scores, loss output, policy logps)."""
    batch = pack_batch(
        columns["prompt_input_ids"],
        columns["chosen_input_ids"],
        columns["rejected_input_ids"],
        pad_token_id,
        engine.module.shared,
    ).to(device)
    scores: CompletionLogps = engine(*batch.tensors())
    inputs = loss_inputs(scores, columns, settings, device)
    output = preference_loss(inputs, settings)
    return output.loss, scores, output, inputs, batch.pair_tokens


def loss_inputs(
    scores: CompletionLogps, columns: dict[str, Any], settings: LossSettings, device
) -> LossInputs:
    """Policy log-probs from the forward, reference log-probs from the cache, combined as configured."""

    def cached(name: str) -> torch.Tensor:
        return torch.as_tensor(columns[name], dtype=torch.float32, device=device)

    if settings.ld_alpha is not None:
        chosen, rejected = (
            ld_combine(shared, tail, settings.ld_alpha)
            for shared, tail in zip(
                scores.split(scores.shared_sums), scores.split(scores.tail_sums), strict=True
            )
        )
        ref = {
            side: ld_combine(
                cached(f"ref_{side}_logps_shared"), cached(f"ref_{side}_logps_tail"), settings.ld_alpha
            )
            for side in ("chosen", "rejected")
        }
    else:
        chosen, rejected = scores.split(scores.sums)
        ref = {side: cached(f"ref_{side}_logps") for side in ("chosen", "rejected")}
    chosen_lengths, rejected_lengths = scores.split(scores.lengths)
    chosen_mask = scores.split(scores.target_mask)[0]
    chosen_token_logps = scores.split(scores.token_logps)[0]
    inputs = LossInputs(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref["chosen"],
        ref_rejected_logps=ref["rejected"],
        chosen_lengths=chosen_lengths.float(),
        rejected_lengths=rejected_lengths.float(),
    )
    if settings.needs_chosen_nll:
        inputs.chosen_nll = -(chosen_token_logps * chosen_mask).sum() / chosen_mask.sum().clamp_min(1)
    if settings.use_weighting:
        weights = wpo_weights(scores.token_logps, scores.token_log_sum_sq_probs, scores.target_mask.float())
        chosen_weights, rejected_weights = weights.chunk(2)
        inputs.wpo_weights = chosen_weights * rejected_weights
    return inputs


def train_loop(plan: dict[str, Any]) -> dict[str, Any] | None:
    """Entry point of every Ray Train worker."""
    import deepspeed
    import ray.train
    import transformers

    from raydpo.config import TrainConfig, from_mapping
    from raydpo.tracking import MlflowLogger, NullLogger

    config: TrainConfig = from_mapping(TrainConfig, plan["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    settings = config.loss_settings()
    transformers.set_seed(config.seed)

    allocator = None
    if device.type == "cpu":
        allocator = "mimalloc" if preloaded(MIMALLOC_LIBRARY) else "system"
        if allocator != config.cpu_allocator:
            logger.warning(
                "rank %d: cpu_allocator=%s is not in effect (preload failed)", rank, config.cpu_allocator
            )
    deepspeed.init_distributed()  # adopts the process group Ray Train created (gloo on CPUs, NCCL on GPUs)
    ds_config = plan["deepspeed_config"]
    zero3_loading = _zero3_loading(ds_config)  # alive while the model loads: weights go straight to shards
    memory_at_start = peak_memory_gb(device, reduce=False)
    policy = load_policy(config, plan["dtype"])
    # with disable_dropout=False step 1 carries dropout noise (LoRA's own dropout cannot: its B starts at 0)
    dropout_on = not config.disable_dropout and has_dropout(policy)
    total_steps = plan["total_steps"]
    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(
            param_groups(policy, config.weight_decay), lr=config.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS
        )
    if "scheduler" not in ds_config and optimizer is not None:
        scheduler = transformers.get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
    engine, _, _, scheduler = deepspeed.initialize(
        model=PolicyScorer(policy, config.logits_chunk_tokens),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    load_checkpoints_weights_only(engine)
    prefix_shared = decide_prefix_sharing(engine, config.prefix_sharing, rank)

    state = {"step": 0, "num_tokens": 0, "skipped_batches": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        state.update({key: client_state.get(key, 0) for key in STATE_KEYS})
        logger.info("rank %d resumed from %s at step %d", rank, checkpoint.path, state["step"])

    tracker = MlflowLogger(plan["tracking_uri"], plan["run_id"]) if rank == 0 else NullLogger()
    batches = micro_batches(ray.train.get_dataset_shard("train"), config.micro_batch_size)
    for _ in range(
        state["step"] * config.grad_accum + state["skipped_batches"]
    ):  # seen before the checkpoint
        next(batches)

    engine.train()
    started = time.perf_counter()
    window = MetricWindow()
    final_metrics: dict[str, float] = {}
    reference_gap = None
    step_seconds = []
    for step in range(state["step"] + 1, total_steps + 1):
        step_started = time.perf_counter()
        done = 0
        while done < config.grad_accum:
            columns = next(batches, None)
            if columns is None:  # only when skipped batches used up the stream's spare pairs
                raise RuntimeError(f"the data ran out at step {step} after skipping non-finite batches")
            loss, scores, output, inputs, tokens = loss_on_batch(
                engine, columns, settings, plan["pad_token_id"], device
            )
            if not all_finite(loss, device):  # every rank skips (or stops) together
                handle_nonfinite(loss, columns, step, config, rank)
                state["skipped_batches"] += 1
                continue  # a replacement micro-batch keeps the accumulation aligned with the steps
            if step == 1 and reference_gap is None:  # before any update, on every rank at once; on
                reference_gap = reference_check(inputs, device)  # the first batch with a finite loss
                enforce_reference_check(reference_gap, config, dropout_on, rank)
            engine.backward(loss)
            engine.step()
            window.add(loss, scores, output, inputs.chosen_logps, inputs.rejected_logps)
            window.add_tokens(tokens)
            done += 1
        state["step"] = step
        step_seconds.append(time.perf_counter() - step_started)
        if step == 1 or step % config.logging_steps == 0 or step == total_steps:
            metrics = window.reduce(device)
            if step == 1 and reference_gap is not None:
                metrics.update(reference_gap)
            state["num_tokens"] += int(metrics.pop("_tokens"))
            if state["skipped_batches"]:
                metrics["skipped_nonfinite_batches"] = state["skipped_batches"]
            metrics.update(
                grad_norm=_grad_norm(engine),
                learning_rate=_learning_rate(engine, scheduler),
                epoch=step * plan["pairs_per_step"] / plan["train_rows"],
                num_tokens=state["num_tokens"],
            )
            tracker.log(metrics, step)
            final_metrics.update(metrics)
            window = MetricWindow()
        is_last = step == total_steps
        if plan["has_eval"] and (is_last or (config.eval_steps and step % config.eval_steps == 0)):
            eval_metrics = evaluate(engine, config, settings, plan["pad_token_id"], device)
            tracker.log(eval_metrics, step)
            final_metrics.update(eval_metrics)
            engine.train()
            window.started = time.perf_counter()
        if config.checkpoint_steps and step % config.checkpoint_steps == 0 and not is_last:
            save_checkpoint(engine, state, {"step": step, **final_metrics}, rank)
        fault_point("train.after_step", rank=rank)

    runtime = time.perf_counter() - started
    final_metrics.update(
        train_runtime=runtime,
        train_steps_per_second=len(step_seconds) / runtime,
        peak_memory_gb=peak_memory_gb(device),
        peak_memory_above_start_gb=peak_memory_gb(device, baseline=memory_at_start),
    )
    memory = ("train_runtime", "peak_memory_gb", "peak_memory_above_start_gb")
    tracker.log({name: final_metrics[name] for name in memory}, total_steps)
    del zero3_loading  # the final save loads the base model on rank 0 alone (LoRA merge): no ZeRO-3 there
    model_path = save_final_model(engine, config, plan, rank)
    ray.train.report({"step": total_steps, **final_metrics})
    if rank == 0:
        return {
            "metrics": final_metrics,
            "model_path": model_path,
            "step_seconds": step_seconds,
            "cpu_allocator": allocator,
            "prefix_sharing": prefix_shared,
        }
    return None


def peak_memory_gb(device: torch.device, baseline: float = 0.0, reduce: bool = True) -> float:
    """The largest peak over the workers: GPU memory allocated by torch, or on CPUs the process's peak
    RSS; minus `baseline` (the peak before the model loaded: the libraries' own footprint on CPUs)."""
    import resource

    import torch.distributed as dist

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    value = torch.tensor([peak - baseline], dtype=torch.float64, device=device)
    if reduce and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def all_finite(loss: torch.Tensor, device) -> bool:
    """Whether the loss is finite on every rank (one tiny all-reduce), so all ranks skip or stop together."""
    import torch.distributed as dist

    flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def handle_nonfinite(loss: torch.Tensor, columns: dict[str, Any], step: int, config, rank: int) -> None:
    """Stop with the step and this rank's pair ids, or (skip_nonfinite_loss) skip the micro-batch."""
    ids = [str(pair_id) for pair_id in columns["pair_id"]]
    where = f"step {step}, worker {rank} (loss {loss.item():.4g}), pairs {ids}"
    if not config.skip_nonfinite_loss:
        raise FloatingPointError(
            f"non-finite loss on some worker at {where}; skip_nonfinite_loss skips such batches"
        )
    logger.warning("skipping a micro-batch with a non-finite loss at %s", where)


def reference_check(inputs: LossInputs, device) -> dict[str, float]:
    """At the first step the policy is the reference: its log-probs must reproduce the cached ones.

    Returns the largest absolute log-ratio over the first micro-batch of every worker, and the largest
    cached value it is relative to. A gap far above float noise means the cache was computed with other
    weights, another dtype or another attention kernel.
    """
    import torch.distributed as dist

    gaps = (
        torch.stack(
            [
                (inputs.chosen_logps - inputs.ref_chosen_logps).abs().max(),
                (inputs.rejected_logps - inputs.ref_rejected_logps).abs().max(),
                inputs.ref_chosen_logps.abs().max(),
                inputs.ref_rejected_logps.abs().max(),
            ]
        )
        .detach()
        .to(device=device, dtype=torch.float64)
    )
    if dist.is_initialized():
        dist.all_reduce(gaps, op=dist.ReduceOp.MAX)
    gap, scale = gaps[:2].max().item(), gaps[2:].max().item()
    return {"ref_check/max_abs_logratio": gap, "ref_check/max_abs_ref_logps": scale}


def enforce_reference_check(check: dict[str, float], config, dropout_on: bool, rank: int) -> None:
    """Stop the run (every rank, with the same message) when step 1 does not reproduce the cache.

    Not enforced when the reference is different on purpose, or when the policy trains with dropout
    (disable_dropout=False): its step-1 log-probs then carry dropout noise, and only a warning says so.
    """
    gap, scale = check["ref_check/max_abs_logratio"], check["ref_check/max_abs_ref_logps"]
    tolerance = REFERENCE_TOLERANCE * max(scale, 1.0)
    if gap <= tolerance or config.reference_is_different:
        return
    found = (
        f"at step 1 the policy's log-probs differ from the cached reference by up to {gap:.4g} "
        f"(tolerance {tolerance:.3g}, largest |reference log-prob| {scale:.4g})"
    )
    if dropout_on:
        if rank == 0:
            logger.warning("%s: the policy trains with dropout (disable_dropout=False)", found)
        return
    raise ReferenceMismatchError(
        f"{found}: the cache was scored by another model or other numerics than this policy "
        "(weights, dtype, attention kernel, model code); precompute again for this policy, or pass "
        "--reference-is-different if that is intended"
    )


class ReferenceMismatchError(RuntimeError):
    """Step 1 of training does not reproduce the cached reference log-probs."""


def _zero3_loading(ds_config: dict[str, Any]):
    """Under ZeRO-3, make `from_pretrained` build the model partitioned (deepspeed.zero.Init), so no worker
    ever holds the whole model; transformers keeps only a weak reference to the returned object."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def load_policy(config, dtype: str) -> torch.nn.Module:
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


def _target_modules(value: list[str] | str) -> list[str] | str:
    if isinstance(value, list) and len(value) == 1 and value[0] == "all-linear":
        return "all-linear"  # peft takes this one as a string, not a module name
    return value


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only, as Hugging Face's Trainer does (biases and norm weights are 1-D)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [
        group for group in groups if group["params"]
    ]  # ZeRO drops empty groups; the scheduler must not see them


def micro_batches(shard, micro_batch_size: int) -> Iterator[dict[str, Any]]:
    """The worker's shard as full micro-batches (the last partial one is dropped, as TRL does)."""
    yield from shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy", drop_last=True)


@torch.no_grad()
def evaluate(engine, config, settings: LossSettings, pad_token_id: int, device) -> dict[str, float]:
    """The loss and metrics over the whole eval split, prefixed `eval_` as TRL's are."""
    import ray.train

    engine.eval()
    window = MetricWindow()
    shard = ray.train.get_dataset_shard("eval")
    for columns in shard.iter_batches(batch_size=config.micro_batch_size, batch_format="numpy"):
        loss, scores, output, inputs, tokens = loss_on_batch(engine, columns, settings, pad_token_id, device)
        window.add(loss, scores, output, inputs.chosen_logps, inputs.rejected_logps)
        window.add_tokens(tokens)
    metrics = window.reduce(device)
    metrics.pop("_tokens")
    metrics["runtime"] = time.perf_counter() - window.started
    metrics.pop("tokens_per_second")
    return {f"eval_{name}": value for name, value in metrics.items()}


def load_checkpoint_file(path: str, map_location=None) -> Any:
    """`torch.load(weights_only=True)` of one DeepSpeed checkpoint file: tensors, containers and the two
    DeepSpeed classes a ZeRO checkpoint holds, never arbitrary pickled objects."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
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


def save_checkpoint(engine, state: dict[str, Any], metrics: dict[str, Any], rank: int) -> None:
    """Every rank saves its ZeRO shard; Ray Train merges the ranks' directories into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raydpo-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state=dict(state))
        fault_point("train.checkpoint_write", rank=rank)  # after the local shard, before Ray Train has it
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint-{state['step']:08d}",
        )


def save_final_model(engine, config, plan: dict[str, Any], rank: int) -> str | None:
    """Gather the sharded weights and write a Hugging Face model directory (rank 0), published atomically."""
    from transformers import AutoTokenizer

    from raydpo.cache import publish_directory

    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state_dict = engine.module.state_dict()
    if rank != 0:
        return None
    policy = engine.module.model
    state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
    with tempfile.TemporaryDirectory(prefix="raydpo-model-") as directory:
        if config.lora_r:
            merge_lora(policy, state_dict, config, Path(directory))
        else:
            restore_saved_config(policy, config.model, config.trust_remote_code)
            policy.save_pretrained(directory, state_dict=state_dict)
        tokenizer = AutoTokenizer.from_pretrained(
            plan["tokenizer"], trust_remote_code=config.trust_remote_code
        )
        tokenizer.save_pretrained(directory)
        publish_directory(directory, plan["model_output"])
    return plan["model_output"]


def merge_lora(peft_model, state_dict: dict[str, torch.Tensor], config, directory: Path) -> None:
    """Save the adapter (DIR/adapter) and the base model with the adapter merged in (DIR)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = directory / "adapter"
    peft_model.save_pretrained(adapter_dir, state_dict=state_dict)
    base = AutoModelForCausalLM.from_pretrained(
        config.model,
        dtype=next(iter(state_dict.values())).dtype,
        trust_remote_code=config.trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(directory)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def _learning_rate(engine, scheduler) -> float:
    if scheduler is not None:
        return float(scheduler.get_last_lr()[0])
    return float(engine.get_lr()[0])
