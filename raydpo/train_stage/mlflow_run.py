"""The training run's MLflow run: started (or reopened) by the driver with the settings as params, the
inputs' identity as tags and datasets, the DeepSpeed config and manifests as artifacts; marked finished
with the final model among its logged models.
"""

from __future__ import annotations

import os
import re
from typing import Any

from raydpo import cache
from raydpo.config import TrainConfig, as_dict
from raydpo.errors import TrainingFailed
from raydpo.train_stage.plan import RunPlan, WorkerOutcome
from raydpo.train_stage.run_dir import RunState, write_state


def record_finished(
    fs, run_dir: str, state: RunState, outcome: WorkerOutcome, model_output: str, config, plan
):
    """Mark the run finished in MLflow (the model among its logged models) and in run.json, once the
    model is published whole."""
    from mlflow import MlflowClient

    from raydpo.tracking import log_external_model

    if not cache.published(model_output):
        raise TrainingFailed(f"training ended without a complete model in {model_output}")
    client = MlflowClient(tracking_uri=state.tracking_uri)
    params = {"base_model": config.model, "loss_type": config.loss_type, "beta": config.beta}
    name = re.sub(r"[^\w-]+", "-", config.run_name or default_run_name(config)).strip("-") or "model"
    model_id = log_external_model(
        state.tracking_uri, state.run_id, name, model_output, plan.total_steps, params
    )
    client.set_tag(state.run_id, "raydpo.model_id", model_id)
    client.set_tag(state.run_id, "raydpo.model_path", model_output)
    client.set_tag(state.run_id, "raydpo.prefix_sharing", str(outcome.prefix_sharing).lower())
    client.set_terminated(state.run_id, "FINISHED")
    state.status, state.model_path = "finished", model_output
    write_state(fs, run_dir, state)


def default_run_name(config) -> str:
    """What tells runs apart in MLflow's run list: the model's name, the loss and beta."""
    losses = [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)
    model = config.model.rstrip("/").rsplit("/", 1)[-1] or config.model
    return f"{model} {'+'.join(losses)} beta={config.beta:g}"


def start_mlflow_run(config, tracking_uri, run_dir, state, plan, reference, splits, counts, ds_config) -> str:
    """Start (or, resuming, reopen) the run's MLflow run with its params, DeepSpeed config and manifests."""
    from raydpo.tracking import start_run

    manifests = {name: split.manifest for name, split in splits.items()}
    return start_run(
        tracking_uri,
        config.experiment,
        run_name=config.run_name or default_run_name(config),
        params=_run_params(config, plan),
        tags=_run_tags(reference, manifests, counts),
        datasets=[_dataset_entry(name, splits[name], counts[name]) for name in splits],
        artifacts={
            "deepspeed_config.json": ds_config,
            **{f"manifest_{name}.json": m.to_dict() for name, m in manifests.items()},
        },
        run_id=state.run_id,
        artifact_root=_artifact_root(tracking_uri),
    )


def _run_params(config, plan: RunPlan) -> dict[str, Any]:
    """The MLflow params: the settings under their own names (beta, learning_rate, ... as the UI lists
    them), then the plan's figures. What identifies the inputs goes to tags and datasets."""
    plan_values = {f"plan.{name}": value for name, value in plan.to_dict().items()}
    return {**_loggable_settings(config), **plan_values}


def _run_tags(reference, manifests, counts) -> dict[str, Any]:
    """The inputs' identity as a few tags, short enough to read in the run's Overview: the reference
    model and its numerics, each cache's key, path and rows. The fingerprints and settings behind the
    keys are in the manifest_<split>.json artifacts."""
    return {
        "raydpo.reference": {key: reference[key] for key in ("model", "same_as_policy", "numerics")},
        "raydpo.cache": {name: _manifest_params(m, counts[name]) for name, m in manifests.items()},
    }


def _dataset_entry(name: str, split: cache.CacheSplit, counts: dict[str, int]):
    from raydpo.tracking import DatasetEntry

    manifest = split.manifest
    return DatasetEntry(
        name=f"raydpo-cache/{name}",
        digest=manifest.key,
        source=split.path,
        context="training" if name == "train" else "eval",
        profile={
            "key": manifest.key,
            "pairs": counts["rows"],
            "usable_pairs": counts["usable"],
            "rows_read": manifest.counts.read,
            "rows_rejected": manifest.counts.rejected,
            "tokens": manifest.throughput.tokens,
            "model": manifest.model,
            "source": manifest.source,
        },
        columns=list(manifest.schema),
    )


def _artifact_root(tracking_uri: str) -> str | None:
    """Beside a SQLite store, artifacts go to mlflow-artifacts/ next to the database file."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server or other store decides
    return os.path.join(os.path.dirname(tracking_uri.removeprefix("sqlite:///")), "mlflow-artifacts")


def _loggable_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings as MLflow params; the tracking URI is left out (it may carry credentials)."""
    values = as_dict(config)
    values.pop("mlflow_tracking_uri")
    return values


def _manifest_params(manifest: cache.Manifest, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "key": manifest.key,
        "path": manifest.source,
        "rows": counts["rows"],
        "nonfinite_reference": counts["nonfinite_reference"],
    }
