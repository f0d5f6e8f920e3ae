"""The training stage end to end: two gloo workers under Ray Train, real DeepSpeed ZeRO-3, real MLflow."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import free_port, inject, kill_when_fired, run_cli
from mlflow import MlflowClient

import raydpo
from raydpo import cache
from raydpo.errors import RaydpoError, TrainingFailed
from raydpo.faults import fired
from raydpo.precompute_stage.sink import part_metadata
from raydpo.train_stage.failures import describe
from raydpo.train_stage.run_dir import default_storage_name

NONFINITE_ROWS = 2
STEPS = 6


def run_settings(toy_model, cache_dir, output, **overrides):
    """A short ZeRO-3 run: 2 workers x micro batch 2, 6 steps, a checkpoint at step 3.

    The LM head runs in chunks of 97 tokens, so the ranks score different numbers of chunks per step:
    the head must still make one ZeRO-3 gather per forward on every rank."""
    return {
        "model": str(toy_model),
        "data": str(cache_dir),
        "output": str(output),
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "micro_batch_size": 2,
        "max_steps": STEPS,
        "logging_steps": 1,
        "eval_steps": 3,
        "checkpoint_steps": 3,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.2,
        "max_failures": 0,
        "logits_chunk_tokens": 97,
        "system_metrics_seconds": 1,
        **overrides,
    }


@pytest.fixture(scope="module")
def train_cache(ray_session, toy_model, sample_dir, tmp_path_factory):
    """A precompute output of English sample pairs (eval: Chinese ones), two rows with NaN/inf reference."""
    output = tmp_path_factory.mktemp("train-cache") / "cache"
    precompute_english(toy_model, output, eval_dataset=str(sample_dir / "dpo_zh_demo.json"))
    return with_nonfinite_rows(output)


def precompute_english(model: Path, output: Path, **overrides) -> None:
    """Precompute the first 48 English sample pairs (to 256 tokens), as the training tests train on."""
    from raydpo.toy import sample_data_dir

    settings = {"dataset": str(sample_data_dir() / "dpo_en_demo.json"), "limit": 48, "max_length": 256}
    raydpo.precompute(model=str(model), output=str(output), **{**settings, **overrides})


def with_nonfinite_rows(output: Path) -> Path:
    """Set the reference values of the first rows of the first part file to NaN and -inf."""
    part = sorted((output / "train" / "data").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    values = table.column("ref_chosen_logps").to_numpy().copy()
    values[:NONFINITE_ROWS] = [np.nan, -np.inf]
    table = table.set_column(
        table.schema.get_field_index("ref_chosen_logps"), "ref_chosen_logps", pa.array(values, pa.float32())
    )
    key = pq.read_metadata(part).metadata[cache.KEY_METADATA].decode()
    # as the precompute writes a file whose reference values are not finite: same rows (the manifest
    # still verifies), its footer counting them
    pq.write_table(table.replace_schema_metadata(part_metadata(table, key)), part)
    return output


def shm_segments() -> set[str]:
    """Names of the shared-memory segments DeepSpeed's CPU all-reduce makes, one per worker."""
    return {path.name for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


@pytest.fixture(scope="module")
def shm_before_base_run() -> set[str]:
    return shm_segments()


@pytest.fixture(scope="module")
def base_run(shm_before_base_run, train_cache, toy_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "base"
    return raydpo.train(run_settings(toy_model, train_cache, output))


def test_training_leaves_no_shared_memory_behind(base_run, shm_before_base_run):
    """Each run's two CPU workers made 64 MiB segments in /dev/shm that outlived them, held in RAM."""
    assert shm_segments() - shm_before_base_run == set()


def metric_history(result, name: str) -> dict[int, float]:
    client = MlflowClient(tracking_uri=result.tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(result.run_id, name)}


def load_weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=True
    ).state_dict()


def assert_same_weights(path, other_path, atol=1e-6):
    weights, other = load_weights(path), load_weights(other_path)
    assert weights.keys() == other.keys()
    worst = max((weights[name] - other[name]).abs().max().item() for name in weights)
    assert worst <= atol, f"weights differ by up to {worst}"


def test_first_step_policy_is_the_reference(base_run):
    """Step 1 is computed before any update: every log-ratio is 0, so the sigmoid loss is ln 2."""
    gap = metric_history(base_run, "ref_check/max_abs_logratio")[1]
    scale = metric_history(base_run, "ref_check/max_abs_ref_logps")[1]
    assert scale > 100  # sums over hundreds of tokens: the check is not against zeros
    assert gap < 1e-3
    assert metric_history(base_run, "loss")[1] == pytest.approx(math.log(2), abs=1e-5)
    assert metric_history(base_run, "rewards/margins")[1] == pytest.approx(0.0, abs=1e-4)
    assert metric_history(base_run, "rewards/chosen")[1] == pytest.approx(0.0, abs=1e-4)


def test_prefix_sharing_off_gives_the_same_first_step(base_run, train_cache, toy_model, tmp_path):
    """The base run computes each prompt once (prefix_sharing auto); one step with two sequences per
    pair gives the same log-probs, gradient norm and token count (TRL's, the prompt counted twice)."""
    assert base_run.prefix_sharing is True
    settings = run_settings(toy_model, train_cache, tmp_path / "unshared", max_steps=1, prefix_sharing="off")
    unshared = raydpo.train({**settings, "eval_steps": None, "checkpoint_steps": None})
    assert unshared.prefix_sharing is False
    for name in (
        "loss",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "grad_norm",
        "num_tokens",
        "entropy",
    ):
        expected = metric_history(base_run, name)[1]
        assert metric_history(unshared, name)[1] == pytest.approx(expected, rel=1e-5), name


def test_cpu_workers_allocate_with_mimalloc(base_run):
    """cpu_allocator's default reaches the workers: mimalloc is preloaded into every Ray Train worker.
    CPU workers see no GPU either way (on a GPU node DeepSpeed would otherwise take one)."""
    from raydpo.resources import CPU_ONLY_ENV, cpu_allocator_env, cpu_process_env

    assert base_run.cpu_allocator == "mimalloc"
    assert Path(cpu_allocator_env("mimalloc")["LD_PRELOAD"].split()[0]).is_file()
    assert cpu_allocator_env("system") == {}
    assert cpu_process_env("system") == CPU_ONLY_ENV == {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    assert cpu_process_env("mimalloc") == {**CPU_ONLY_ENV, **cpu_allocator_env("mimalloc")}


def test_mlflow_run_holds_metrics_settings_and_artifacts(base_run, train_cache, toy_model):
    client = MlflowClient(tracking_uri=base_run.tracking_uri)
    run = client.get_run(base_run.run_id)
    assert base_run.tracking_uri.startswith("sqlite:///") and run.info.status == "FINISHED"
    trl_names = [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "entropy",
        "mean_token_accuracy",
        "grad_norm",
        "learning_rate",
        "epoch",
        "num_tokens",
        "tokens_per_second",
        "samples_per_second",
    ]
    for name in trl_names:
        assert sorted(metric_history(base_run, name)) == list(range(1, STEPS + 1)), name
    for name in ("eval_loss", "eval_rewards/accuracies", "eval_logps/chosen", "eval_entropy"):
        assert sorted(metric_history(base_run, name)) == [3, STEPS], name
    eval_written = json.loads((train_cache / "eval" / "manifest.json").read_text())["counts"]["written"]
    assert metric_history(base_run, "eval_pairs") == {3: eval_written, STEPS: eval_written}  # none dropped
    learning_rates = metric_history(base_run, "learning_rate")
    assert learning_rates[STEPS] == 0.0 and max(learning_rates.values()) == pytest.approx(1e-3)
    num_tokens = metric_history(base_run, "num_tokens")
    assert all(num_tokens[s] < num_tokens[s + 1] for s in range(1, STEPS))

    # named after the model, loss and beta; the experiment opens in MLflow's model-training mode
    assert run.info.run_name == f"{toy_model.name} sigmoid beta=0.1"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # params: the settings under their own names and the plan; the inputs' identity in tags
    params, tags = run.data.params, run.data.tags
    manifest = json.loads((train_cache / "train" / "manifest.json").read_text())
    assert params["beta"] == "0.1" and params["learning_rate"] == "0.001"
    assert params["loss_type"] == "sigmoid" and params["zero_stage"] == "3"
    assert params["plan.train_rows"] == str(manifest["counts"]["written"] - NONFINITE_ROWS)
    assert not any(name.startswith(("cache.", "raydpo.")) for name in params)
    assert tags["raydpo.cache.train.key"] == manifest["key"]
    assert tags["raydpo.cache.train.nonfinite_reference"] == str(NONFINITE_ROWS)
    assert tags["raydpo.reference.same_as_policy"] == "true"
    ours = sorted(name for name in tags if name.startswith("raydpo."))
    assert len(ours) <= 16 and not any("fingerprint" in name for name in ours), ours  # a short list
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "manifest_train.json")).read_text())
    assert logged["fingerprints"] == manifest["fingerprints"]  # what stands behind the key

    # the Datasets panel: both caches, keyed by the cache key, with their counts
    inputs = {entry.dataset.name: entry for entry in run.inputs.dataset_inputs}
    assert set(inputs) == {"raydpo-cache/train", "raydpo-cache/eval"}
    train_input = inputs["raydpo-cache/train"]
    assert train_input.dataset.digest == manifest["key"][:32]
    assert (
        json.loads(train_input.dataset.profile)["usable_pairs"]
        == manifest["counts"]["written"] - NONFINITE_ROWS
    )
    assert json.loads(train_input.dataset.source)["uri"] == str(train_cache / "train")
    assert {(tag.key, tag.value) for tag in train_input.tags} == {("mlflow.data.context", "training")}
    artifacts = {a.path for a in client.list_artifacts(base_run.run_id)}
    assert {"deepspeed_config.json", "manifest_train.json", "manifest_eval.json"} <= artifacts
    assert run.data.tags["raydpo.model_path"] == base_run.model_path

    # MLflow's system metrics, from the one node's local rank 0
    system = {name for name in run.data.metrics if name.startswith("system/")}
    assert {"system/node0/cpu_utilization_percentage", "system/node0/system_memory_usage_megabytes"} <= system

    # "Logged models": the final model, where it is, without a copy of its weights
    model = client.get_logged_model(run.data.tags["raydpo.model_id"])
    assert model.status.name == "READY" and model.source_run_id == base_run.run_id
    assert model.tags["raydpo.model_path"] == base_run.model_path
    assert model.tags["mlflow.model.isExternal"] == "true"
    assert [output.model_id for output in run.outputs.model_outputs] == [model.model_id]


