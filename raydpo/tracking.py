"""Experiment tracking behind a small protocol: MLflow on rank 0, nothing elsewhere.

The driver creates the MLflow run (so its id is known before any worker starts and survives worker
restarts) and logs the settings, the DeepSpeed config and the precompute manifest. Rank 0 then logs
metrics into that run through an `MlflowClient`; no module-level MLflow state is touched.

The default tracking URI is a SQLite file in the run directory, which needs no server on one machine.
On a multi-node cluster rank 0 may run on another node than the driver, so a local store must be on a
filesystem every node shares (the train stage checks that before any work); otherwise point
`--mlflow-tracking-uri` (or MLFLOW_TRACKING_URI) at a tracking server.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from raydpo.errors import RaydpoError, one_line

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
WORKER_FAILURES = "raydpo.worker_failures"  # worker-group failures over every attempt of the run
LAST_FAILURE = "raydpo.last_failure"  # the line of the latest, retried or not
FAILED_NOTE = "**Failed:** "  # the description of a run that failed, until it is resumed
INTERRUPTED_NOTE = "**Interrupted:** "  # of a run stopped by Ctrl-C, until it is resumed


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """What ranks other than 0 log to."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MlflowLogger:
    """Logs metrics into an existing MLflow run.

    Workers restarted from a checkpoint (or a run resumed with --resume) take again the steps the failed
    attempt had taken past that checkpoint, and log them again: a step taken twice has two values in the
    run's history, and the later one (by timestamp, as MLflow orders a step's values) is the saved
    model's. MLflow has no call that removes the earlier one."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.last_time = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        # strictly later than anything this attempt logged, so a step's order by timestamp is its order
        now = self.last_time = max(int(time.time() * 1000), self.last_time + 1)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries, synchronous=True)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def resolve_tracking_uri(configured: str | None, run_dir: str) -> str:
    """--mlflow-tracking-uri, else $MLFLOW_TRACKING_URI, else SQLite in the run directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "://" in run_dir and not run_dir.startswith("file://"):
        raise RaydpoError(
            f"the run directory {run_dir} is not local, so it cannot hold the default SQLite MLflow store; "
            "pass --mlflow-tracking-uri"
        )
    path = Path(run_dir.removeprefix("file://")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def local_store_dir(tracking_uri: str) -> str | None:
    """The local directory a file-based store keeps its data in (SQLite, or MLflow's file store);
    None for a tracking server or a remote store."""
    if tracking_uri.startswith("sqlite:///"):
        return os.path.dirname(tracking_uri.removeprefix("sqlite:///"))
    if tracking_uri.startswith("file://"):
        return tracking_uri.removeprefix("file://")
    return tracking_uri if os.path.isabs(tracking_uri) else None


# MLflow 3's experiment kind: its UI (3.17) shows it in the experiment's header and list
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def run_page(tracking_uri: str, run_id: str) -> str:
    """The run's page in MLflow's UI, in the model-training view, and for a local store the command that
    serves it. MLflow 3.17's UI opens every experiment in its GenAI view (traces, "No data available")
    unless the address names the view: the experiment-kind tag is not consulted."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    served = tracking_uri.startswith(("http://", "https://"))
    base = tracking_uri.rstrip("/") if served else MLFLOW_UI
    page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return page if served else f"{page} (serve it with: mlflow ui --backend-store-uri {tracking_uri})"


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    artifacts: dict[str, Any],
    run_id: str | None = None,
    artifact_root: str | None = None,
    tags: dict[str, Any] | None = None,
    datasets: list[DatasetEntry] | None = None,
) -> str:
    """Create (or, with `run_id`, reopen) the run; log params, tags, the datasets it reads and JSON
    artifacts. Returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(experiment, artifact_location=artifact_root)
        )
        if found is None or EXPERIMENT_KIND not in found.tags:  # a kind the user chose stays
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            _clear_failed_note(client, run_id)
            return run_id
        run = client.create_run(experiment_id, run_name=run_name, tags={"raydpo.stage": "train"})
    except Exception as error:  # connection, permission and schema errors all stop the run here
        raise RaydpoError(f"MLflow tracking at {tracking_uri} is not usable: {one_line(error)}") from None
    run_id = run.info.run_id
    entries = [Param(key, _param_value(value)) for key, value in flatten(params).items()]
    labels = [RunTag(key, _param_value(value)) for key, value in flatten(tags or {}).items()]
    for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=entries[start : start + 100], synchronous=True)
    for start in range(0, len(labels), 100):
        client.log_batch(run_id, tags=labels[start : start + 100], synchronous=True)
    if datasets:
        client.log_inputs(run_id, datasets=[entry.to_mlflow() for entry in datasets])
    with tempfile.TemporaryDirectory() as tmp:
        for name, value in artifacts.items():
            path = Path(tmp) / name
            path.write_text(json.dumps(value, indent=2, default=str))
            client.log_artifact(run_id, str(path))
    return run_id


