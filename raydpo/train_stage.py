"""Stage 2: DPO of the policy alone, on cached reference log-probs, under Ray Train and DeepSpeed ZeRO.

The driver checks everything it can before a worker starts (the cache is finished and whole, it was
computed from this policy and tokenizer, its reference values are finite, the data fills every
worker), creates the MLflow run, and hands a seeded, reproducible Ray Data stream to a TorchTrainer
running `train_worker.train_loop` on each worker. No reference model is loaded anywhere.

    raydpo train --model MODEL --data cache/ --output run/
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydpo import cache, deepspeed_config
from raydpo.cluster import (
    check_cpu_headroom,
    check_shared_paths,
    cpu_allocator_env,
    init_ray,
    worker_env,
)
from raydpo.config import TrainConfig, as_dict, coerce
from raydpo.errors import RaydpoError, TrainingFailed, one_line
from raydpo.numerics import check_cache_numerics, resolve_numerics
from raydpo.tokenize import load_tokenizer, pad_token_id, tokenizer_fingerprint

logger = logging.getLogger(__name__)

RUN_STATE = "run.json"
MODEL_DIR = "model"
RUN_NAME = "raydpo"  # the Ray Train run name inside the storage path; fixed so a rerun can resume it
TOKEN_COLUMNS = ["pair_id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]


@dataclass
class TrainResult:
    """The Ray Train result, the MLflow run, the final model and the last metrics of a training run."""

    result: Any  # ray.train.Result
    run_id: str
    tracking_uri: str
    model_path: str
    output: str  # the run directory (a path or URI): run.json, the model, the job's report
    metrics: dict[str, float] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step this run took
    cpu_allocator: str | None = None  # the allocator rank 0 ran with on CPUs: "mimalloc" or "system"
    prefix_sharing: bool | None = None  # whether each pair's prompt went through the policy once

    def summary(self) -> str:
        shown = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies")
        figures = ", ".join(f"{name} {self.metrics[name]:.4f}" for name in shown if name in self.metrics)
        return (
            f"trained {self.plan.get('total_steps')} steps on {self.plan.get('train_rows')} pairs "
            f"({self.plan.get('world_size')} workers): {figures}\n"
            f"model: {self.model_path}\nMLflow run {self.run_id} at {self.tracking_uri}"
        )


def train(config: TrainConfig | dict | None = None, /, **overrides: Any) -> TrainResult:
    """Train the policy on a precompute output. Usable from a notebook after `ray.init()`."""
    config = coerce(TrainConfig, config, overrides)
    output = cache.location(config.output)
    fs, run_dir = cache.resolve(output)
    splits = _open_splits(config)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    reference = check_cache_matches(config, splits, tokenizer)
    columns = required_columns(config)
    counts = {name: finite_rows(split, columns) for name, split in splits.items()}
    plan = plan_run(config, counts["train"]["usable"], counts.get("eval", {}).get("usable"))

    from raydpo.tracking import MlflowLogger, local_store_dir, resolve_tracking_uri, start_run

    tracking_uri = resolve_tracking_uri(config.mlflow_tracking_uri, output)
    storage_path = config.storage_path or cache.join(output, "checkpoints")
    state = _prepare_run_dir(config, fs, run_dir, storage_path, splits["train"].manifest.key)
    init_ray(config.ray_address)
    if not config.use_gpu:
        check_cpu_headroom(
            config.num_workers, config.cpus_per_worker, "training workers", "lower --cpus-per-worker"
        )

    check_shared_paths(
        outputs={
            "the output": output,
            "the storage path": storage_path,
            "the MLflow store": local_store_dir(tracking_uri),
        },
        inputs={"the model": config.model, "the data": config.data, "the eval data": config.eval_data},
    )
    runtime_env = worker_env(None if config.use_gpu else cpu_allocator_env(config.cpu_allocator))
    ds_config = deepspeed_config.for_run(config, plan["world_size"], plan["total_steps"])
    manifests = {name: split.manifest for name, split in splits.items()}
    run_id = start_run(
        tracking_uri,
        config.experiment,
        run_name=os.path.basename(run_dir),
        params={
            "train": _loggable_settings(config),
            "run": {**plan, "reference": reference},
            "cache": {name: _manifest_params(m, counts[name]) for name, m in manifests.items()},
        },
        artifacts={
            "deepspeed_config.json": ds_config,
            **{f"manifest_{name}.json": m.to_dict() for name, m in manifests.items()},
        },
        run_id=state.get("run_id"),
        artifact_root=_artifact_root(tracking_uri),
    )
    state.update(run_id=run_id, tracking_uri=tracking_uri, status="running", config=as_dict(config))
    _write_state(fs, run_dir, state)

    model_output = cache.join(output, MODEL_DIR)  # rank 0 publishes it there
    worker_plan = {
        **plan,
        "config": as_dict(config),
        "dtype": reference["numerics"]["dtype"],
        "deepspeed_config": ds_config,
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "pad_token_id": pad_token_id(tokenizer),
        "tokenizer": config.model,
        "model_output": model_output,
        "has_eval": "eval" in splits,
    }
    trainer = _trainer(config, worker_plan, splits, columns, storage_path, runtime_env)
    try:
        result = trainer.fit()
    except Exception as error:
        state["status"] = "failed"
        _write_state(fs, run_dir, state)
        MlflowLogger(tracking_uri, run_id).close("FAILED")
        raise TrainingFailed(
            f"training failed: {one_line(error, limit=1000)}; rerun with --resume to continue from "
            f"the latest checkpoint in {cache.join(storage_path, RUN_NAME)}"
        ) from error
    outcome = result.return_value or {}
    if not cache.published(model_output):
        raise TrainingFailed(f"training ended without a complete model in {model_output}")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, "raydpo.model_path", model_output)
    client.set_tag(run_id, "raydpo.prefix_sharing", str(outcome.get("prefix_sharing")).lower())
    client.set_terminated(run_id, "FINISHED")
    state["status"] = "finished"
    state["model_path"] = model_output
    _write_state(fs, run_dir, state)
    return TrainResult(
        result=result,
        run_id=run_id,
        tracking_uri=tracking_uri,
        model_path=model_output,
        output=output,
        metrics=outcome.get("metrics", {}),
        plan=plan,
        step_seconds=outcome.get("step_seconds", []),
        cpu_allocator=outcome.get("cpu_allocator"),
        prefix_sharing=outcome.get("prefix_sharing"),
    )


def _artifact_root(tracking_uri: str) -> str | None:
    """Beside a SQLite store, artifacts go to mlflow-artifacts/ next to the database file."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server or other store decides
    return os.path.join(os.path.dirname(tracking_uri.removeprefix("sqlite:///")), "mlflow-artifacts")