def test_saved_model_loads_generates_and_moved(base_run, toy_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_run.model_path)
    tokenizer = AutoTokenizer.from_pretrained(base_run.model_path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    trained, initial = model.state_dict(), load_weights(toy_model)
    assert trained.keys() == initial.keys()
    moved = [name for name in trained if not torch.equal(trained[name], initial[name])]
    assert len(moved) == len(trained)  # every tensor was updated (no frozen or lost parameter)


def checkpoints_of(output: Path, storage: Path | None = None) -> Path:
    """The checkpoint directory of the run in OUTPUT: its own, in STORAGE (default OUTPUT/checkpoints)."""
    return (storage or output / "checkpoints") / default_storage_name(str(output))


def checkpoint_registered(output: Path, step: int, storage: Path | None = None):
    """Whether Ray Train's controller has registered the checkpoint of `step` (its snapshot lists it)."""
    snapshot = checkpoints_of(output, storage) / "checkpoint_manager_snapshot.json"
    return lambda: snapshot.is_file() and f"checkpoint-{step:08d}" in snapshot.read_text()


def test_worker_failure_restarts_from_checkpoint_and_matches(
    base_run, train_cache, toy_model, tmp_path, monkeypatch, reliability
):
    """A worker SIGKILLed after step 4 is restarted from the step-3 checkpoint; the result is the same model.

    The worker stalls after step 4 and is killed once Ray Train has registered the step-3 checkpoint: its
    controller polls the workers every 2 s, so a worker dying right after a report could beat the
    registration, and the group would then start over (to the same weights) instead of resuming."""
    inject(monkeypatch, tmp_path, "train.after_step:4:stall@1")
    kill_when_fired(tmp_path, "train.after_step", ready=checkpoint_registered(tmp_path / "run", 3))
    result = raydpo.train(run_settings(toy_model, train_cache, tmp_path / "run", max_failures=1))
    assert fired(tmp_path, "train.after_step")
    assert len(result.step_seconds) == STEPS - 3  # the restarted group ran steps 4-6
    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id)  # the failure, counted
    assert run.info.status == "FINISHED" and run.data.tags["raydpo.worker_failures"] == "1"
    assert re.fullmatch(
        r"the process of worker rank 1 died \(pid \d+ on .+\)", run.data.tags["raydpo.last_failure"]
    )
    assert_same_weights(result.model_path, base_run.model_path)
    assert metric_history(result, "loss")[STEPS] == pytest.approx(
        metric_history(base_run, "loss")[STEPS], rel=1e-5
    )
    # step 4, logged before the kill, is logged again by the restarted workers: its later value is theirs,
    # and each step's latest value is the uninterrupted run's; no tokens lost
    client = MlflowClient(tracking_uri=result.tracking_uri)
    history = sorted(client.get_metric_history(result.run_id, "loss"), key=lambda metric: metric.timestamp)
    assert [metric.step for metric in history] == [1, 2, 3, 4, 4, 5, 6]  # in the order they were logged
    latest = {metric.step: metric.value for metric in history}
    assert latest == pytest.approx(metric_history(base_run, "loss"), rel=1e-5)
    assert metric_history(result, "num_tokens") == metric_history(base_run, "num_tokens")
    reliability.record(
        "train-1-worker-killed",
        "training",
        "a Ray Train worker dies mid-run (`max_failures=1`)",
        "the last of 2 ZeRO-3 workers stalls after step 4 of 6 and is killed with SIGKILL from outside, once "
        "Ray Train has registered the step-3 checkpoint; checkpoints every 3 steps",
        "the worker group was restarted, resumed from step 3 (DeepSpeed state loaded with "
        "`weights_only=True`) and ran steps 4-6; final weights equal to an uninterrupted run "
        "(max |diff| <= 1e-6), final loss equal to 1e-5",
    )


