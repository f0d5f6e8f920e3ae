"""The Ray Train worker loop: DeepSpeed ZeRO DPO on the policy alone, against cached reference log-probs.

Each worker reads its equal shard of the precompute output and, step by step, takes `grad_accum`
micro-batches through the policy (`forward`), backward and the optimizer step (`engine`); metric sums
stay on the device and are all-reduced once per logging step, when rank 0 logs them with TRL's names.
DeepSpeed owns backward, the optimizer step, gradient clipping and checkpoints; Ray Train owns the
process group, restarts and checkpoint storage. The loop reads: setup -> resume -> steps (each followed
by log, eval and checkpoint where due) -> final save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from raydpo.config import TrainConfig
from raydpo.faults import fault_point, trace_pairs
from raydpo.losses import LossSettings
from raydpo.numerics import has_dropout
from raydpo.resources import allocator_in_effect, check_gpus_usable, cpu_threads
from raydpo.shared_paths import check_visible
from raydpo.train_stage.checks import AgreedStop, StepChecks
from raydpo.train_stage.engine import (
    grad_norm,
    initialize,
    learning_rate,
    load_checkpoint,
    load_policy,
    save_checkpoint,
    save_final_model,
    zero3_loading,
)
from raydpo.train_stage.epochs import EpochBatches
from raydpo.train_stage.forward import PolicyScorer, decide_prefix_sharing, loss_on_batch
from raydpo.train_stage.metrics import MetricWindow, peak_memory_gb
from raydpo.train_stage.plan import WorkerOutcome, WorkerPlan

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint carries besides the ZeRO state (DeepSpeed's client state)."""

    step: int = 0
    num_tokens: int = 0
    skipped_batches: int = 0
    epoch: int = 0  # the epoch the next micro-batch comes from
    epoch_batches: int = 0  # the micro-batches taken from it so far (skipped ones too)

    @classmethod
    def from_client_state(cls, values: dict[str, Any]) -> TrainState:
        return cls(**{item.name: values.get(item.name, 0) for item in dataclasses.fields(cls)})


@dataclass
class Worker:
    """One worker after setup: its plan, place, engine, checks and logger."""

    plan: WorkerPlan
    settings: LossSettings
    rank: int
    device: torch.device
    engine: Any  # deepspeed.DeepSpeedEngine around a PolicyScorer
    scheduler: Any
    checks: StepChecks
    tracker: Any  # MlflowLogger on rank 0, NullLogger elsewhere
    allocator: str | None  # on CPUs, the allocator in effect
    prefix_sharing: bool
    memory_at_start: float
    zero3_loading: Any  # alive while ZeRO-3 is in use; dropped before the final save
    system_metrics: Any = None  # MLflow's SystemMetricsMonitor, on local rank 0 of each node
    final_metrics: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def config(self) -> TrainConfig:
        return self.plan.config


