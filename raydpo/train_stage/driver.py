"""Stage 2: DPO of the policy alone, on cached reference log-probs, under Ray Train and DeepSpeed ZeRO.

The driver checks everything it can before a worker starts (the cache is finished and whole, it was
computed from this policy and tokenizer, its reference values are finite, the data fills every
worker), creates the MLflow run, and hands a seeded, reproducible Ray Data stream to a TorchTrainer
running `loop.train_loop` on each worker. No reference model is loaded anywhere.

    raydpo train --model MODEL --data cache/ --output run/
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raydpo import cache
from raydpo.cluster import init_ray, worker_env
from raydpo.config import TrainConfig, as_dict, coerce
from raydpo.errors import TrainingFailed, one_line
from raydpo.resources import (
    check_cpu_headroom,
    cpu_process_env,
    default_workers,
    probe_gpus,
    warn_unused_gpus,
)
from raydpo.shared_paths import Markers, check_shared_paths, remove_markers
from raydpo.tokenize import load_tokenizer, pad_token_id
from raydpo.tracking import run_page
from raydpo.train_stage import engine
from raydpo.train_stage.checks import check_cache_matches, drop_nonfinite, finite_rows, required_columns
from raydpo.train_stage.ds_config import for_run
from raydpo.train_stage.mlflow_run import record_finished, start_mlflow_run
from raydpo.train_stage.plan import RunPlan, WorkerOutcome, WorkerPlan, plan_run
from raydpo.train_stage.run_dir import (
    MODEL_DIR,
    RunState,
    check_writable,
    checkpoint_layout,
    clear_run,
    read_state,
    rerun_hint,
    run_state,
    storage_name,
    write_state,
)

logger = logging.getLogger(__name__)

# Ray Train redirects a worker's print to a logger that writes to the console, and also prints it where
# Ray has wrapped stdout, which it always has: every progress line would reach the driver twice.
TRAIN_WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass
class TrainResult:
    """The Ray Train result, the MLflow run, the final model and the last metrics of a training run."""

    result: Any  # ray.train.Result
    run_id: str
    tracking_uri: str
    model_path: str
    output: str  # the run directory (a path or URI): run.json, the model, the job's report
    plan: RunPlan
    metrics: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step this run took
    cpu_allocator: str | None = None  # the allocator rank 0 ran with on CPUs: "mimalloc" or "system"
    prefix_sharing: bool | None = None  # whether each pair's prompt went through the policy once

    def summary(self) -> str:
        shown = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies")
        figures = ", ".join(f"{name} {self.metrics[name]:.4f}" for name in shown if name in self.metrics)
        return (
            f"trained {self.plan.total_steps} steps on {self.plan.train_rows} pairs "
            f"({_workers(self.plan.world_size)}): {figures}\n"
            f"model: {self.model_path}\nMLflow run {self.run_id} at {self.tracking_uri}\n"
            f"MLflow UI: {run_page(self.tracking_uri, self.run_id)}"
        )


def _workers(count: int) -> str:
    return f"{count} training worker{'s' if count != 1 else ''}"


def train(config: TrainConfig | dict | None = None, /, **overrides: Any) -> TrainResult:
    """Train the policy on a precompute output. Usable from a notebook after `ray.init()`."""
    config = coerce(TrainConfig, config, overrides)
    output = cache.location(config.output)
    fs, run_dir = cache.resolve(output)
    splits = _open_splits(config)
    tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    reference = check_cache_matches(config, splits, tokenizer)
    columns = required_columns(config)
    counts = {name: finite_rows(split, columns) for name, split in splits.items()}
    if isinstance(fs, pafs.LocalFileSystem):
        cache.make_local_dir(run_dir, "run directory")
    recorded = read_state(fs, run_dir)  # the run already in OUTPUT, if any
    storage_path = config.storage_path or cache.join(output, "checkpoints")
    name = storage_name(config.storage_name, output, recorded, config.resume)  # the run's own directory
    checkpoints = cache.join(storage_path, name)
    check_writable(storage_path)
    engine.check_lora_targets(config)
    # the checks above need no cluster; without --num-workers the count is the cluster's (Ray starts)
    config, workers_reason = _with_workers(config, recorded)
    plan = plan_run(config, counts["train"]["usable"], counts.get("eval", {}).get("usable"))
    ds_config = for_run(config, plan.world_size, plan.total_steps)

    from raydpo.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(config.mlflow_tracking_uri, output)
    layout = checkpoint_layout(config, ds_config)
    state, replace = run_state(config, recorded, splits["train"].manifest.key, layout)
    # Ray starts here at the latest; the markers stay in the outputs for ranks on nodes that join later
    markers = _check_cluster(config, output, storage_path, tracking_uri)
    try:
        runtime_env = worker_env(
            {**TRAIN_WORKER_ENV, **({} if config.use_gpu else cpu_process_env(config.cpu_allocator))}
        )
        run_id = start_mlflow_run(
            config, tracking_uri, run_dir, state, plan, reference, splits, counts, ds_config
        )
        if replace:  # only once every check passed: a refused run leaves the one in OUTPUT as it was
            clear_run(fs, run_dir, checkpoints)
        state.run_id, state.tracking_uri, state.status = run_id, tracking_uri, "running"
        state.config, state.storage_name, state.checkpoints = as_dict(config), name, checkpoints
        write_state(fs, run_dir, state)

        model_output = cache.join(output, MODEL_DIR)  # rank 0 publishes it there
        worker_plan = WorkerPlan(
            run=plan,
            config=config,
            dtype=reference["numerics"]["dtype"],
            deepspeed_config=ds_config,
            tracking_uri=tracking_uri,
            run_id=run_id,
            pad_token_id=pad_token_id(tokenizer),
            tokenizer=config.tokenizer or config.model,
            model_output=model_output,
            has_eval="eval" in splits,
            shared_markers=markers,
        )
        trainer = _trainer(config, worker_plan, splits, columns, (storage_path, name), runtime_env)
        logger.info("%s: %s", _workers(plan.world_size), workers_reason)
        stops = _Stops(fs, run_dir, state)
        result = _fit(trainer, stops, config.max_failures)
        outcome: WorkerOutcome = result.return_value or WorkerOutcome(model_path=model_output)
        if outcome.stopped:  # the workers stopped together, for a reason a restart would meet again
            raise stops.failed(outcome.stopped)
        record_finished(fs, run_dir, state, outcome, model_output, config, plan)
        fields = {**vars(outcome), "model_path": model_output}  # the model, metrics and step times of rank 0
        del fields["stopped"]
        return TrainResult(
            result=result, run_id=run_id, tracking_uri=tracking_uri, output=output, plan=plan, **fields
        )
    finally:
        remove_markers(markers)


@dataclass
class _Stops:
    """How a run that stops is recorded: its status in run.json, the MLflow run (failed or killed, with
    the line as its description), and the line that says how to go on."""

    fs: pafs.FileSystem
    run_dir: str
    state: RunState

    def failed(self, line: str) -> TrainingFailed:
        from raydpo.tracking import record_run_failed

        self._record("failed", record_run_failed, line)
        return TrainingFailed(f"training failed: {line}; {rerun_hint(self.state.checkpoints)}")

    def interrupted(self) -> TrainingFailed:
        from raydpo.tracking import record_run_interrupted

        line = f"training interrupted (Ctrl-C); {rerun_hint(self.state.checkpoints)}"
        self._record("interrupted", record_run_interrupted, line)
        return TrainingFailed(line)

    def _record(self, status: str, record, line: str) -> None:
        self.state.status = status
        write_state(self.fs, self.run_dir, self.state)
        try:
            record(self.state.tracking_uri, self.state.run_id, line)
        except Exception as unrecorded:  # the line matters more than its MLflow record
            logger.warning("the run's end could not be recorded in MLflow: %s", one_line(unrecorded))


def _fit(trainer, stops: _Stops, max_failures: int):
    """`trainer.fit()`, a failure or Ctrl-C recorded as the run's end."""
    from raydpo.train_stage.failures import failed_run

    sigint = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except Exception as error:
        raise stops.failed(failed_run(error, max_failures)) from error
    except (KeyboardInterrupt, SystemExit) as interrupt:  # Ctrl-C: Ray Train's handler exits the process
        raise stops.interrupted() from interrupt
    finally:  # Ray Train leaves its Ctrl-C handler, which aborts a controller that is gone by now
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)