def start_cli_train(settings: dict, environment: dict[str, str], stdout) -> subprocess.Popen:
    """`raydpo train` with SETTINGS as flags, in a process of its own; stderr piped."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items() if value is not None]
    return subprocess.Popen(
        [sys.executable, "-m", "raydpo.cli", "train", *flags],
        env=environment,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_marks_the_run_interrupted_and_says_how_to_resume(train_cache, toy_model, tmp_path):
    """SIGINT to `raydpo train` (Ray Train's handler aborts the run and exits the process): one line
    that names the checkpoint to resume from, exit code 1, the log kept, run.json "interrupted" and the
    MLflow run KILLED with the line as its description."""
    import signal
    import subprocess
    import time

    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    from raydpo.faults import FAULT_DIR_ENV, FAULT_ENV

    faults, output = tmp_path / "faults", tmp_path / "run"
    faults.mkdir()
    settings = run_settings(
        toy_model, train_cache, output, num_workers=1, checkpoint_steps=1, eval_steps=None
    )
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment.update({FAULT_ENV: "train.after_step:2:stall", FAULT_DIR_ENV: str(faults)})
    process = start_cli_train(settings, environment, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while (
        fired(faults, "train.after_step") is None and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=180)
    last = err.strip().splitlines()[-1]
    assert process.returncode == 1, err
    assert re.fullmatch(
        r"raydpo train: training interrupted \(Ctrl-C\); rerun with --resume to continue from checkpoint-0000000[12] .*",
        last,
    ), err
    assert "Traceback" not in err and "full log: " in err
    state = json.loads((output / "run.json").read_text())
    assert state["status"] == "interrupted"
    run = MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags[MLFLOW_RUN_NOTE] == "**Interrupted:** " + last.removeprefix("raydpo train: ")


def test_each_epoch_trains_every_pair_once_across_a_restart(train_cache, toy_model, tmp_path, monkeypatch):
    """Two epochs on 2 workers: each epoch's steps train distinct pairs, all but the equal split's and
    the last partial step's leftovers; a worker killed in epoch 2 resumes from a checkpoint of epoch 2
    and the restarted steps train the same pairs as before."""
    from raydpo.faults import PAIR_TRACE_ENV

    pairs = raydpo.read_output(str(train_cache)).num_rows - NONFINITE_ROWS
    steps_per_epoch = (pairs // 2) // 2
    traces = tmp_path / "traces"
    traces.mkdir()
    monkeypatch.setenv(PAIR_TRACE_ENV, str(traces))
    inject(monkeypatch, tmp_path, f"train.after_step:{steps_per_epoch + 3}:stall@1")
    output = tmp_path / "run"
    checkpoint = steps_per_epoch + 2
    kill_when_fired(tmp_path, "train.after_step", ready=checkpoint_registered(output, checkpoint))
    settings = run_settings(toy_model, train_cache, output, max_steps=None, epochs=2, max_failures=1)
    settings.update(checkpoint_steps=checkpoint, eval_steps=None, logging_steps=5)
    result = raydpo.train(settings)
    assert len(result.step_seconds) == 2 * steps_per_epoch - checkpoint  # the restarted group's steps
    by_step: dict[tuple[int, int], list[str]] = {}
    epochs: dict[int, int] = {}
    for rank in (0, 1):
        for line in (traces / f"pairs-rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            key = (rank, record["step"])
            assert by_step.setdefault(key, record["pairs"]) == record["pairs"], (
                key
            )  # a rerun step: same pairs
            epochs[record["step"]] = record["epoch"]
    assert sorted({step for _, step in by_step}) == list(range(1, 2 * steps_per_epoch + 1))
    for epoch in (0, 1):
        steps = range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
        assert {epochs[step] for step in steps} == {epoch}
        trained = [pair for (_, step), ids in by_step.items() if step in steps for pair in ids]
        assert len(trained) == len(set(trained)) == 4 * steps_per_epoch  # every pair at most once
        assert (
            len(trained) >= pairs - 1 - 2
        )  # leftovers: the equal split's (<= 1) and each rank's partial step


def split_coordinators_since(started_ms: float) -> list[dict]:
    """Ray Data's split coordinator actors started since `started_ms`, from the GCS's actor table."""
    import ray

    actors = ray._private.state.actors().values()
    return [
        actor
        for actor in actors
        if actor["ActorClassName"] == "SplitCoordinator" and actor["StartTime"] >= started_ms
    ]


def most_alive_at_once(actors: list[dict]) -> int:
    events = sorted(
        [(actor["StartTime"], 1) for actor in actors]
        + [(actor["EndTime"] or math.inf, -1) for actor in actors],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same instant
    )
    alive = most = 0
    for _, change in events:
        alive += change
        most = max(most, alive)
    return most


def test_a_run_of_many_epochs_keeps_two_split_coordinators_alive(train_cache, toy_model, tmp_path):
    """One step an epoch for 5 steps: each epoch is split by its own Ray Data coordinator actor (a process
    of about 115 MiB); rank 0 kills those of the epochs every rank has finished, so no more than two
    live at once, where all five used to live to the end of the run."""
    pairs = raydpo.read_output(str(train_cache)).num_rows - NONFINITE_ROWS
    micro_batch_size = 4
    grad_accum = (pairs // 2) // micro_batch_size  # each worker's share of an epoch is one step
    started_ms = time.time() * 1000
    settings = run_settings(toy_model, train_cache, tmp_path / "run", max_steps=5)
    settings.update(
        micro_batch_size=micro_batch_size, grad_accum=grad_accum, eval_steps=None, logging_steps=5
    )
    result = raydpo.train(settings)
    assert result.plan.steps_per_epoch == 1 and result.plan.epochs_streamed == 5
    # ray.kill returns before the GCS records the death; on a loaded machine that took over 20 s
    deadline = time.monotonic() + 60
    while True:
        coordinators = split_coordinators_since(started_ms)
        killed = [actor for actor in coordinators if "RAY_KILL" in str(actor["DeathCause"])]
        if len(killed) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(coordinators) == 5  # one split an epoch
    assert len(killed) == 4  # all but the last epoch's, which ends with its owner, rank 0
    assert most_alive_at_once(coordinators) == 2


def test_a_worker_group_failure_is_named_by_the_rank_that_caused_it():
    """A rank whose collective lost its peer is not the cause: the rank that raised its own error is."""
    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    failures = {0: lost, 1: ValueError("the cached values hold a NaN"), 2: lost}
    assert describe(failures) == "worker rank 1 failed: the cached values hold a NaN"
    assert describe({0: lost, 1: lost}).startswith("worker rank 0 failed: [../third_party/gloo")


def file_digests(root: Path) -> dict[str, str]:
    """Every file under ROOT and a digest of its bytes."""
    import hashlib

    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def train_two_runs_at_once(toy_model, train_cache, tmp_path: Path, storage: Path) -> list[Path]:
    """Two short one-worker runs on STORAGE at the same time: `raydpo train` in a process of its own that
    joins this session's Ray instance, and `raydpo.train` here. Both outputs are named `run`."""
    import ray

    outputs = [tmp_path / "first" / "run", tmp_path / "second" / "run"]
    short = {"num_workers": 1, "max_steps": 2, "checkpoint_steps": 1, "eval_steps": None}
    settings = [
        run_settings(toy_model, train_cache, output, storage_path=str(storage), **short) for output in outputs
    ]
    joined = {**settings[0], "ray_address": ray.get_runtime_context().gcs_address}
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAYDPO_FAULT")}
    process = start_cli_train(joined, environment, stdout=subprocess.DEVNULL)
    raydpo.train(settings[1])
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return outputs


def test_interrupted_run_resumes_to_the_same_model(
    base_run, train_cache, toy_model, tmp_path, monkeypatch, reliability
):
    """A run stopped by a worker's death resumes to the model an uninterrupted run gives, after two other
    runs trained at once on its storage path: each run's checkpoints are its own, and neither run touched
    a file of another's."""
    shared = tmp_path / "storage"
    output = tmp_path / "run"
    inject(monkeypatch, tmp_path, "train.after_step:4:stall@1")
    kill_when_fired(tmp_path, "train.after_step", ready=checkpoint_registered(output, 3, shared))
    settings = run_settings(toy_model, train_cache, output, storage_path=str(shared))
    storage = re.escape(str(checkpoints_of(output, shared)))
    with pytest.raises(
        TrainingFailed, match=rf"; rerun with --resume to continue from checkpoint-00000003 in {storage}$"
    ) as failure:
        raydpo.train(settings)
    # the killed worker is named, not rank 0's failure at a collective that followed it
    died = r"the process of worker rank 1 died \(pid \d+ on [\d.]+: [^)]+\)"
    assert re.match(
        rf"training failed: {died}, and --max-failures 0 allows no more restarts; the usual causes are the "
        r"OOM killer",
        str(failure.value),
    ), str(failure.value)
    assert not (tmp_path / "run" / "model").exists()
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["status"] == "failed"
    # in MLflow: FAILED, with the line as the run's description, until the run is resumed
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    failed = client.get_run(state["run_id"])
    line = str(failure.value).removeprefix("training failed: ").split("; rerun with")[0]
    assert failed.info.status == "FAILED" and failed.data.tags["raydpo.last_failure"] == line
    assert failed.data.tags["mlflow.note.content"] == f"**Failed:** {line}"
    assert failed.data.tags["raydpo.worker_failures"] == "1"
    with pytest.raises(RaydpoError, match="interrupted run"):
        raydpo.train(settings)
    with pytest.raises(RaydpoError, match="started with 2 workers"):  # their checkpoints hold 2 partitions
        raydpo.train(settings, resume=True, num_workers=1)
    with pytest.raises(RaydpoError, match="--resume: micro_batch_size, seed changed since the run started"):
        raydpo.train(settings, resume=True, micro_batch_size=1, seed=7)  # a place in the data moves with them
    for changed, refusal in [
        ({"zero_stage": 2}, r"--resume: zero_stage changed since the run started \(3, now 2\)"),
        ({"lora_r": 4}, r"--resume: lora_r changed since the run started \(None, now 4\)"),
    ]:
        with pytest.raises(RaydpoError, match=refusal):
            raydpo.train(settings, resume=True, **changed)
    with pytest.raises(RaydpoError, match="keeps its checkpoints under"):
        raydpo.train(settings, resume=True, storage_name="other")

    interrupted = file_digests(shared)
    others = train_two_runs_at_once(toy_model, train_cache, tmp_path, shared)
    names = [default_storage_name(str(path)) for path in (output, *others)]
    assert len(set(names)) == 3 and sorted(p.name for p in shared.iterdir()) == sorted(names)
    after_others = file_digests(shared)
    assert {k: v for k, v in after_others.items() if k.startswith(names[0] + "/")} == interrupted
    for other in others:
        assert json.loads((other / "run.json").read_text())["status"] == "finished"
    unset = {name: value for name, value in settings.items() if name != "num_workers"}
    result = raydpo.train(unset, resume=True)  # the count the run started with
    resumed_files = file_digests(shared)
    for name in names[1:]:  # the other runs' checkpoints, byte for byte
        own = {k: v for k, v in after_others.items() if k.startswith(name + "/")}
        assert own and {k: v for k, v in resumed_files.items() if k.startswith(name + "/")} == own
    assert result.plan.world_size == 2
    resumed = client.get_run(result.run_id)
    assert result.run_id == state["run_id"] and resumed.info.status == "FINISHED"
    assert "mlflow.note.content" not in resumed.data.tags
    assert resumed.data.tags["raydpo.last_failure"] == line  # what happened, kept
    assert len(result.step_seconds) == STEPS - 3
    assert_same_weights(result.model_path, base_run.model_path)
    with pytest.raises(RaydpoError, match="finished run"):
        raydpo.train(settings)
    reliability.record(
        "train-2-run-stopped",
        "training",
        "the run stops (`max_failures=0`), the operator reruns",
        "the last worker stalls after step 4 of 6 and is killed with SIGKILL once the step-3 checkpoint is "
        "registered; rerun without, then with `--resume`; in between, two other runs train at once on the "
        "same storage path (one through the CLI in a process of its own)",
        "no model directory after the failure, run.json says failed; a rerun without `--resume` is refused "
        "(exit 2), as is `--resume` with another ZeRO stage, LoRA rank or storage name; each run's "
        "checkpoints in its own directory, every file of the others byte for byte the same; `--resume` "
        "continued from step 3 and ran steps 4-6; weights equal to an uninterrupted run (<= 1e-6); a third "
        "run is refused as finished",
    )


def test_kill_during_checkpoint_write_resumes_from_the_previous_checkpoint(
    base_run, train_cache, toy_model, tmp_path, monkeypatch, reliability
):
    """The last worker dies while the step-4 checkpoint is being written, after its DeepSpeed shard is on
    its local disk and before Ray Train has it. Resuming must use the complete step-2 checkpoint."""
    inject(monkeypatch, tmp_path, "train.checkpoint_write:2:exit@1")
    settings = run_settings(toy_model, train_cache, tmp_path / "run", checkpoint_steps=2)
    with pytest.raises(TrainingFailed):
        raydpo.train(settings)
    assert fired(tmp_path, "train.checkpoint_write")
    storage = checkpoints_of(tmp_path / "run")
    assert (storage / "checkpoint-00000002").is_dir()
    assert not (storage / "checkpoint-00000004").exists()  # rank 0 waits at Ray Train's barrier: no torn copy
    result = raydpo.train(settings, resume=True)
    assert len(result.step_seconds) == STEPS - 2  # resumed after step 2, not from the torn step-4 checkpoint
    assert_same_weights(result.model_path, base_run.model_path)
    reliability.record(
        "train-3-checkpoint-write-killed",
        "training",
        "a worker dies while a checkpoint is being written",
        "checkpoints every 2 steps; the last of 2 workers exits after writing its step-4 ZeRO shard locally, "
        "before handing it to Ray Train",
        "the run stops; nothing of step 4 reached the storage path (rank 0 was held at Ray Train's checkpoint "
        f"barrier); `--resume` continued from the step-2 checkpoint, ran steps 3-{STEPS}; weights equal to an "
        "uninterrupted run (<= 1e-6)",
    )


class _RunsOnLoad:
    """A pickled object that runs code when unpickled: what a tampered checkpoint file could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


ZERO_RESUME_SCRIPT = """
import json, os, sys, tempfile
import deepspeed, torch
from raydpo.train_stage.deepspeed_patches import load_checkpoints_weights_only

deepspeed.init_distributed(dist_backend="gloo")


def engine(stage, dtype, fp32_sums=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
    }
    if fp32_sums:  # DeepSpeed's bf16 optimizer: one bf16 worker's built config
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    load_checkpoints_weights_only(engine)
    return engine


def step(engine, seed):
    torch.manual_seed(seed)
    inputs = torch.randn(2, 16, dtype=next(engine.module.parameters()).dtype)
    loss = engine(inputs).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


results = {}
runs = [(stage, dtype, False) for stage in (0, 1, 2, 3) for dtype in (torch.float32, torch.bfloat16)]
for stage, dtype, fp32_sums in runs + [(1, torch.bfloat16, True)]:
    trained = engine(stage, dtype, fp32_sums)
    step(trained, 1)
    directory = tempfile.mkdtemp()
    trained.save_checkpoint(directory, tag="t")
    resumed = engine(stage, dtype, fp32_sums)
    resumed.load_checkpoint(directory, tag="t")
    results[f"{stage}-{dtype}-{type(trained.optimizer).__name__}"] = [step(trained, 2), step(resumed, 2)]
print("RESULTS " + json.dumps(results))
"""


def run_deepspeed_script(text: str, script: Path, accelerator: str = "cpu") -> dict:
    """Run `text` as one single-process DeepSpeed job (on CPU: gloo); returns what it printed after RESULTS."""
    script.write_text(text)
    env = {
        **os.environ,
        "DS_ACCELERATOR": accelerator,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[0].removeprefix("RESULTS "))


def test_a_checkpoint_of_every_zero_stage_resumes_weights_only(tmp_path):
    """Real DeepSpeed engines at ZeRO stages 0-3, fp32 and bf16, and DeepSpeed's bf16 optimizer (one bf16
    worker's engine), save a checkpoint and a fresh engine loads it through raydpo's weights-only
    loader: the next step's loss equals the uninterrupted one.
    Stages 1 and 2 pickle where each parameter's slice lies (`fragment_address`), which a weights-only
    load refused, so every resume at those stages failed."""
    results = run_deepspeed_script(ZERO_RESUME_SCRIPT, tmp_path / "resume.py")
    assert len(results) == 9 and "1-torch.bfloat16-BF16_Optimizer" in results
    for run, (uninterrupted, resumed) in results.items():
        assert resumed == uninterrupted, run


BF16_WORKER_SCRIPT = """
import json
import deepspeed, torch
from raydpo.config import TrainConfig
from raydpo.train_stage import engine as engines
from raydpo.train_stage.ds_config import build

deepspeed.init_distributed(dist_backend="gloo")
TENSORS = 64
CONFIG = TrainConfig(model="unused", learning_rate=1e-2, warmup_ratio=0.0)


def run(ds_config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(TENSORS // 2)]).to(torch.bfloat16)
    engine, _ = engines.initialize(model, CONFIG, ds_config, total_steps=4)
    losses, reads = [], 0
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.profiler.profile() as profile:
            loss = engine(torch.randn(4, 8, dtype=torch.bfloat16)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
        reads = max(reads, sum(e.count for e in profile.key_averages() if e.key == "aten::_local_scalar_dense"))
    weights = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()]).tolist()
    return {"optimizer": type(engine.optimizer).__name__, "reads": reads, "losses": losses, "weights": weights}


built = build(
    zero_stage=3, micro_batch_size=4, grad_accum=1, world_size=1, gradient_clipping=1.0,
    dtype="bfloat16", on_gpu=False,
)
zero3 = {**built, "zero_optimization": {"stage": 3}}
zero3.pop("data_types")
stage0 = {**zero3, "zero_optimization": {"stage": 0}}
print("RESULTS " + json.dumps({"built": run(built), "zero3": run(zero3), "stage0": run(stage0)}))
"""


def test_one_bf16_worker_steps_without_a_host_read_per_tensor(tmp_path):
    """One bf16 worker's built config runs DeepSpeed's bf16 optimizer (ZeRO stage 1, fp32 gradient sums):
    a step reads the device back a few times, not once or more per tensor as DeepSpeed's stage-0 bf16
    wrapper does (on a GPU each read waits for the device), and its losses and weights are those of the
    same worker at ZeRO-3. (The stage-0 wrapper's are not: it creates AdamW's state with a step of zero
    gradients, which AdamW counts, so every bias correction is one step late.)"""
    runs = run_deepspeed_script(BF16_WORKER_SCRIPT, tmp_path / "bf16_worker.py")
    built, zero3, stage0 = runs["built"], runs["zero3"], runs["stage0"]
    assert built["optimizer"] == "BF16_Optimizer" and stage0["optimizer"] == "FP16_UnfusedOptimizer"
    tensors = 64
    assert stage0["reads"] >= tensors  # the wrapper this config avoids
    assert built["reads"] <= 8, built["reads"]
    assert built["losses"] == pytest.approx(zero3["losses"], rel=1e-6)  # equal when measured
    assert np.allclose(built["weights"], zero3["weights"], rtol=0, atol=1e-6)
    assert not np.allclose(built["weights"], run_start_weights(tensors), rtol=0, atol=1e-3)


SCHEDULE_SCRIPT = """
import json
import deepspeed, torch
from raydpo.config import TrainConfig
from raydpo.train_stage import engine as engines
from raydpo.train_stage.ds_config import build

deepspeed.init_distributed(dist_backend="gloo")
CONFIG = TrainConfig(model="unused", learning_rate=1e-2, warmup_ratio=0.25, lr_scheduler="cosine")
STEPS = 8


def run(ds_config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    engine, scheduler = engines.initialize(model, CONFIG, ds_config, total_steps=STEPS)
    rates = []
    for seed in range(STEPS):
        torch.manual_seed(seed)
        engine.backward(engine(torch.randn(4, 8)).pow(2).mean())
        engine.step()
        rates.append(engines.learning_rate(engine, scheduler))
    return {"optimizer": type(engine.basic_optimizer).__name__, "rates": rates}


built = build(
    zero_stage=3, micro_batch_size=4, grad_accum=1, world_size=1, gradient_clipping=1.0,
    dtype="float32", on_gpu=False,
)
adamw = {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}
own = {**built, "zero_optimization": {"stage": 3}, "optimizer": adamw}
print("RESULTS " + json.dumps({"built": run(built), "deepspeed_optimizer": run(own)}))
"""


def test_a_deepspeed_optimizer_without_a_scheduler_follows_the_runs_schedule(tmp_path):
    """A DeepSpeed JSON that names its optimizer and no scheduler: DeepSpeed's optimizer gets the run's
    lr_scheduler and warmup_ratio, as the Hugging Face Trainer gives it, not a constant learning rate."""
    runs = run_deepspeed_script(SCHEDULE_SCRIPT, tmp_path / "schedule.py")
    assert runs["deepspeed_optimizer"]["optimizer"] == "AdamW"  # DeepSpeed's, built from the JSON
    rates = runs["built"]["rates"]
    assert rates[1] == pytest.approx(1e-2) and rates[-1] < 1e-3  # 2 steps of warmup, then a cosine decay
    assert runs["deepspeed_optimizer"]["rates"] == pytest.approx(rates, rel=1e-9)


FP16_WORKER_SCRIPT = """
import json
import deepspeed, torch
from raydpo.config import TrainConfig
from raydpo.train_stage import engine as engines
from raydpo.train_stage.ds_config import build

deepspeed.init_distributed(dist_backend="nccl")
CONFIG = TrainConfig(model="unused", learning_rate=1e-3, warmup_ratio=0.0)


def run(ds_config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)]).cuda().half()
    engine, _ = engines.initialize(model, CONFIG, ds_config, total_steps=4)
    losses = []
    for seed in range(4):
        torch.manual_seed(seed)
        loss = engine(torch.randn(16, 64, device="cuda", dtype=torch.float16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"optimizer": type(engine.optimizer).__name__, "losses": losses}


built = build(
    zero_stage=3, micro_batch_size=16, grad_accum=1, world_size=1, gradient_clipping=1.0,
    dtype="float16", on_gpu=True,
)
zero3 = {**built, "zero_optimization": {"stage": 3}}
print("RESULTS " + json.dumps({"built": run(built), "zero3": run(zero3)}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: DeepSpeed refuses fp16 on CPUs")
def test_one_fp16_worker_runs_zero1s_fp16_optimizer(tmp_path):
    """One fp16 worker's built config runs ZeRO-1's fp16 optimizer (flat fp32 master weights), not
    DeepSpeed's unfused stage-0 wrapper, and steps as the same worker at ZeRO-3 does."""
    runs = run_deepspeed_script(FP16_WORKER_SCRIPT, tmp_path / "fp16_worker.py", accelerator="cuda")
    assert runs["built"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert runs["built"]["losses"] == pytest.approx(runs["zero3"]["losses"], rel=1e-3)


def run_start_weights(tensors: int) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(tensors // 2)]).to(torch.bfloat16)
    return torch.cat([p.detach().float().flatten() for p in model.parameters()]).tolist()


def test_checkpoint_files_are_loaded_weights_only(tmp_path):
    """What resume loads: ZeRO-3 state (tensors, DeepSpeed's stage enum and loss scaler) loads; an arbitrary
    pickled object is refused before it runs."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from raydpo.train_stage.deepspeed_patches import load_checkpoint_file

    state = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "flat": [torch.arange(4.0)]}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = load_checkpoint_file(str(tmp_path / "optim_states.pt"), map_location="cpu")
    assert loaded["zero_stage"] is ZeroStageEnum.weights
    assert loaded["loss_scaler"].cur_scale == 1.0
    assert torch.equal(loaded["flat"][0], torch.arange(4.0))

    marker = tmp_path / "ran"
    torch.save({"module": _RunsOnLoad(marker)}, tmp_path / "tampered.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint_file(str(tmp_path / "tampered.pt"))
    assert not marker.exists()


def test_reference_must_be_the_policy(train_cache, toy_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(toy_model, other)
    weights = load_weights(toy_model)
    weights = {name: tensor + 0.01 for name, tensor in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RaydpoError, match="reference-is-different"):
        raydpo.train(run_settings(other, train_cache, tmp_path / "run"))

    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(RaydpoError, match="tokenizer"):
        raydpo.train(run_settings(other, train_cache, tmp_path / "run", reference_is_different=True))


def test_a_cache_made_with_another_tokenizer_trains_with_tokenizer(toy_model, tmp_path):
    """`precompute --tokenizer T` then `train --tokenizer T`: the run trains, and T is saved beside the
    model; without --tokenizer, the model's own tokenizer is refused in one line that names the flag."""
    from raydpo.cli import build_parser

    policy = tmp_path / "policy"  # the toy's weights with a chat template of its own
    shutil.copytree(toy_model, policy)
    (policy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    precompute_english(policy, tmp_path / "cache", tokenizer=str(toy_model), limit=8)
    settings = run_settings(policy, tmp_path / "cache", tmp_path / "run", num_workers=1, max_steps=1)
    settings.update(eval_steps=None, checkpoint_steps=None)
    with pytest.raises(RaydpoError, match="pass that one with --tokenizer"):
        raydpo.train(settings)
    args = build_parser().parse_args(["train", "--model", str(policy), "--tokenizer", str(toy_model)])
    assert args.tokenizer == str(toy_model)
    result = raydpo.train(settings, tokenizer=args.tokenizer)
    saved = Path(result.model_path) / "chat_template.jinja"
    assert saved.read_text() == (toy_model / "chat_template.jinja").read_text()
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["config"]["tokenizer"] == str(toy_model)


REMOTE_CONFIG_CODE = """from transformers import LlamaConfig


class ToyRemoteConfig(LlamaConfig):
    model_type = "toy_remote"
"""
REMOTE_MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_toy_remote import ToyRemoteConfig


class ToyRemoteForCausalLM(LlamaForCausalLM):
    config_class = ToyRemoteConfig
"""


@pytest.fixture(scope="module")
def remote_code_toy(toy_model, tmp_path_factory) -> Path:
    """The toy model's weights behind model code shipped in its directory (`auto_map`): a model type
    transformers does not know, loadable only with trust_remote_code."""
    model = tmp_path_factory.mktemp("models") / "toy-remote"
    shutil.copytree(toy_model, model)
    (model / "configuration_toy_remote.py").write_text(REMOTE_CONFIG_CODE)
    (model / "modeling_toy_remote.py").write_text(REMOTE_MODEL_CODE)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="toy_remote",
        architectures=["ToyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_toy_remote.ToyRemoteConfig",
            "AutoModelForCausalLM": "modeling_toy_remote.ToyRemoteForCausalLM",
        },
    )
    (model / "config.json").write_text(json.dumps(config))
    return model


BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits


@pytest.fixture(scope="module")
def bf16_cache(ray_session, remote_code_toy, tmp_path_factory):
    """The train split of `train_cache` scored in bf16 (same pairs, same non-finite rows), by the toy
    model's weights loaded through their shipped code."""
    output = tmp_path_factory.mktemp("bf16-cache") / "cache"
    precompute_english(remote_code_toy, output, dtype="bfloat16", trust_remote_code=True)
    return with_nonfinite_rows(output)


def test_bf16_reference_agrees_with_fp32(bf16_cache, train_cache):
    """Each bf16 log-prob sum is within bf16's unit roundoff u = 2^-8 of the fp32 one, relative: every
    term of a sum is a fp32 log-softmax of logits that the bf16 model computed to a few roundings, and
    all terms have one sign, so the sum's relative error is at most its worst term's (measured: ~7e-5).
    The values are not equal, so the cache really was scored in bf16."""
    columns = ["pair_id", "ref_chosen_logps", "ref_rejected_logps"]
    fp32 = raydpo.read_output(str(train_cache)).to_pandas(columns).set_index("pair_id").sort_index()
    bf16 = raydpo.read_output(str(bf16_cache)).to_pandas(columns).set_index("pair_id").sort_index()
    manifest = raydpo.read_output(str(bf16_cache)).manifest
    assert manifest.settings["dtype"] == "bfloat16" and manifest.settings["attn_implementation"] == "sdpa"
    assert list(bf16.index) == list(fp32.index)
    finite = np.isfinite(fp32.to_numpy()).all(axis=1)
    expected = fp32.to_numpy()[finite]
    gap = np.abs(bf16.to_numpy()[finite] - expected)
    assert (gap <= BF16_UNIT_ROUNDOFF * np.abs(expected)).all()
    assert gap.max() > 0


def test_bf16_training_with_remote_code_reproduces_its_cache(
    bf16_cache, remote_code_toy, train_cache, base_run, toy_model, tmp_path
):
    """bf16 end to end on CPU: a bf16 cache, a policy in bf16 under DeepSpeed's bf16 ZeRO-3 path (gloo),
    loaded through model code shipped with it. Step 1 passes the strict reference check (loss ln 2), and
    its log-probs are those of the fp32 run on the same pairs to u = 2^-8; the saved model is bf16. The
    same two workers at `--zero-stage 0` give the same losses and log-probs. The wrong dtype, or the model's code
    without trust_remote_code, is refused before any worker starts."""
    from transformers import AutoModelForCausalLM

    settings = run_settings(remote_code_toy, bf16_cache, tmp_path / "run", max_steps=2, dtype="bfloat16")
    settings.update(eval_steps=None, checkpoint_steps=None, trust_remote_code=True)
    result = raydpo.train(settings)
    assert metric_history(result, "loss")[1] == pytest.approx(math.log(2), abs=1e-5)
    assert metric_history(result, "ref_check/max_abs_logratio")[1] < 1e-3
    for name in ("logps/chosen", "logps/rejected"):
        fp32 = metric_history(base_run, name)[1]
        assert metric_history(result, name)[1] == pytest.approx(fp32, rel=BF16_UNIT_ROUNDOFF)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    ds_config = json.loads(
        Path(client.download_artifacts(result.run_id, "deepspeed_config.json", str(tmp_path))).read_text()
    )
    assert ds_config["bf16"] == {"enabled": True}
    saved = AutoModelForCausalLM.from_pretrained(result.model_path, trust_remote_code=True, dtype="auto")
    assert next(saved.parameters()).dtype == torch.bfloat16

    # --zero-stage 0 in bf16 runs DeepSpeed's bf16 optimizer (stage 1, fp32 sums): ZeRO-3's values
    stage0 = raydpo.train({**settings, "zero_stage": 0, "output": str(tmp_path / "stage0")})
    assert deepspeed_config_of(stage0, tmp_path / "stage0-config")["zero_optimization"] == {"stage": 1}
    for name in ("loss", "logps/chosen", "logps/rejected"):
        assert metric_history(stage0, name) == pytest.approx(metric_history(result, name), rel=1e-6), name
    # ZeRO-3 averages the workers' gradients in bf16, this in fp32: the weights are equal to a bf16
    # rounding but where two workers' gradients nearly cancel (measured: 8 of 1.1M weights, by at most
    # 6% of the 2 steps' largest move, 2 x lr)
    ours, zero3 = load_weights(stage0.model_path), load_weights(result.model_path)
    apart = sum(int((bf16_roundings_apart(ours[name], zero3[name]) > 1).sum()) for name in zero3)
    assert apart <= 1e-4 * sum(weights.numel() for weights in zero3.values()), apart
    assert_same_weights(stage0.model_path, result.model_path, atol=0.25 * 2 * settings["learning_rate"])

    with pytest.raises(RaydpoError, match="computed in float32 but training runs in bfloat16"):
        raydpo.train(run_settings(toy_model, train_cache, tmp_path / "refused", dtype="bfloat16"))
    settings.update(trust_remote_code=False, output=str(tmp_path / "refused"))
    with pytest.raises(RaydpoError, match="pass --trust-remote-code"):
        raydpo.train(settings)


def bf16_roundings_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable bf16 values apart a and b are, elementwise (their bit patterns as ordered
    integers: negative values counted down from zero)."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.to(torch.bfloat16).view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def deepspeed_config_of(result, tmp_path) -> dict:
    client = MlflowClient(tracking_uri=result.tracking_uri)
    local = client.download_artifacts(result.run_id, "deepspeed_config.json", str(tmp_path))
    return json.loads(Path(local).read_text())


def test_one_worker_runs_stage_0_with_the_values_of_zero_3(
    train_cache, bf16_cache, remote_code_toy, toy_model, tmp_path
):
    """One worker has nothing to partition, so the built config runs it at ZeRO stage 0. Its steps equal
    those of the same worker kept at stage 3 by a user's DeepSpeed JSON: 3 fp32 steps with gradients
    clipped give the same losses, log-probs and gradient norms (both summed in fp64) to 1e-5, and final
    weights (the same weight decay on the same parameters) within 1% of what AdamW can move a weight in 3 steps (about lr each): gradients near AdamW's
    eps carry the rounding of two summation orders into their updates (measured: 6.4e-6 at lr 1e-3).
    In bf16 (DeepSpeed's bf16 optimizer, at stage 1) step 1 passes the strict reference check and the
    saved model is bf16."""
    from transformers import AutoModelForCausalLM

    one = {"num_workers": 1, "cpus_per_worker": 1, "micro_batch_size": 4, "max_steps": 3}
    # a decay large enough to show in the weights: ZeRO-3 loads each weight as a 1-D shard
    one.update(eval_steps=None, checkpoint_steps=None, weight_decay=5.0)
    stage0 = raydpo.train(run_settings(toy_model, train_cache, tmp_path / "stage0", **one))
    user = tmp_path / "zero3.json"
    user.write_text(json.dumps({"gradient_clipping": "auto", "zero_optimization": {"stage": 3}}))
    stage3 = raydpo.train(
        run_settings(toy_model, train_cache, tmp_path / "stage3", deepspeed_config=str(user), **one)
    )
    stages = [
        deepspeed_config_of(run, tmp_path / name)["zero_optimization"]["stage"]
        for name, run in (("0", stage0), ("3", stage3))
    ]
    assert stages == [0, 3]
    for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        ours, zero3 = metric_history(stage0, name), metric_history(stage3, name)
        assert ours.keys() == zero3.keys() == {1, 2, 3}, name
        assert all(ours[step] == pytest.approx(zero3[step], rel=1e-5) for step in ours), (name, ours, zero3)
    assert metric_history(stage0, "grad_norm")[1] > 1.0  # clipping was in effect
    lr = run_settings(toy_model, train_cache, tmp_path)["learning_rate"]
    assert_same_weights(stage0.model_path, stage3.model_path, atol=0.01 * 3 * lr)
    with pytest.raises(AssertionError):  # and the weights moved far more than that
        assert_same_weights(stage0.model_path, toy_model, atol=0.3 * lr)

    settings = run_settings(remote_code_toy, bf16_cache, tmp_path / "bf16", dtype="bfloat16", **one)
    settings.update(trust_remote_code=True, max_steps=1, warmup_ratio=0.0)  # the one step updates
    bf16 = raydpo.train(settings)
    ds_config = deepspeed_config_of(bf16, tmp_path / "bf16-config")
    assert ds_config["zero_optimization"]["stage"] == 1 and ds_config["bf16"] == {"enabled": True}
    assert ds_config["data_types"] == {"grad_accum_dtype": "fp32"}  # DeepSpeed's bf16 optimizer
    assert metric_history(bf16, "loss")[1] == pytest.approx(math.log(2), abs=1e-5)
    assert metric_history(bf16, "ref_check/max_abs_logratio")[1] < 1e-3
    saved = AutoModelForCausalLM.from_pretrained(bf16.model_path, trust_remote_code=True, dtype="auto")
    assert next(saved.parameters()).dtype == torch.bfloat16
    trained, initial = load_weights(bf16.model_path), load_weights(remote_code_toy)
    moved = max((trained[name] - initial[name].bfloat16().float()).abs().max().item() for name in trained)
    assert moved > 0.3 * lr  # the gradients reached DeepSpeed's bf16 optimizer, which stepped


def easy_pairs(count: int) -> list[dict]:
    """Pairs any model can learn quickly: the chosen answer is always the same agreeing sentence."""
    rows = []
    for i in range(count):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Is {a} plus {b} equal to {a + b}?"}],
                "chosen": [{"role": "assistant", "content": "Yes, that is right."}],
                "rejected": [{"role": "assistant", "content": "No, I do not think so at all."}],
            }
        )
    return rows


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1, started and stopped by the test."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
        + ["--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # the server's background job runners (a dozen processes) are not needed for tracking
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the MLflow server did not start")
        time.sleep(0.5)
    yield uri
    process.terminate()
    process.wait(timeout=30)


def test_loss_falls_on_an_easy_task_logged_to_a_tracking_server(
    ray_session, toy_model, tmp_path, mlflow_server
):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "easy.jsonl", easy_pairs(48))
    raydpo.precompute(model=str(toy_model), dataset=str(data), output=str(tmp_path / "cache"))
    result = raydpo.train(
        run_settings(
            toy_model,
            tmp_path / "cache",
            tmp_path / "run",
            micro_batch_size=4,
            max_steps=20,
            eval_steps=None,
            checkpoint_steps=None,
            learning_rate=2e-3,
            warmup_ratio=0.0,
            mlflow_tracking_uri=mlflow_server,
            experiment="easy-task",
        )
    )
    assert result.tracking_uri == mlflow_server
    assert not (tmp_path / "run" / "mlflow.db").exists()
    losses = metric_history(result, "loss")
    accuracies = metric_history(result, "rewards/accuracies")
    assert sorted(losses) == list(range(1, 21))
    assert losses[1] == pytest.approx(math.log(2), abs=1e-5) and accuracies[1] == 0.0
    assert np.mean([losses[s] for s in range(17, 21)]) < losses[1] - 0.2
    assert np.mean([accuracies[s] for s in range(17, 21)]) >= 0.9
    margins = metric_history(result, "rewards/margins")
    assert margins[20] > margins[2] > 0
    client = MlflowClient(tracking_uri=mlflow_server)
    assert (
        client.get_experiment_by_name("easy-task").experiment_id
        == client.get_run(result.run_id).info.experiment_id
    )
    assert "deepspeed_config.json" in {a.path for a in client.list_artifacts(result.run_id)}


def test_lora_trains_an_adapter_and_saves_it_merged(train_cache, toy_model, tmp_path):
    """LoRA, here together with activation checkpointing, the optimizer state offloaded to CPU memory
    and the full shuffle."""
    result = raydpo.train(
        run_settings(
            toy_model,
            train_cache,
            tmp_path / "run",
            max_steps=2,
            eval_steps=None,
            checkpoint_steps=None,
            lora_r=4,
            lora_alpha=8,
            lora_target_modules=["q_proj", "v_proj"],
            learning_rate=1e-2,
            activation_checkpointing=True,
            offload_optimizer=True,
            shuffle="full",  # Ray Data's all-to-all shuffle, not the default streaming one
        )
    )
    adapter = json.loads((tmp_path / "run" / "model" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    merged, base = load_weights(result.model_path), load_weights(toy_model)
    assert merged.keys() == base.keys()
    changed = {name for name in merged if not torch.equal(merged[name], base[name])}
    assert changed and all(".q_proj." in name or ".v_proj." in name for name in changed)
    assert metric_history(result, "loss")[1] == pytest.approx(math.log(2), abs=1e-5)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    downloaded = client.download_artifacts(result.run_id, "deepspeed_config.json", str(tmp_path))
    ds_config = json.loads(Path(downloaded).read_text())
    assert ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_cache_problems_stop_before_any_worker(train_cache, toy_model, tmp_path):
    settings = run_settings(toy_model, tmp_path / "nothing", tmp_path / "run")
    with pytest.raises(RaydpoError, match="not a precompute output"):
        raydpo.train(settings)

    partial = tmp_path / "partial"
    shutil.copytree(train_cache, partial)
    (partial / "train" / "manifest.json").unlink()
    with pytest.raises(RaydpoError, match="unfinished precompute output"):
        raydpo.train(settings, data=str(partial))

    stripped = tmp_path / "stripped"
    shutil.copytree(train_cache, stripped)
    for part in (stripped / "train" / "data").glob("part-*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["ref_rejected_logps"]), part)
    with pytest.raises(RaydpoError, match=r"lacks the columns \['ref_rejected_logps'\]"):
        raydpo.train(settings, data=str(stripped))
    with pytest.raises(RaydpoError, match="is the eval split of a precompute output, not its train split"):
        raydpo.train(settings, data=str(train_cache / "eval"))
    assert not (tmp_path / "run").exists()

    from raydpo.config import TrainConfig
    from raydpo.train_stage.driver import _open_splits

    splits = _open_splits(TrainConfig(model=str(toy_model), data=str(train_cache / "train")))
    assert splits["eval"].path == str(train_cache / "eval")  # beside OUTPUT/train, as beside OUTPUT


def test_settings_that_do_not_fit_the_model_are_refused_before_ray_starts(train_cache, toy_model, tmp_path):
    """A DeepSpeed file that contradicts the settings, LoRA targets the model lacks, a storage path that
    cannot be written and a storage name with a path separator stop `raydpo train` with one line (exit
    2) before a Ray instance is started or joined."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    unwritable = tmp_path / "a-file" / "checkpoints"  # under a file: no directory can be made there
    (tmp_path / "a-file").write_text("")
    for flags, line in (
        (["--storage-path", str(unwritable)], f"the storage path {unwritable} is not writable: "),
        (["--storage-name", "runs/a"], "storage_name must be one directory name"),
        (["--deepspeed-config", str(user)], "train_micro_batch_size_per_gpu=99"),
        (
            ["--lora-r", "4", "--lora-target-modules", "q_prj"],
            "lora_target_modules ['q_prj'] match no module",
        ),
    ):
        ran = run_cli(
            "train", "--model", str(toy_model), "--data", str(train_cache), "--output", str(tmp_path / "run"),
            "--num-workers", "2", *flags,
        )  # fmt: skip
        assert ran.returncode == 2, ran.stderr
        last = ran.stderr.strip().splitlines()[-1]
        assert last.startswith("raydpo train: error: ") and line in last, ran.stderr
        assert "Ray" not in ran.stderr, ran.stderr  # neither started nor joined


def test_a_refused_overwrite_leaves_the_finished_run_and_bad_outputs_are_one_line(
    base_run, train_cache, toy_model, sample_dir, tmp_path
):
    """--overwrite clears a finished run only once every check passed: a DeepSpeed JSON that
    contradicts the settings is refused with the run's model and state as they were."""
    finished = tmp_path / "finished"
    shutil.copytree(Path(base_run.model_path).parent, finished, ignore=shutil.ignore_patterns("checkpoints"))
    state = (finished / "run.json").read_text()
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    settings = run_settings(toy_model, train_cache, finished, overwrite=True, deepspeed_config=str(user))
    with pytest.raises(RaydpoError, match="train_micro_batch_size_per_gpu=99"):
        raydpo.train(settings)
    with pytest.raises(RaydpoError, match=r"lora_target_modules \['q_prj'\] match no module of .*: .*q_proj"):
        raydpo.train({**settings, "deepspeed_config": None, "lora_r": 4, "lora_target_modules": ["q_prj"]})
    assert (finished / "model" / "config.json").is_file()
    assert (finished / "run.json").read_text() == state

    (tmp_path / "afile").write_text("")
    with pytest.raises(RaydpoError, match=r"^the run directory .*afile is a file, not a directory$"):
        raydpo.train(run_settings(toy_model, train_cache, tmp_path / "afile"))
    with pytest.raises(RaydpoError, match=r"^the output .*afile is a file, not a directory$"):
        raydpo.precompute(
            model=str(toy_model), dataset=str(tmp_path / "ds.json"), output=str(tmp_path / "afile")
        )


@pytest.mark.parametrize(
    "overrides, train_rows, eval_rows, message",
    [
        ({"num_workers": 4, "micro_batch_size": 8}, 20, None, "cannot fill one step"),
        ({"num_workers": 1}, 0, None, "no training pairs with finite reference"),
        ({"num_workers": 3}, 100, 0, "eval split has no pairs with finite reference"),
    ],
)
def test_data_too_small_for_the_workers(overrides, train_rows, eval_rows, message):
    from raydpo.config import TrainConfig
    from raydpo.train_stage.plan import plan_run

    with pytest.raises(RaydpoError, match=message):
        plan_run(TrainConfig(model="m", **overrides), train_rows, eval_rows)


def test_default_workers_are_one_per_node_on_cpus_and_every_gpu(ray_session):
    from raydpo.resources import default_workers

    workers, reason = default_workers(use_gpu=False, cpus_each=1)
    assert workers == 1 and reason.startswith("one per node with CPUs (1)")
    with pytest.raises(RaydpoError, match="the Ray cluster has no GPUs now; set --num-workers"):
        default_workers(use_gpu=True, cpus_each=1)


def test_weight_decay_reaches_the_weights_the_trainer_decays_even_as_zero3_shards(toy_model):
    """The decayed parameters are Hugging Face's Trainer's (all but biases and norm weights), also when
    every parameter is a 1-D shard, as a policy loaded under ZeRO-3 is."""
    from transformers import AutoModelForCausalLM, Trainer

    from raydpo.train_stage.engine import param_groups

    model = AutoModelForCausalLM.from_pretrained(toy_model)
    expected = set(Trainer.get_decay_parameter_names(None, model))
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.data = torch.empty(0)  # what ZeRO-3 leaves in each module
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == expected
    decayed = {names[id(p)] for p in decay["params"]}
    assert any(name.endswith("q_proj.weight") for name in decayed)
    assert not any("norm" in name for name in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_plan_counts_steps_and_epochs():
    from raydpo.config import TrainConfig
    from raydpo.train_stage.plan import plan_run

    plan = plan_run(
        TrainConfig(model="m", num_workers=2, micro_batch_size=4, grad_accum=2, epochs=3), 101, None
    )
    # each worker's 50 pairs of an epoch make 6 steps of 8; the 2 left are not trained on in that epoch
    assert plan.steps_per_epoch == 6 and plan.total_steps == 18 and plan.epochs_streamed == 3
    assert plan.epoch_at(6) == 1.0 and plan.epoch_at(9) == 1.5
    plan = plan_run(TrainConfig(model="m", num_workers=2, micro_batch_size=4, max_steps=40), 101, None)
    assert plan.steps_per_epoch == 12 and plan.total_steps == 40 and plan.epochs_streamed == 4


def test_cli_train_bad_input_is_one_line_and_exit_2(toy_model, tmp_path, capsys):
    from raydpo.cli import main as cli_main

    code = cli_main(
        ["train", "--model", str(toy_model), "--data", str(tmp_path / "no-cache"), "--output", str(tmp_path)]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and error.startswith("raydpo train: error:")
    assert cli_main(["train", "--model", str(toy_model), "--beta", "0"]) == 2
    assert (
        cli_main(["train", "--model", str(toy_model), "--loss-type", "sigmoid,sft", "--loss-weights", "1"])
        == 2
    )
    assert "loss_weights has 1 values for 2 loss types" in capsys.readouterr().err


def test_nonfinite_loss_stops_with_its_pairs_or_is_skipped(train_cache, toy_model, tmp_path, reliability):
    """A finite but absurd cached value (3e38) makes the IPO loss overflow to inf: the run stops naming
    the step and the pairs, or, when asked, skips those micro-batches and counts them."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(train_cache, poisoned)
    bad_ids = set()
    for part in sorted((poisoned / "train" / "data").glob("part-*.parquet")):
        table = pq.read_table(part)
        values = table.column("ref_chosen_logps").to_numpy().copy()
        rows = [i for i in range(len(values)) if i % 8 == 5 and np.isfinite(values[i])]
        values[rows] = 3e38
        bad_ids.update(table.column("pair_id").take(rows).to_pylist())
        index = table.schema.get_field_index("ref_chosen_logps")
        pq.write_table(table.set_column(index, "ref_chosen_logps", pa.array(values, pa.float32())), part)
    settings = run_settings(
        toy_model,
        poisoned,
        tmp_path / "run",
        loss_type="ipo",
        eval_steps=None,
        checkpoint_steps=None,
        max_failures=1,  # not used: a restart would stop again
    )
    with pytest.raises(TrainingFailed, match="^training failed: non-finite loss on some worker") as failure:
        raydpo.train(settings)
    assert str(failure.value).endswith(
        "; no checkpoint was written: rerun with --resume to start again in the same MLflow run"
    )
    assert any(pair_id in str(failure.value) for pair_id in bad_ids)
    # every rank stops together, at once: no worker failure, which Ray Train would restart to stop again
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    stopped = MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["run_id"])
    assert state["status"] == "failed" and stopped.info.status == "FAILED"
    assert "raydpo.worker_failures" not in stopped.data.tags

    assert not (tmp_path / "run" / "model").exists()
    step = re.search(r"at step (\d+)", str(failure.value)).group(1)
    result = raydpo.train(settings, max_steps=3, skip_nonfinite_loss=True, overwrite=True)
    skipped = int(metric_history(result, "skipped_nonfinite_batches")[3])
    assert skipped >= 1
    assert all(math.isfinite(value) for value in metric_history(result, "loss").values())
    reliability.record(
        "train-4-nonfinite-loss",
        "training",
        "a NaN/inf loss",
        "one cached reference value in 8 set to 3e38, so the IPO loss overflows to inf",
        f"the run stopped at step {step} naming the micro-batch's pair ids (exit 1, no model); with "
        f"`--skip-nonfinite-loss`, {skipped} micro-batches in 3 steps were skipped, counted in "
        "`skipped_nonfinite_batches`, and replaced; every logged loss finite",
    )


def fake_forward(
    loss: float,
    chosen_rewards,
    rejected_rewards,
    chosen_logit_mean: float,
    tokens: int,
    hit_rate: float = 0.0,
):
    """A micro-batch's `Forward` with given rewards, and over `tokens` chosen tokens each a mean logit (and
    the same mean entropy) and a share of top-1 hits."""
    from types import SimpleNamespace

    from raydpo.logprobs import CompletionLogps

    pairs = len(chosen_rewards)
    mask = torch.zeros(2 * pairs, tokens, dtype=torch.bool)
    mask[:pairs] = True
    logits_sums = torch.tensor([chosen_logit_mean * tokens] * pairs + [0.0] * pairs)
    zeros = torch.zeros(2 * pairs)
    scores = CompletionLogps(torch.zeros(mask.shape), mask, zeros, zeros, zeros, mask.sum(1), logits_sums)
    scores.entropy_sums = logits_sums
    scores.top1_counts = torch.tensor([hit_rate * tokens] * pairs + [0.0] * pairs)
    rewards = SimpleNamespace(
        chosen_rewards=torch.tensor(chosen_rewards), rejected_rewards=torch.tensor(rejected_rewards)
    )
    inputs = SimpleNamespace(chosen_logps=torch.zeros(pairs), rejected_logps=torch.zeros(pairs))
    return SimpleNamespace(loss=torch.tensor(loss), scores=scores, output=rewards, inputs=inputs, tokens=1)


def test_metric_means_are_trls():
    """TRL takes each metric's mean over a micro-batch and averages those means unweighted; Hugging
    Face's evaluation loop weights eval_loss by pairs. Train: chosen logits 0.5 over 20 tokens, then 1.0
    over 200 tokens, log (0.5 + 1.0) / 2 = 0.75 (not the token mean, 0.95). Eval, 5 pairs in micro-batches
    of 2, 2, 1 with losses 0.2, 0.4, 1.5: eval_loss (0.2*2 + 0.4*2 + 1.5) / 5 = 0.54; chosen rewards with
    batch means 0.1, 0.2, 0.9: (0.1 + 0.2 + 0.9) / 3 = 0.4."""
    from raydpo.train_stage.metrics import MetricWindow

    train = MetricWindow(torch.device("cpu"))
    train.add(fake_forward(0.6, [0.1, 0.3], [0.0, 0.0], 0.5, 20, hit_rate=0.5))
    train.add(fake_forward(0.8, [0.2, 0.2], [0.0, 0.5], 1.0, 200, hit_rate=1.0))
    metrics = train.reduce()
    assert metrics["logits/chosen"] == pytest.approx(0.75)
    assert metrics["entropy"] == pytest.approx(0.75)
    assert metrics["mean_token_accuracy"] == pytest.approx(0.75)  # not the token mean, 0.95
    assert metrics["loss"] == pytest.approx(0.7)
    assert metrics["rewards/accuracies"] == pytest.approx(0.75)

    evaluation = MetricWindow(torch.device("cpu"))
    for index, (loss, chosen) in enumerate([(0.2, [0.0, 0.2]), (0.4, [0.1, 0.3]), (1.5, [0.9])]):
        evaluation.add(fake_forward(loss, chosen, [0.0] * len(chosen), 1.0, 4), index)
    metrics = evaluation.reduce(pair_weighted_loss=True)
    assert metrics["loss"] == pytest.approx(0.54)
    assert metrics["rewards/chosen"] == pytest.approx(0.4)
    assert metrics["_pairs"] == 5