def train_loop(values: dict[str, Any]) -> WorkerOutcome | None:
    """Entry point of every Ray Train worker (`values`: the plan and the training pairs' Ray Dataset);
    rank 0 returns the outcome."""
    worker = setup(WorkerPlan.from_dict(values["plan"]))
    state, batches = resume(worker, values["train"])
    worker.engine.train()
    started = time.perf_counter()
    window = MetricWindow(worker.device)
    try:
        for step in range(state.step + 1, worker.plan.run.total_steps + 1):
            step_started = time.perf_counter()
            train_step(worker, batches, state, window, step)
            if step % worker.plan.run.steps_per_epoch == 0:
                batches.end_epoch(step // worker.plan.run.steps_per_epoch - 1)
            batches.record(state)
            worker.step_seconds.append(time.perf_counter() - step_started)
            window = after_step(worker, state, window, step)
    except AgreedStop as stop:  # every rank is here: end the run, which a raised error would restart
        if worker.system_metrics is not None:
            worker.system_metrics.finish()
        return WorkerOutcome(model_path="", stopped=str(stop)) if worker.rank == 0 else None
    return finish(worker, time.perf_counter() - started)


# ---- setup and resume --------------------------------------------------------------------------------


def setup(plan: WorkerPlan) -> Worker:
    """The process group, the policy loaded (under ZeRO-3 straight into shards) and the engine."""
    import deepspeed
    import ray.train
    import transformers

    from raydpo.tracking import MlflowLogger, NullLogger

    config = plan.config
    context = ray.train.get_context()
    rank = context.get_world_rank()
    check_visible(plan.shared_markers)  # on a node that joined after the driver's check too
    # DeepSpeed calls torch.distributed APIs torch deprecates, once per collective: known noise
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
    if config.use_gpu:
        check_gpus_usable(f"training worker {rank}")
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        # DeepSpeed's CPU accelerator takes its device count from LOCAL_SIZE, else runs `numactl --hardware`
        # in a subprocess, which ZeRO-3 asks for at every gradient reduction (57 times a step here)
        os.environ.setdefault("LOCAL_SIZE", str(context.get_local_world_size()))
        threads = config.cpu_threads_per_worker
        torch.set_num_threads(threads or cpu_threads(config.cpus_per_worker, context.get_local_world_size()))
    _log_zero_stage(plan, rank)
    transformers.set_seed(config.seed)
    allocator = _cpu_allocator(device, config, rank)
    deepspeed.init_distributed()  # adopts the process group Ray Train created (gloo on CPUs, NCCL on GPUs)
    if device.type == "cpu":
        _unlink_shm_workspace(rank)
    loading = zero3_loading(plan.deepspeed_config)  # alive while the model loads
    memory_at_start = peak_memory_gb(device, reduce=False)
    policy = load_policy(config, plan.dtype)
    # with disable_dropout=False step 1 carries dropout noise (LoRA's own dropout cannot: its B starts at 0)
    dropout_on = not config.disable_dropout and has_dropout(policy)
    scorer = PolicyScorer(policy, config.logits_chunk_tokens)
    engine, scheduler = initialize(scorer, config, plan.deepspeed_config, plan.run.total_steps)
    return Worker(
        plan=plan,
        settings=config.loss_settings(),
        rank=rank,
        device=device,
        engine=engine,
        scheduler=scheduler,
        checks=StepChecks(config, rank, dropout_on, device),
        tracker=MlflowLogger(plan.tracking_uri, plan.run_id) if rank == 0 else NullLogger(),
        allocator=allocator,
        prefix_sharing=decide_prefix_sharing(engine, config.prefix_sharing, rank),
        memory_at_start=memory_at_start,
        zero3_loading=loading,
        system_metrics=_system_metrics(plan),
    )


def _unlink_shm_workspace(rank: int) -> None:
    """Unlink the shared-memory segment DeepSpeed's CPU all-reduce made for this rank, once all have mapped it.

    DeepSpeed never unlinks it: every training run on CPUs left 64 MiB of /dev/shm per worker behind,
    held in RAM until the node restarts. Each rank maps every other rank's segment while DeepSpeed
    initializes, so after a barrier the names are no longer needed; the mappings live on until the
    workers exit, however they exit. Ranks on several nodes make no segment (DeepSpeed uses it only
    when all ranks are local).
    """
    import torch.distributed as dist

    dist.barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


def _log_zero_stage(plan: WorkerPlan, rank: int) -> None:
    stage = plan.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    if rank == 0 and not plan.config.deepspeed_config and stage != plan.config.zero_stage:
        why = []
        if plan.run.world_size == 1 and stage < plan.config.zero_stage:
            why.append("one worker: nothing to partition; same values, no gathers")
        if "data_types" in plan.deepspeed_config:
            why.append("bf16: DeepSpeed's bf16 optimizer, not its stage-0 wrapper")
        elif plan.deepspeed_config.get("fp16", {}).get("enabled") and stage == 1:
            why.append("fp16: ZeRO-1's fp16 optimizer, not DeepSpeed's stage-0 wrapper")
        logger.info("ZeRO stage %d runs as stage %d (%s)", plan.config.zero_stage, stage, "; ".join(why))


def _system_metrics(plan: WorkerPlan):
    """MLflow's system metrics for this worker's node, from its local rank 0; None elsewhere or if off."""
    import ray.train

    context = ray.train.get_context()
    if not plan.config.system_metrics_seconds or context.get_local_rank() != 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        plan.run_id,
        sampling_interval=plan.config.system_metrics_seconds,
        resume_logging=True,  # a restarted worker group continues the steps
        node_id=f"node{context.get_node_rank()}",
        tracking_uri=plan.tracking_uri,
    )
    monitor.start()
    return monitor