def _with_workers(config: TrainConfig, recorded: RunState | None) -> tuple[TrainConfig, str]:
    """The config with its number of workers, and why: as set, else (resuming the RECORDED run) the count
    the run started with, else `default_workers` of the cluster joined."""
    if config.num_workers is not None:
        return config, "as num_workers sets"
    recorded_workers = recorded.started_with if config.resume and recorded else None
    if recorded_workers is not None:
        workers, reason = recorded_workers, "as the run being resumed started"
    else:
        init_ray(config.ray_address)
        workers, reason = default_workers(config.use_gpu, config.cpus_per_worker)
    return dataclasses.replace(config, num_workers=workers), f"{reason}; --num-workers sets them"


def _check_cluster(config: TrainConfig, output: str, storage_path: str, tracking_uri: str) -> Markers:
    """Join Ray; the workers must fit its CPUs, and every node must see the paths the run writes (the
    markers left in them are returned)."""
    from raydpo.tracking import local_store_dir

    init_ray(config.ray_address)
    if config.use_gpu:
        probe_gpus("a training worker")
    else:
        warn_unused_gpus("training workers", "set --use-gpu")
        check_cpu_headroom(
            config.num_workers, config.cpus_per_worker, "training workers", "lower --cpus-per-worker"
        )
    return check_shared_paths(
        outputs={
            "the output": output,
            "the storage path": storage_path,
            "the MLflow store": local_store_dir(tracking_uri),
        },
        inputs={"the model": config.model, "the data": config.data, "the eval data": config.eval_data},
    )


