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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydpo import cache
from raydpo.config import PrecomputeConfig, TrainConfig, as_dict, coerce, from_mapping
from raydpo.errors import RaydpoError

PLOT_NAME = "training_curves.png"
LENGTHS_NAME = "token_lengths.png"
REPORT_NAME = "report.json"
PLOTTED = {
    "loss": "DPO loss",
    "rewards/accuracies": "share of pairs",
    "rewards/margins": "beta x log-ratio gap",
}
LENGTH_SAMPLE_ROWS = 100_000  # pairs read for the length histogram (the first part files)


@dataclass
class JobResult:
    precompute: Any  # PrecomputeResult
    train: Any  # TrainResult
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{key}: {_format(value)}" for key, value in self.report.items() if key != "notes"]
        lines += [f"note: {note}" for note in self.report.get("notes", [])]
        return "\n".join(lines)


# what the train stage takes from the precompute where its own settings are silent: train <- precompute
TRAIN_FROM_PRECOMPUTE = {
    "model": "model",
    "tokenizer": "tokenizer",
    "data": "output",
    "trust_remote_code": "trust_remote_code",
    "attn_implementation": "attn_implementation",
}


def train_defaults(precompute: Mapping[str, Any]) -> dict[str, Any]:
    """What the train stage takes from the precompute's settings (`TRAIN_FROM_PRECOMPUTE`), of those given."""
    return {
        ours: precompute[theirs] for ours, theirs in TRAIN_FROM_PRECOMPUTE.items() if theirs in precompute
    }


def train_config_for(precompute: PrecomputeConfig, values: dict[str, Any] | TrainConfig) -> TrainConfig:
    """The train stage's config: `model`, `tokenizer`, `data`, `trust_remote_code` and
    `attn_implementation` default to the precompute's."""
    defaults = train_defaults(as_dict(precompute))
    return coerce(TrainConfig, defaults, as_dict(values) if isinstance(values, TrainConfig) else values)


JOB_SECTIONS = ("precompute", "train", "smoke")  # of a job config (pipelines/full.py, sweep.py)