def _cpu_allocator(device: torch.device, config: TrainConfig, rank: int) -> str | None:
    return allocator_in_effect(config.cpu_allocator, f"rank {rank}") if device.type == "cpu" else None


def resume(worker: Worker, train) -> tuple[TrainState, EpochBatches]:
    """The state of the latest checkpoint (if any), and the worker's micro-batches after those it used."""
    import ray.train

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # every rank loads rank 0's client state: the ranks take their steps in lockstep
        state = TrainState.from_client_state(load_checkpoint(worker.engine, checkpoint))
        logger.info("rank %d resumed from %s at step %d", worker.rank, checkpoint.path, state.step)
    batches = EpochBatches(
        train, worker.config, worker.plan.run, worker.rank, worker.device, state.epoch, state.epoch_batches
    )
    return state, batches


# ---- a step ------------------------------------------------------------------------------------------


def train_step(
    worker: Worker, batches: EpochBatches, state: TrainState, window: MetricWindow, step: int
) -> None:
    """One optimizer step: `grad_accum` micro-batches with finite losses, each forward and backward."""
    used = 0
    while used < worker.config.grad_accum:
        columns = next(batches, None)
        if columns is None:  # only when skipped batches used up the last epoch's spare pairs
            raise AgreedStop(
                f"the data ran out at step {step}: the skipped non-finite micro-batches ({state.skipped_batches}) "
                f"used up the last epoch's spare pairs; train with --max-steps {step - 1}, or fix the cache"
            )
        forward = loss_on_batch(
            worker.engine, columns, worker.settings, worker.plan.pad_token_id, worker.device
        )
        if not worker.checks.admit(forward.loss, forward.inputs, columns["pair_id"], step):
            state.skipped_batches += 1
            continue  # a replacement micro-batch keeps the accumulation aligned with the steps
        worker.engine.backward(forward.loss)
        trace_pairs(worker.rank, step, batches.epoch, columns["pair_id"])
        used += 1
        if used == worker.config.grad_accum:
            worker.checks.before_update(step)
        worker.engine.step()  # the optimizer steps at the last micro-batch of the step
        window.add(forward)
    state.step = step


def after_step(worker: Worker, state: TrainState, window: MetricWindow, step: int) -> MetricWindow:
    """Log, evaluate and checkpoint where due; returns the window the next step adds to."""
    config, total_steps = worker.config, worker.plan.run.total_steps
    is_last = step == total_steps
    checkpoint_due = bool(config.checkpoint_steps) and step % config.checkpoint_steps == 0 and not is_last
    # a checkpoint step is logged too: a restart from it then loses no step's tokens or loss
    if step == 1 or step % config.logging_steps == 0 or is_last or checkpoint_due:
        worker.final_metrics.update(log_step(worker, state, window, step))
        window = MetricWindow(worker.device)
    if worker.plan.has_eval and (is_last or (config.eval_steps and step % config.eval_steps == 0)):
        eval_metrics = evaluate(worker)
        worker.tracker.log(eval_metrics, step)
        worker.final_metrics.update(eval_metrics)
        worker.engine.train()
        window.started = time.perf_counter()
    if checkpoint_due:
        metrics = {"step": step, **worker.final_metrics}
        save_checkpoint(worker.engine, dataclasses.asdict(state), metrics, worker.rank)
    fault_point("train.after_step", rank=worker.rank)
    return window


def log_step(worker: Worker, state: TrainState, window: MetricWindow, step: int) -> dict[str, float]:
    """The window's metrics over all ranks (the host syncs of the window), logged by rank 0."""
    metrics = window.reduce()
    if step == 1 and worker.checks.reference is not None:
        metrics.update(worker.checks.reference)
    state.num_tokens += int(metrics.pop("_tokens"))
    metrics.pop("_pairs")
    if state.skipped_batches:
        metrics["skipped_nonfinite_batches"] = state.skipped_batches
    metrics.update(
        **grad_norm(worker.engine),
        learning_rate=learning_rate(worker.engine, worker.scheduler),
        epoch=worker.plan.run.epoch_at(step),
        num_tokens=state.num_tokens,
    )
    worker.tracker.log(metrics, step)
    if worker.rank == 0:
        print(progress_line(worker, metrics, step), flush=True)
    return metrics


