"""Object storage end to end: the cache, the run output and the checkpoints on s3://, served by a local
S3-compatible server (`s3_server` in conftest). Every test runs in an empty working directory and
checks that nothing was written there: an s3:// location is never turned into a local path."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from conftest import S3_ENDPOINT, inject, kill_job_when_fired, kill_when_fired

import raydpo
from raydpo.cache import DATA_SCHEMA
from raydpo.errors import RaydpoError, TrainingFailed
from raydpo.faults import FAULT_DIR_ENV, FAULT_ENV, fired
from raydpo.train_stage.run_dir import default_storage_name

PAIRS = 16
SETTINGS = {"batch_size": 4, "sort_window": 1, "rows_per_file": 4, "max_length": 256, "limit": PAIRS}
VALUE_COLUMNS = [name for name in DATA_SCHEMA.names if name.startswith("ref_")]


@pytest.fixture(scope="module")
def s3(s3_server) -> pafs.S3FileSystem:
    """The test server's filesystem (credentials from the environment conftest set)."""
    return pafs.S3FileSystem(endpoint_override=s3_server)


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory for the test; it must stay empty."""
    directory = tmp_path / "cwd"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


def precompute_settings(toy_model, sample_dir, output: str) -> dict:
    return {
        "model": str(toy_model),
        "dataset": str(sample_dir / "dpo_en_demo.json"),
        "output": output,
        **SETTINGS,
    }


def keys(s3: pafs.S3FileSystem, prefix: str) -> list[str]:
    """The object keys under bucket/prefix, relative to it."""
    infos = s3.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path.removeprefix(prefix + "/") for info in infos if info.type == pafs.FileType.File)


def frame(output: str):
    return raydpo.read_output(output).to_pandas().set_index("pair_id").sort_index()


@pytest.fixture(scope="module")
def s3_cache(ray_session, s3, toy_model, sample_dir, tmp_path_factory):
    """`raydpo precompute --output s3://raydpo/cache`, run from an empty directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        result = raydpo.precompute(precompute_settings(toy_model, sample_dir, "s3://raydpo/cache"))
    assert list(cwd.iterdir()) == []
    return result


def test_precompute_writes_to_s3_and_a_rerun_reads_it_back(s3_cache, s3, toy_model, sample_dir, workdir):
    """The output lands in the bucket; the same command again is a cache hit read from the bucket's
    manifest; `read_output` opens the URI."""
    assert s3_cache.output == "s3://raydpo/cache" and s3_cache.train.path == "s3://raydpo/cache/train"
    counts = s3_cache.train.counts
    assert counts.read == counts.written + counts.rejected == PAIRS and not s3_cache.train.cached
    stored = keys(s3, "raydpo/cache/train")
    parts = [key for key in stored if key.startswith("data/part-")]
    assert "manifest.json" in stored and "_pending.json" not in stored
    data = [entry for entry in s3_cache.train.manifest.files if entry.is_data]
    assert sorted(parts) == sorted(entry.path for entry in data)  # the manifest lists the bucket's files
    assert sum(entry.rows for entry in data) == counts.written
    assert all(0 < entry.rows <= SETTINGS["rows_per_file"] for entry in data)
    assert not any(Path(key).name.startswith(".") for key in stored)  # no temporary file left behind

    again = raydpo.precompute(precompute_settings(toy_model, sample_dir, "s3://raydpo/cache"))
    assert again.train.cached and again.train.manifest == s3_cache.train.manifest
    split = raydpo.read_output("s3://raydpo/cache")
    assert split.path == "s3://raydpo/cache/train" and split.num_rows == counts.written
    assert len(split.to_pandas()) == counts.written
    assert list(workdir.iterdir()) == []


def settled(s3, prefix: str, quiet: float = 5.0, timeout: float = 60.0) -> list[str]:
    """The keys under PREFIX once they have not changed for QUIET seconds."""
    deadline = time.monotonic() + timeout
    listed, since = keys(s3, prefix), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.5)
        now = keys(s3, prefix)
        if now != listed:
            listed, since = now, time.monotonic()
    return listed