def precompute_config(values: dict) -> PrecomputeConfig:
    """A job config's `precompute:` section; with a `smoke:` section, the small local model and bundled data.
    A top-level key that is not a section, or a section that is not a mapping, is an error."""
    for key, section in values.items():
        if key not in JOB_SECTIONS:
            raise RaydpoError(
                f"unknown section {key!r} in the job config: its sections are {', '.join(JOB_SECTIONS)}"
            )
        if section is not None and not isinstance(section, dict):
            raise RaydpoError(f"the job config's {key!r} section must be a mapping of settings")
    smoke = values.get("smoke")
    section = dict(values.get("precompute", {}))
    if smoke:  # build the small local model the smoke run uses
        from raydpo import toy

        if "model" not in section:
            model_dir = Path(smoke["model_dir"]).resolve()
            model = toy.build_toy_model(
                model_dir, hidden_size=smoke.get("hidden_size", 64), num_layers=smoke.get("layers", 2)
            )
            section["model"] = str(model)
        section.setdefault("dataset", str(toy.sample_data_dir() / "dpo_en_demo.json"))
        eval_settings = {"eval_split", "eval_split_ratio", "eval_split_count"}  # an eval split of their own
        if not eval_settings & {key.replace("-", "_") for key in section}:
            section.setdefault("eval_dataset", str(toy.sample_data_dir() / "dpo_zh_demo.json"))
    return from_mapping(PrecomputeConfig, section)


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
    report["lengths_plot"] = cache.join(trained.output, LENGTHS_NAME)
    with tempfile.TemporaryDirectory(prefix="raydpo-report-") as directory:
        plot = plot_curves(trained, train_config, os.path.join(directory, PLOT_NAME))
        lengths = plot_lengths(cached.train, os.path.join(directory, LENGTHS_NAME))
        path = os.path.join(directory, REPORT_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        fs, run_dir = cache.resolve(trained.output)
        for written in (plot, lengths, path):
            with open(written, "rb") as handle:
                cache.write_bytes_atomic(fs, f"{run_dir}/{os.path.basename(written)}", handle.read())
        _log_report(trained, report, [plot, lengths, path])
    return JobResult(precompute=cached, train=trained, report=report)


def build_report(cached, trained) -> dict[str, Any]:
    train_split = cached.train
    stats = train_split.manifest.throughput
    metrics = trained.metrics
    return {
        "pairs_written": train_split.counts.written,
        "pairs_rejected": train_split.counts.rejected,
        "eval_pairs": cached.eval.counts.written if cached.eval else 0,
        "eval_pairs_evaluated": int(metrics.get("eval_pairs", 0)),
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
        "notes": report_notes(cached, metrics),
    }


LENGTH_REJECT = "prompt fills max_length"


def report_notes(cached, metrics: dict[str, float]) -> list[str]:
    """What a user should know to read the figures: rows lost to max_length, an eval at chance."""
    notes = []
    for split in (cached.train, cached.eval):
        if split is None:
            continue
        counts = split.counts
        cut = sum(n for reason, n in counts.reject_reasons.items() if reason.startswith(LENGTH_REJECT))
        if cut:
            max_length = split.manifest.settings.get("max_length")
            notes.append(
                f"{split.name}: {cut} of {counts.read} rows ({cut / counts.read:.0%}) were rejected because "
                f"their prompt alone fills max_length {max_length}; raise --max-length, or set "
                "--max-prompt-length to keep the end of long prompts"
            )
    accuracy = metrics.get("eval_rewards/accuracies")
    if accuracy is not None and accuracy <= 0.5:
        notes.append(
            f"eval reward accuracy {accuracy:.2f} is at or below chance (0.5), and the margin "
            f"{metrics.get('eval_rewards/margins', float('nan')):.3g}: expected for a small or untrained "
            "model, a run of a few steps, or eval data unlike the training data; it is a real measurement"
        )
    return notes


def plot_curves(trained, config: TrainConfig, path: str) -> str:
    """Loss, reward accuracy and reward margin over steps (train, and eval where evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained.tracking_uri)
    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.6))
    for axis, (name, unit) in zip(axes, PLOTTED.items(), strict=True):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            history = sorted(
                (m.step, m.value) for m in client.get_metric_history(trained.run_id, prefix + name)
            )
            if history:
                steps, values = zip(*history, strict=True)
                axis.plot(steps, values, style, label="eval" if prefix else "train")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.set_ylabel(unit)
        axis.legend()
    model = os.path.basename(config.model.rstrip("/"))
    losses = config.loss_type if isinstance(config.loss_type, str) else ",".join(config.loss_type)
    figure.suptitle(f"{model}: {losses} loss, beta={config.beta}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_lengths(result, path: str) -> str:
    """Histograms of the prompt and completion token lengths of a split's pairs (up to
    LENGTH_SAMPLE_ROWS of them), with max_length and max_prompt_length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pyarrow.parquet as pq

    fs, root = cache.resolve(result.path)  # the split was verified when training opened it
    columns = {"prompt_length": [], "chosen_length": [], "rejected_length": []}
    rows = 0
    for name in result.manifest.data_files:
        table = pq.read_table(f"{root}/{name}", filesystem=fs, columns=list(columns))
        for name in columns:
            columns[name].append(table.column(name).to_numpy())
        rows += table.num_rows
        if rows >= LENGTH_SAMPLE_ROWS:
            break
    values = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()}
    settings = result.manifest.settings
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    prompt, completion = axes
    prompt.hist(values["prompt_length"], bins=40, color="tab:blue")
    prompt.set_title("prompt")
    completion.hist(
        [values["chosen_length"], values["rejected_length"]],
        bins=40,
        label=["chosen", "rejected"],
        stacked=False,
    )
    completion.set_title("completion")
    for axis in axes:
        axis.set_xlabel("tokens (after truncation)")
        axis.set_ylabel("pairs")
    marks = [("max_length", settings.get("max_length"), "tab:red")]
    marks.append(("max_prompt_length", settings.get("max_prompt_length"), "tab:orange"))
    for label, value, color in marks:
        if value:
            for axis in axes:
                axis.axvline(value, color=color, linestyle="--", label=f"{label} {value}")
    prompt.legend()
    completion.legend()
    figure.suptitle(f"token lengths of {min(rows, len(values['prompt_length']))} training pairs")
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