# ---- checks on the cache -----------------------------------------------------------------------------


def _open_splits(config: TrainConfig) -> dict[str, cache.CacheSplit]:
    splits = {"train": cache.read_output(config.data, "train")}
    if config.eval_data is not None:
        splits["eval"] = cache.read_output(config.eval_data, "eval")
    else:  # DATA/eval, or beside DATA where DATA is OUTPUT/train
        head, _, query = config.data.rstrip("/").partition("?")
        candidate = cache.join(config.data, "eval")
        if head.endswith("/train") and cache.split_state(candidate) != "finished":
            candidate = head.removesuffix("train") + "eval" + (f"?{query}" if query else "")
        if cache.split_state(candidate) == "finished":
            splits["eval"] = cache.open_split(candidate)
    return splits


# ---- the trainer -------------------------------------------------------------------------------------


def _trainer(
    config: TrainConfig,
    plan: WorkerPlan,
    splits,
    columns: list[str],
    storage: tuple[str, str],
    runtime_env: dict[str, Any] | None,
):
    """The TorchTrainer of the run; STORAGE is the storage path and the run's directory name in it."""
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from raydpo.train_stage.failures import FailureRecorder
    from raydpo.train_stage.loop import train_loop

    reference = [name for name in columns if name in cache.REFERENCE_COLUMNS + cache.LD_REFERENCE_COLUMNS]

    def read(split: cache.CacheSplit):
        ds = ray.data.read_parquet(split.files, filesystem=split.filesystem, columns=columns)
        ds = ray.data.Dataset.copy(ds, _deep_copy=True)  # its own Data context, not the process's
        ds.context.enable_progress_bars = False  # the steps' progress line says how far training is
        return ds.map_batches(drop_nonfinite, batch_format="pyarrow", fn_kwargs={"names": reference})

    # the workers split each epoch of it themselves, when they reach it (`epochs.split_epoch`)
    train = read(splits["train"])
    # the eval split is not split: every worker streams it whole and scores its share (`evaluate`)
    datasets = {"eval": read(splits["eval"])} if "eval" in splits else None
    resources = {"CPU": config.cpus_per_worker}
    storage_path, name = storage
    storage_filesystem, storage_root = cache.resolve(storage_path)  # keeps a URI's endpoint settings
    return TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan.to_dict(), "train": train},
        # CPU workers spread over the nodes: each then runs on more cores (`cpu_threads`); GPU workers pack
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker=resources,
            placement_strategy="PACK" if config.use_gpu else "SPREAD",
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_root,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env=runtime_env,
            callbacks=[FailureRecorder(plan.tracking_uri, plan.run_id, config.max_failures)],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