# ---- checks on the cache -----------------------------------------------------------------------------


def _open_splits(config: TrainConfig) -> dict[str, cache.CacheSplit]:
    splits = {"train": cache.read_output(config.data, "train")}
    if config.eval_data is not None:
        splits["eval"] = cache.read_output(config.eval_data, "eval")
    else:
        candidate = cache.join(config.data, "eval")
        if cache.split_state(candidate) == "finished":
            splits["eval"] = cache.open_split(candidate)
    return splits


def check_cache_matches(
    config: TrainConfig, splits: dict[str, cache.CacheSplit], tokenizer
) -> dict[str, Any]:
    """The cached reference must come from this policy (unless said otherwise) and this tokenizer."""
    train_manifest = splits["train"].manifest
    for name, split in splits.items():
        manifest = split.manifest
        for what in ("model", "tokenizer"):
            if getattr(manifest.fingerprints, what) != getattr(train_manifest.fingerprints, what):
                raise RaydpoError(
                    f"the {name} split was precomputed with a different {what} than the train split"
                )
        if manifest.settings != train_manifest.settings:
            raise RaydpoError(
                f"the {name} split was tokenized with other settings than the train split: "
                f"{manifest.settings} vs {train_manifest.settings}"
            )
    if tokenizer_fingerprint(tokenizer) != train_manifest.fingerprints.tokenizer:
        raise RaydpoError(
            f"the tokenizer of {config.model} is not the one {splits['train'].path} was tokenized with "
            f"({train_manifest.tokenizer}); precompute again with this model's tokenizer"
        )
    policy = cache.model_fingerprint(config.model)
    same = policy == train_manifest.fingerprints.model
    if not same and not config.reference_is_different:
        raise RaydpoError(
            f"the reference log-probs in {splits['train'].path} were computed with {train_manifest.model}, "
            f"whose weights differ from {config.model}; pass --reference-is-different if that is intended"
        )
    numerics = resolve_numerics(
        config.model, config.dtype, config.attn_implementation, config.trust_remote_code, config.use_gpu
    )
    if not config.reference_is_different:
        note = check_cache_numerics(train_manifest.settings, **numerics)
        if note:
            logger.info("%s", note)
    return {
        "model": train_manifest.model,
        "same_as_policy": same,
        "fingerprint": train_manifest.fingerprints.model,
        "numerics": numerics,
    }