def progress_line(worker: Worker, metrics: dict[str, float], step: int) -> str:
    """`step 4/8 (50%)  loss 0.6931  accuracy 0.50  12.3 pairs/s  ETA 0:00:40`, from rank 0."""
    total = worker.plan.run.total_steps
    seconds = worker.step_seconds
    eta = (total - step) * sum(seconds) / len(seconds) if seconds else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
    return (
        f"step {step}/{total} ({step / total:.0%})  loss {metrics.get('loss', float('nan')):.4f}  "
        f"accuracy {metrics.get('rewards/accuracies', float('nan')):.2f}  "
        f"{metrics.get('samples_per_second', 0.0):.1f} pairs/s  ETA {eta_text}"
    )


@torch.no_grad()
def evaluate(worker: Worker) -> dict[str, float]:
    """The loss and metrics over the whole eval split, every pair counted once, prefixed `eval_` as
    TRL's are.

    Every worker streams the whole eval split and scores every world_size-th micro-batch of it. Under
    ZeRO-3 each forward is a collective, so a worker left with fewer micro-batches than another (the
    last round, when the count does not divide) scores its first one again and does not count it."""
    import ray.train

    worker.engine.eval()
    window = MetricWindow(worker.device)
    world, rank = worker.plan.run.world_size, worker.rank
    shard = ray.train.get_dataset_shard("eval")
    first, total, scored = None, 0, 0
    for index, columns in enumerate(
        shard.iter_batches(batch_size=worker.config.micro_batch_size, batch_format="numpy")
    ):
        first = columns if first is None else first
        total = index + 1
        if index % world == rank:  # round index // world: TRL's eval batch of every rank's micro-batch
            window.add(forward_batch(worker, columns), index // world)
            scored += 1
    for _ in range(-(-total // world) - scored):  # the rounds other workers still take part in
        forward_batch(worker, first)
    metrics = window.reduce(pair_weighted_loss=True)
    metrics.pop("_tokens")
    metrics["pairs"] = metrics.pop("_pairs")  # every eval pair once: the report checks it
    metrics["runtime"] = time.perf_counter() - window.started
    metrics.pop("tokens_per_second")
    return {f"eval_{name}": value for name, value in metrics.items()}


def forward_batch(worker: Worker, columns: dict[str, Any]):
    return loss_on_batch(worker.engine, columns, worker.settings, worker.plan.pad_token_id, worker.device)


# ---- the end -----------------------------------------------------------------------------------------


def finish(worker: Worker, runtime: float) -> WorkerOutcome | None:
    """Runtime and memory logged, the final model saved (published by rank 0), the last report."""
    import ray.train

    total_steps = worker.plan.run.total_steps
    metrics = worker.final_metrics
    metrics.update(
        train_runtime=runtime,
        train_steps_per_second=len(worker.step_seconds) / runtime,
        peak_memory_gb=peak_memory_gb(worker.device),
        peak_memory_above_start_gb=peak_memory_gb(worker.device, baseline=worker.memory_at_start),
    )
    memory = ("train_runtime", "peak_memory_gb", "peak_memory_above_start_gb")
    worker.tracker.log({name: metrics[name] for name in memory}, total_steps)
    if worker.system_metrics is not None:
        worker.system_metrics.finish()
    worker.zero3_loading = None  # the final save loads the base model on rank 0 alone (LoRA merge)
    model_path = save_final_model(worker.engine, worker.plan, worker.rank)
    ray.train.report({"step": total_steps, **metrics})
    if worker.rank != 0:
        return None
    return WorkerOutcome(
        model_path=model_path,
        metrics=metrics,
        step_seconds=worker.step_seconds,
        cpu_allocator=worker.allocator,
        prefix_sharing=worker.prefix_sharing,
    )