class FailingPartReads(BaseHTTPRequestHandler):
    """Between a client and the S3 server: reads of part files fail (503, as a store under load answers),
    other reads pass through."""

    def do_HEAD(self) -> None:
        self.forward(body=False)

    def do_GET(self) -> None:
        self.forward(body=True)

    def forward(self, body: bool) -> None:
        if "/data/part-" in self.path or "/rejects/part-" in self.path:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = http.client.HTTPConnection(S3_ENDPOINT.removeprefix("http://"), timeout=30)
        upstream.request(self.command, self.path, headers=dict(self.headers))
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():  # a HEAD answer keeps the object's Content-Length
            if name.lower() not in ("transfer-encoding", "connection", "content-length" if body else ""):
                self.send_header(name, value)
        if body:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)
        upstream.close()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def failing_store(s3_server):
    """An S3 endpoint whose part-file reads fail, as `s3://...?endpoint_override=...` query settings."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingPartReads)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"endpoint_override=127.0.0.1:{server.server_address[1]}&scheme=http"
    server.shutdown()
    server.server_close()


def test_precompute_to_s3_resumes_after_a_kill_keeping_parts_through_read_errors(
    s3_cache, s3, toy_model, sample_dir, failing_store, workdir, reliability
):
    """The whole job is SIGKILLed while its scorer stalls, once part files reached the bucket. A resume
    whose part-file reads fail stops with a one-line error and deletes nothing; a part file torn on the
    store is deleted and recomputed; the rerun finishes with the pairs of an undisturbed run."""
    output, prefix = "s3://raydpo/killed", "raydpo/killed/train"
    command = [sys.executable, "-m", "raydpo.cli", "precompute", "--model", str(toy_model)]
    command += ["--dataset", str(sample_dir / "dpo_en_demo.json"), "--output", output]
    for key, value in SETTINGS.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    faults = workdir.parent / "faults"
    faults.mkdir()
    job = subprocess.Popen(
        command,
        env={**env, FAULT_ENV: "precompute.score:4:stall", FAULT_DIR_ENV: str(faults)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    # the scorer (one actor: its calls are counted in one process) stalls in its 4th call; the job is
    # killed once the first calls' pairs are in two data files
    def in_bucket() -> int:
        return sum(key.startswith("data/part-") for key in keys(s3, prefix))

    kill_job_when_fired(job, faults, "precompute.score", ready=lambda: in_bucket() >= 2)
    written = settled(s3, prefix)  # a writer caught mid-upload by the kill may still finish it
    parts = [key for key in written if key.startswith(("data/part-", "rejects/part-"))]
    assert "_pending.json" in written and "manifest.json" not in written and len(parts) >= 2
    data_parts = sum(key.startswith("data/part-") for key in written)
    assert data_parts >= 2, f"{data_parts} data files in the bucket while the scorer stalled in its 4th call"
    with pytest.raises(RaydpoError, match="unfinished"):
        raydpo.read_output(output)

    torn = f"{prefix}/{next(part for part in parts if part.startswith('data/'))}"
    with s3.open_input_stream(torn) as stream:
        whole = stream.read()
    with s3.open_output_stream(torn) as stream:
        stream.write(whole[: len(whole) // 2])  # what a store that lost the end of an upload holds
    settings = precompute_settings(toy_model, sample_dir, output)
    with pytest.raises(RaydpoError, match="it was kept: rerun the same command to resume") as stopped:
        raydpo.precompute(settings, output=f"{output}?{failing_store}")
    assert "\n" not in str(stopped.value)
    assert keys(s3, prefix) == written  # nothing deleted, the torn file neither

    resumed = raydpo.precompute(settings)
    counts = resumed.train.counts
    assert counts.read == counts.written + counts.rejected == PAIRS
    kept = sum(pq_rows(s3, f"{prefix}/{part}") for part in parts if f"{prefix}/{part}" != torn)
    assert counts.resumed == kept and 0 < kept < PAIRS  # the torn file's pairs were recomputed
    got, clean = frame(output), frame(s3_cache.output)
    assert list(got.index) == list(clean.index)
    for column in VALUE_COLUMNS:
        assert (got[column] - clean[column]).abs().max() <= 1e-4, column
    assert list(workdir.iterdir()) == []
    reliability.record(
        "precompute-4-s3-driver-killed",
        "object storage",
        "the job writing to s3:// dies mid-run; a part file is torn on the store; the resume meets read "
        "errors",
        "`raydpo precompute --output s3://...` (local S3-compatible server) is killed with SIGKILL while its "
        "scorer stalls in its 4th call (of 4), with 2 data files in the bucket; one is cut in half on the "
        "store; a rerun through an endpoint that answers part reads with 503, then a plain rerun",
        "the read-error rerun stopped with a one-line 'rerun' error and deleted nothing; the plain rerun "
        f"deleted the torn file, kept {kept} pairs and recomputed {PAIRS - kept - counts.rejected}; "
        "same pair ids and values (1e-4) as an undisturbed run; nothing written to the working directory",
    )


def pq_rows(s3: pafs.S3FileSystem, path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, filesystem=s3).metadata.num_rows


def checkpoint_registered(s3: pafs.S3FileSystem, checkpoints: str, step: int):
    """Whether Ray Train has registered the checkpoint of `step` in a run's checkpoint directory on S3."""

    def registered() -> bool:
        try:
            with s3.open_input_stream(f"{checkpoints}/checkpoint_manager_snapshot.json") as stream:
                return f"checkpoint-{step:08d}" in stream.read().decode()
        except OSError:
            return False

    return registered