def required_columns(config: TrainConfig) -> list[str]:
    settings = config.loss_settings()
    if settings.ld_alpha is not None:
        reference = [
            f"ref_{side}_logps_{part}" for side in ("chosen", "rejected") for part in ("shared", "tail")
        ]
    else:
        reference = list(cache.REFERENCE_COLUMNS)
    return TOKEN_COLUMNS + reference


def finite_rows(split: cache.CacheSplit, columns: list[str]) -> dict[str, int]:
    """Check the schema and count the rows whose reference values are all finite (the others are skipped)."""
    schema = pq.read_schema(split.files[0], filesystem=split.filesystem) if split.files else None
    missing = [name for name in columns if schema is None or name not in schema.names]
    if missing:
        raise RaydpoError(f"{split.path} lacks the columns {missing}: not a usable precompute output")
    reference = [name for name in columns if name.startswith("ref_")]
    rows = usable = 0
    for path in split.files:
        table = pq.read_table(path, filesystem=split.filesystem, columns=reference)
        rows += table.num_rows
        usable += int(pc.sum(_finite_mask(table, reference)).as_py() or 0)
    return {"rows": rows, "usable": usable, "nonfinite_reference": rows - usable}


def _finite_mask(table: pa.Table, names: list[str]) -> pa.ChunkedArray:
    mask = None
    for name in names:
        finite = pc.fill_null(pc.is_finite(table.column(name)), False)
        mask = finite if mask is None else pc.and_(mask, finite)
    return mask


def drop_nonfinite(batch: pa.Table, names: list[str]) -> pa.Table:
    """Ray Data transform: keep the rows whose reference values are finite."""
    return batch.filter(_finite_mask(batch, names))


# ---- the plan: steps, epochs and the data each worker sees -------------------------------------------


