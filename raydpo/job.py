"""Both stages as one job, and its final report: precompute (or reuse) the cache, train, summarise.

The report gives the rows and tokens of the cache, the precompute and training throughput, the final
eval reward accuracy and margin and the model path; it is printed, written as `report.json` and a
plot of loss, reward accuracy and margins beside the model (in the run output, local or on object
storage), and logged to the run's MLflow run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from raydpo import cache
from raydpo.config import PrecomputeConfig, TrainConfig, as_dict, coerce

PLOT_NAME = "training_curves.png"
REPORT_NAME = "report.json"
PLOTTED = ("loss", "rewards/accuracies", "rewards/margins")


@dataclass
class JobResult:
    precompute: Any  # PrecomputeResult
    train: Any  # TrainResult
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{key}: {_format(value)}" for key, value in self.report.items()]
        return "\n".join(lines)


def train_config_for(precompute: PrecomputeConfig, values: dict[str, Any] | TrainConfig) -> TrainConfig:
    """The train stage's config: `model`, `data`, `trust_remote_code` and `attn_implementation` default
    to the precompute's."""
    defaults = {
        "model": precompute.model,
        "data": precompute.output,
        "trust_remote_code": precompute.trust_remote_code,
        "attn_implementation": precompute.attn_implementation,
    }
    return coerce(TrainConfig, defaults, as_dict(values) if isinstance(values, TrainConfig) else values)


def run(
    precompute: PrecomputeConfig | dict,
    train: TrainConfig | dict | None = None,
    *,
    dataset=None,
    eval_dataset=None,
) -> JobResult:
    """Precompute (a no-op when the cache matches), train on it, and report. Usable from a notebook."""
    from raydpo import precompute_stage, train_stage

    pre_config = coerce(PrecomputeConfig, precompute)
    train_config = train_config_for(pre_config, train or {})  # validated before any work starts
    cached = precompute_stage.precompute(pre_config, dataset=dataset, eval_dataset=eval_dataset)
    trained = train_stage.train(train_config)
    report = build_report(cached, trained)
    report["plot"] = cache.join(trained.output, PLOT_NAME)
    with tempfile.TemporaryDirectory(prefix="raydpo-report-") as directory:
        plot = plot_curves(trained, os.path.join(directory, PLOT_NAME))
        path = os.path.join(directory, REPORT_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        fs, run_dir = cache.resolve(trained.output)
        for written in (plot, path):
            with open(written, "rb") as handle:
                cache.write_bytes_atomic(fs, f"{run_dir}/{os.path.basename(written)}", handle.read())
        _log_report(trained, report, [plot, path])
    return JobResult(precompute=cached, train=trained, report=report)


def build_report(cached, trained) -> dict[str, Any]:
    train_split = cached.train
    stats = train_split.manifest.throughput
    metrics = trained.metrics
    return {
        "pairs_written": train_split.counts.written,
        "pairs_rejected": train_split.counts.rejected,
        "eval_pairs": cached.eval.counts.written if cached.eval else 0,
        "cache_tokens": stats.tokens,
        "precompute_reused": train_split.cached,
        "precompute_pairs_per_second": stats.pairs_per_s,
        "precompute_tokens_per_second": stats.tokens_per_s,
        "train_steps": trained.plan.total_steps,
        "train_samples_per_second": metrics.get("samples_per_second"),
        "train_tokens_per_second": metrics.get("tokens_per_second"),
        "train_runtime_s": metrics.get("train_runtime"),
        "final_loss": metrics.get("loss"),
        "final_eval_rewards/accuracies": metrics.get("eval_rewards/accuracies"),
        "final_eval_rewards/margins": metrics.get("eval_rewards/margins"),
        "model_path": trained.model_path,
        "mlflow_run_id": trained.run_id,
    }


def plot_curves(trained, path: str) -> str:
    """Loss, reward accuracy and reward margin over steps (train, and eval where evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained.tracking_uri)
    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.2))
    for axis, name in zip(axes, PLOTTED, strict=True):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            history = sorted(
                (m.step, m.value) for m in client.get_metric_history(trained.run_id, prefix + name)
            )
            if history:
                steps, values = zip(*history, strict=True)
                axis.plot(steps, values, style, label="eval" if prefix else "train")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _log_report(trained, report: dict[str, Any], files: list[str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=trained.tracking_uri)
    numbers = {
        f"report/{key}": float(value)
        for key, value in report.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    step = trained.plan.total_steps
    now = int(time.time() * 1000)
    client.log_batch(
        trained.run_id, metrics=[Metric(key, value, now, step) for key, value in numbers.items()]
    )
    for path in files:
        client.log_artifact(trained.run_id, path)


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