def test_train_and_job_on_s3_resume_publish_and_report(
    s3_cache, s3, toy_model, sample_dir, workdir, monkeypatch, tmp_path, reliability
):
    """Training reads the cache from the bucket and keeps run.json, checkpoints and the model there. A run
    whose worker is SIGKILLed after step 1 of 2 stops; the job (`raydpo.run`) with `resume` reuses the
    cache, resumes from the step-1 checkpoint on S3, publishes the model (complete marker last) and writes its
    report and plot to the bucket and to MLflow."""
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    train = {
        "output": "s3://raydpo/run",
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "num_workers": 1,
        "cpus_per_worker": 1,
        "micro_batch_size": 2,
        "max_steps": 2,
        "logging_steps": 1,
        "eval_steps": None,
        "checkpoint_steps": 1,
        "learning_rate": 1e-3,
        "max_failures": 0,
    }
    faults = tmp_path / "faults"
    faults.mkdir()
    inject(monkeypatch, faults, "train.after_step:1:stall")
    name = default_storage_name("s3://raydpo/run")  # the run's own directory in the storage path
    kill_when_fired(
        faults, "train.after_step", ready=checkpoint_registered(s3, f"raydpo/run/checkpoints/{name}", 1)
    )
    with pytest.raises(TrainingFailed, match="--resume"):
        raydpo.train(model=str(toy_model), data=s3_cache.output, **train)
    assert fired(faults, "train.after_step")
    stored = keys(s3, "raydpo/run")
    assert "run.json" in stored and not any(key.startswith("model/") for key in stored)
    with s3.open_input_stream("raydpo/run/run.json") as stream:
        assert json.loads(stream.read())["status"] == "failed"
    assert any(key.startswith(f"checkpoints/{name}/checkpoint-00000001/") for key in stored)

    job = raydpo.run(precompute_settings(toy_model, sample_dir, s3_cache.output), {**train, "resume": True})
    assert job.precompute.train.cached
    assert len(job.train.step_seconds) == 1  # step 2: resumed from the step-1 checkpoint
    assert job.train.model_path == job.report["model_path"] == "s3://raydpo/run/model"
    assert job.report["plot"] == "s3://raydpo/run/training_curves.png"
    stored = keys(s3, "raydpo/run")
    assert {"model/_COMPLETE", "model/model.safetensors", "report.json", "training_curves.png"} <= set(stored)
    with s3.open_input_stream("raydpo/run/report.json") as stream:
        assert json.loads(stream.read())["mlflow_run_id"] == job.train.run_id
    with s3.open_input_stream("raydpo/run/run.json") as stream:
        assert json.loads(stream.read())["status"] == "finished"
    client = MlflowClient(tracking_uri=job.train.tracking_uri)
    artifacts = {artifact.path for artifact in client.list_artifacts(job.train.run_id)}
    assert {"report.json", "training_curves.png"} <= artifacts
    assert "report/train_steps" in client.get_run(job.train.run_id).data.metrics

    local = tmp_path / "model"
    local.mkdir()
    pafs.copy_files("raydpo/run/model", str(local), source_filesystem=s3)
    trained = AutoModelForCausalLM.from_pretrained(local).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(toy_model).state_dict()
    assert trained.keys() == initial.keys()
    assert all(not torch.equal(trained[name], initial[name]) for name in trained)
    assert list(workdir.iterdir()) == []
    reliability.record(
        "train-4-s3-run-stopped",
        "object storage",
        "training with the cache, the run output and the checkpoints on s3:// stops; the job is rerun",
        "a local S3-compatible server; the worker (one: ZeRO stage 0) stalls after step 1 of 2 and is killed with SIGKILL "
        "once the step-1 checkpoint is registered on S3; then `raydpo.run` with `resume`",
        "run.json on S3 said failed and no model was there; the job reused the cache from S3, resumed from "
        "the step-1 checkpoint on S3 and ran step 2; the model (complete marker last), report.json and "
        "the plot are on S3 and in MLflow; the downloaded model loads with every tensor trained; nothing "
        "written to the working directory",
    )


def test_run_output_on_s3_needs_a_tracking_server(s3_cache, s3, toy_model, workdir, monkeypatch):
    """The default MLflow store is a SQLite file in the run directory, which a bucket cannot hold: the run
    stops before it writes anything, in the bucket or here."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RaydpoError, match="--mlflow-tracking-uri"):
        raydpo.train(
            model=str(toy_model), data=s3_cache.output, output="s3://raydpo/untracked", micro_batch_size=2
        )
    assert keys(s3, "raydpo/untracked") == [] and list(workdir.iterdir()) == []