def record_worker_failure(tracking_uri: str, run_id: str, line: str) -> int:
    """Count a worker-group failure on the run (`raydpo.worker_failures`, over every attempt of it) and
    keep its line (`raydpo.last_failure`); returns the count."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    count = int(client.get_run(run_id).data.tags.get(WORKER_FAILURES, "0")) + 1
    client.set_tag(run_id, WORKER_FAILURES, str(count))
    client.set_tag(run_id, LAST_FAILURE, line)
    return count


def record_run_failed(tracking_uri: str, run_id: str, line: str) -> None:
    """Mark the run FAILED with the line that says why, as its description (the top of its page in the
    UI, until a `--resume` reopens it) and as `raydpo.last_failure`."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, LAST_FAILURE, line)
    client.set_tag(run_id, MLFLOW_RUN_NOTE, f"{FAILED_NOTE}{line}")
    client.set_terminated(run_id, status="FAILED")


def record_run_interrupted(tracking_uri: str, run_id: str, line: str) -> None:
    """Mark a run its user stopped KILLED (MLflow's status for it), with `line` as its description until
    a `--resume` reopens it."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, MLFLOW_RUN_NOTE, f"{INTERRUPTED_NOTE}{line}")
    client.set_terminated(run_id, status="KILLED")


def _clear_failed_note(client, run_id: str) -> None:
    """A resumed run's description no longer says it failed or was interrupted (`raydpo.last_failure`
    keeps a failure's line)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    if client.get_run(run_id).data.tags.get(MLFLOW_RUN_NOTE, "").startswith((FAILED_NOTE, INTERRUPTED_NOTE)):
        client.delete_tag(run_id, MLFLOW_RUN_NOTE)


def log_external_model(
    tracking_uri: str, run_id: str, name: str, path: str, step: int, params: dict[str, Any]
) -> str:
    """Register the final model in the run's "Logged models" as an external model: MLflow records
    where it is (`raydpo.model_path`) without copying its weights. Returns the model id.

    Load it with `transformers.AutoModelForCausalLM.from_pretrained(<raydpo.model_path tag>)`."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=run_id,
        tags={MLFLOW_MODEL_IS_EXTERNAL: "true", "raydpo.model_path": path},
        params={key: _param_value(value) for key, value in params.items()},
        model_type="transformers",
    )
    with tempfile.TemporaryDirectory() as tmp:  # the MLmodel stub that lets the registry take it
        get_external_mlflow_model_spec(model).save(os.path.join(tmp, MLMODEL_FILE_NAME))
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset a run reads, as MLflow's Datasets panel shows it: a precompute split, its digest (the
    cache key) and its counts as the profile."""

    name: str  # e.g. "cache/train"
    digest: str  # the cache key
    source: str  # the split's path or URI
    context: str  # "training" or "eval", MLflow's dataset context tag
    profile: dict[str, Any]
    columns: list[str]

    def to_mlflow(self):
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(
            name=self.name,
            digest=self.digest[:32],  # MLflow stores at most 36 characters; the full key is in the profile
            source_type="s3" if self.source.startswith("s3://") else "local",
            source=json.dumps({"uri": self.source}),
            schema=json.dumps({"columns": self.columns}),
            profile=json.dumps(self.profile, default=str),
        )
        return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, self.context)])


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