def plan_run(config: TrainConfig, train_rows: int, eval_rows: int | None) -> dict[str, Any]:
    """How many steps the run takes and how many epochs of shuffled data it streams.

    The stream is `epochs` seeded shuffles of the pairs, one after another, split equally between the
    workers (Ray Data's equal split drops at most world_size - 1 rows).
    """
    world = config.num_workers
    pairs_per_step = world * config.micro_batch_size * config.grad_accum
    if train_rows == 0:
        raise RaydpoError("no training pairs with finite reference log-probs")
    if train_rows < pairs_per_step:
        raise RaydpoError(
            f"{train_rows} training pairs cannot fill one step of {world} workers x micro batch "
            f"{config.micro_batch_size} x {config.grad_accum} accumulation = {pairs_per_step} pairs; "
            "use fewer workers or a smaller batch"
        )
    if eval_rows is not None and eval_rows < world:
        raise RaydpoError(f"the eval split has {eval_rows} usable pairs, fewer than the {world} workers")
    per_epoch = (train_rows // world) // (config.micro_batch_size * config.grad_accum)
    if config.max_steps is not None:
        epochs = math.ceil(config.max_steps * pairs_per_step / train_rows)
        while (epochs * train_rows // world) // (
            config.micro_batch_size * config.grad_accum
        ) < config.max_steps:
            epochs += 1
        total_steps = config.max_steps
    else:
        epochs = config.epochs
        total_steps = (epochs * train_rows // world) // (config.micro_batch_size * config.grad_accum)
    return {
        "world_size": world,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "pairs_per_step": pairs_per_step,
        "steps_per_epoch": per_epoch,
        "total_steps": total_steps,
        "epochs_streamed": epochs,
    }


# ---- the run directory -------------------------------------------------------------------------------


def _prepare_run_dir(
    config: TrainConfig, fs: pafs.FileSystem, run_dir: str, storage_path: str, data_key: str
) -> dict[str, Any]:
    """Start, resume or (with overwrite) replace the run in OUTPUT; refuse to mix runs."""
    state = cache.read_json(fs, f"{run_dir}/{RUN_STATE}")
    if state is None:
        if config.resume:
            raise RaydpoError(f"--resume: {config.output} holds no run to resume")
        _clear_checkpoints(storage_path)
        fs.create_dir(run_dir, recursive=True)
        return {"data_key": data_key}
    if config.overwrite:
        _clear_checkpoints(storage_path)
        model = f"{run_dir}/{MODEL_DIR}"
        if fs.get_file_info(model).type == pafs.FileType.Directory:
            fs.delete_dir(model)
        return {"data_key": data_key}
    if state.get("status") == "finished":
        raise RaydpoError(f"{config.output} holds a finished run; pass --overwrite to train again there")
    if not config.resume:
        raise RaydpoError(
            f"{config.output} holds an interrupted run; pass --resume to continue it or --overwrite to start over"
        )
    if state.get("data_key") != data_key:
        raise RaydpoError("--resume: the precompute output changed since the run started; it cannot continue")
    return state


def _clear_checkpoints(storage_path: str) -> None:
    fs, root = cache.resolve(storage_path)
    target = f"{root}/{RUN_NAME}"
    if fs.get_file_info(target).type == pafs.FileType.Directory:
        if isinstance(fs, pafs.LocalFileSystem):
            shutil.rmtree(target)
        else:
            fs.delete_dir(target)


def _write_state(fs: pafs.FileSystem, run_dir: str, state: dict[str, Any]) -> None:
    cache.write_bytes_atomic(fs, f"{run_dir}/{RUN_STATE}", json.dumps(state, indent=2, default=str).encode())


def _loggable_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings as MLflow params; the tracking URI is left out (it may carry credentials)."""
    values = as_dict(config)
    values.pop("mlflow_tracking_uri")
    return values


def _manifest_params(manifest: cache.Manifest, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "key": manifest.key,
        "path": manifest.source,
        "model": manifest.model,
        "fingerprints": {"model": manifest.fingerprints.model, "tokenizer": manifest.fingerprints.tokenizer},
        "settings": manifest.settings,
        "rows": counts["rows"],
        "nonfinite_reference": counts["nonfinite_reference"],
    }


# ---- the trainer -------------------------------------------------------------------------------------


def _trainer(
    config: TrainConfig,
    plan: dict[str, Any],
    splits,
    columns: list[str],
    storage_path: str,
    runtime_env: dict[str, Any] | None,
):
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from raydpo.train_worker import train_loop

    reference = [name for name in columns if name.startswith("ref_")]

    def read(split: cache.CacheSplit):
        ds = ray.data.read_parquet(split.files, filesystem=split.filesystem, columns=columns)
        return ds.map_batches(drop_nonfinite, batch_format="pyarrow", fn_kwargs={"names": reference})

    train = read(splits["train"])
    epochs = [train.random_shuffle(seed=config.seed + epoch) for epoch in range(plan["epochs_streamed"])]
    datasets = {"train": epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]}
    if "eval" in splits:
        datasets["eval"] = read(splits["eval"])
    resources = {"CPU": config.cpus_per_worker}
    storage_filesystem, storage_root = cache.resolve(storage_path)  # keeps a URI's endpoint settings
    return TorchTrainer(
        train_loop,
        train_loop_config=plan,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=storage_root,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env=runtime_env,
        ),
        datasets=datasets,
        # preserve_order makes the split between workers deterministic: a restarted run sees the same pairs
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
