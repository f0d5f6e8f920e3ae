"""The three ways users run raydpo: `ray job submit` of pipelines/full.py, the CLI, the notebook API;
and the cluster launcher file against Ray's own schema."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import AGENT_PORTS, free_port, run_cli, run_cli_on_terminal
from mlflow import MlflowClient

from raydpo.console import ANSI
from raydpo.tracking import MLFLOW_UI

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_file_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before it starts anything
    assert config["head_node_type"] in config["available_node_types"]
    assert any("pip install" in command for command in config["setup_commands"])
    config["available_node_types"]["gpu_worker"]["node_confg"] = {}  # a typo must not pass
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(config))


@pytest.fixture()
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with token authentication, owned by this test (a child process)."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    # a short temp dir of its own: socket paths are length-limited, and other processes' ray.init()
    # must not find this cluster through the default /tmp/ray/ray_current_cluster
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dashboard = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}"]
        + ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2"]
        + [f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true"]
        # ports of its own: the test session's Ray instance already holds the agents' default ports
        + [f"--{name}={free_port()}" for name in AGENT_PORTS],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answered (401 without the token): the job server is up
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                pytest.fail("the Ray head did not start")
            time.sleep(1)
    yield address, env
    head.terminate()
    head.wait(timeout=120)
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_both_stages(ray_head, tmp_path):
    address, env = ray_head
    without_token = {key: value for key, value in env.items() if not key.startswith("RAY_AUTH")}
    refused = ray_job(
        {**without_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")},
        "list",
        "--address",
        address,
    )
    assert refused.returncode != 0  # the head really enforces token authentication

    overrides = [
        f"smoke.model_dir={tmp_path / 'model'}",
        f"precompute.output={tmp_path / 'cache'}",
        f"train.output={tmp_path / 'run'}",
        "precompute.limit=24",
        "train.max_steps=4",
    ]
    command = ["submit", "--address", address, "--working-dir", str(ROOT), "--no-wait", "--"]
    command += ["python", "pipelines/full.py", *[arg for item in overrides for arg in ("--set", item)]]
    deadline = time.monotonic() + 120
    submitted = ray_job(env, *command)
    while "No available agent" in submitted.stderr and time.monotonic() < deadline:
        time.sleep(3)  # the head's job agent starts after its dashboard answers; Ray says to try again
        submitted = ray_job(env, *command)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr).group(0)
    deadline = time.monotonic() + 900
    status = ""
    while time.monotonic() < deadline:
        answer = ray_job(env, "status", "--address", address, job_id)
        assert answer.returncode == 0, answer.stderr[-2000:]
        status = answer.stdout.upper()  # "Job 'raysubmit_...' succeeded"
        if "SUCCEEDED" in status or "FAILED" in status or "STOPPED" in status:
            break
        time.sleep(5)
    logs = ray_job(env, "logs", "--address", address, job_id).stdout
    assert "SUCCEEDED" in status, logs[-3000:]
    assert "trained 4 steps" in logs and "final_eval_rewards/accuracies" in logs

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["model_path"] == str(tmp_path / "run" / "model")
    assert report["eval_pairs_evaluated"] == report["eval_pairs"] > 0  # every eval pair, over 2 workers
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "token_lengths.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "cache" / "train" / "manifest.json").read_text())
    cut = sum(n for reason, n in manifest["counts"]["reject_reasons"].items() if "fills max_length" in reason)
    assert cut == 0 or any(f"{cut} of 24 rows" in note for note in report["notes"]), report["notes"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 4]
    assert "report/precompute_pairs_per_second" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_curves.png", "token_lengths.png", "report.json"} <= artifacts

    # the run as users see it: MLflow's UI served on the store, in a real browser, from the printed link
    link = re.search(r"MLflow UI: (http://\S+)", logs).group(1)
    with mlflow_ui(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}", tmp_path / "ui.log") as served:
        pages = browse_run(link.replace(MLFLOW_UI, served), run, tmp_path / "screenshots")
    assert pages["run"]["view"] == "machine_learning", pages  # the model-training view, not GenAI traces
    shown = pages["run"]["text"]
    assert "No data available" not in shown
    for expected in (run.info.run_name, "raydpo-cache/train", "Logged models (1)", "Ready", "eval_loss"):
        assert expected in shown, (expected, shown[:3000])
    assert re.search(r"\bbeta\s+0\.1\b", shown) and re.search(r"\blearning_rate\s+0\.0005\b", shown), shown
    assert run.info.run_name in pages["experiment"]["text"]
    for page in pages.values():
        assert page["screenshot"].stat().st_size > 50_000  # a rendered page, not a blank one


@contextlib.contextmanager
def mlflow_ui(store: str, log_path: Path):
    """`mlflow server` on STORE at 127.0.0.1 (a free port) until the block ends; yields its address."""
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1"]
            + ["--port", str(port), "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped with its workers
            # its background job runners are not needed to show runs, and MLflow leaves their store in
            # /dev/shm behind
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/health", timeout=2).read()
                break
            except OSError:  # refused, reset or timed out while the server starts
                assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
        yield address
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:  # uvicorn waits for open connections to close
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as the machine's network is closed: no background connections, no component or sync services
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browse_run(link: str, run, screenshots: Path) -> dict[str, dict]:
    """Open the run's page and its experiment's runs page in headless Chromium; each page's visible text,
    view (the `workflowType` it settled on) and a full-page screenshot."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (`make test` installs Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    screenshots.mkdir(parents=True, exist_ok=True)
    experiment = link.split("/runs/")[0] + "/runs?workflowType=machine_learning"
    pages = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            for name, address, ready in (
                ("run", link, ["Logged models (1)", "eval_loss", "raydpo-cache/train", "learning_rate"]),
                ("experiment", experiment, [run.info.run_name]),
            ):
                page.goto(address)
                for text in ready:  # the UI fills the page as its requests return; it keeps polling
                    page.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
                path = screenshots / f"{name}.png"
                page.screenshot(path=str(path), full_page=True)
                view = re.search(r"workflowType=(\w+)", page.url)
                pages[name] = {
                    "text": page.inner_text("body"),
                    "view": view.group(1) if view else None,
                    "screenshot": path,
                }
        finally:
            browser.close()
    return pages


def test_cli_subcommands_end_to_end(toy_model, sample_dir, tmp_path):
    """`raydpo precompute` then `raydpo train` on the smoke config, in fresh processes, as users type them:
    precompute in a terminal (a live progress line), train into a pipe (plain lines). Each console is
    short and free of the libraries' bookkeeping, which the full log in the output directory keeps."""
    smoke = str(ROOT / "pipelines" / "configs" / "smoke.yaml")
    code, screen = run_cli_on_terminal(
        "precompute",
        "--config",
        smoke,
        "--model",
        str(toy_model),
        "--dataset",
        str(sample_dir / "dpo_en_demo.json"),
        "--output",
        str(tmp_path / "cache"),
        "--set",
        "precompute.limit=24",
        "--max-length",
        "256",
    )
    assert code == 0, screen[-3000:]
    assert "train: 24 rows read" in screen
    assert re.search(r"\r\x1b\[Kprecompute train  0:00:\d\d  \d+ rows read", screen), screen  # redrawn
    status = [line for line in screen.split("\n") if "\x1b[Kprecompute train  " in line][-1]
    assert " 24 rows read  " in status.split("\r\x1b[K")[-1], status  # left standing, complete
    (log,) = (tmp_path / "cache" / "logs").glob("precompute-*.log")
    assert ANSI.sub("", screen).strip().splitlines()[-1] == f"full log: {log}"  # Ray resets colours last
    logged = log.read_text()
    for bookkeeping in ("Execution plan of Dataset", "Data sink CacheSink finished"):
        assert bookkeeping in logged and bookkeeping not in screen
    assert screen.strip().count("\n") < 12, screen  # lines, each status line redrawn within one
    (hint,) = [line for line in ANSI.sub("", screen).splitlines() if line.startswith("next: ")]
    assert hint == f"next: raydpo train --model {toy_model} --data {tmp_path / 'cache'}"

    train = run_cli(
        *shlex.split(hint.removeprefix("next: raydpo ")),  # the command the precompute gave
        "--config",
        smoke,
        "--output",
        str(tmp_path / "run"),
        "--set",
        "train.beta=0.2",
        "--max-steps",
        "2",
        "--eval-steps",
        "none",
        "--checkpoint-steps",
        "none",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "trained 2 steps" in train.stdout and str(tmp_path / "run" / "model") in train.stdout
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["status"] == "finished" and state["config"]["beta"] == 0.2
    assert state["config"]["micro_batch_size"] == 2  # from the smoke config's train section
    shown = train.stdout + train.stderr
    assert "\r" not in shown and "\x1b[K" not in shown  # not a terminal: plain lines
    assert shown.count("step 2/2 (100%)") == 1, shown
    (log,) = (tmp_path / "run" / "logs").glob("train-*.log")
    assert train.stdout.strip().splitlines()[-1] == f"full log: {log}"
    logged = log.read_text()
    assert logged.count("step 2/2 (100%)") == 1, (
        logged
    )  # the log keeps every line: Ray Train's print patch is off
    for bookkeeping in ("Started training worker group", "Setting up process group"):
        assert bookkeeping in logged and bookkeeping not in shown


def notebook_text(notebook) -> str:
    """The text of a notebook's code-cell outputs (streams and plain-text results)."""
    return "\n".join(
        output.get("text", "") or output.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    """It runs under one directory of its own, and its stored outputs carry no machine paths or
    library warnings."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    stored = notebook_text(notebook)
    assert "trained 6 steps" in stored and "WORKDIR" in stored
    assert not any(mark in stored for mark in ("/tmp/", "/home/", "/root/", "WARNING", "Warning"))
    monkeypatch.setenv("RAYDPO_QUICKSTART_DIR", str(tmp_path / "quickstart"))
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert "trained 6 steps" in notebook_text(notebook)
    assert (tmp_path / "quickstart" / "run" / "model" / "model.safetensors").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["quickstart"]  # nothing in its cwd


def test_sweep_reuses_one_precompute(ray_session, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import sweep

    overrides = [
        f"smoke.model_dir={tmp_path / 'model'}",
        f"precompute.output={tmp_path / 'cache'}",
        f"train.output={tmp_path / 'runs'}",
        "precompute.limit=24",
        "train.max_steps=2",
        "train.eval_steps=null",
        "train.checkpoint_steps=null",
    ]
    code = sweep.main(
        [arg for item in overrides for arg in ("--set", item)] + ["--sweep", "train.beta=0.1,0.5"]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    runs = sorted(path.name for path in (tmp_path / "runs").iterdir() if re.match(r"\d\d-", path.name))
    assert runs == ["00-beta=0.1", "01-beta=0.5"]
    manifest = json.loads((tmp_path / "cache" / "train" / "manifest.json").read_text())
    states = [json.loads((tmp_path / "runs" / run / "run.json").read_text()) for run in runs]
    assert [state["config"]["beta"] for state in states] == [0.1, 0.5]
    assert {state["data_key"] for state in states} == {manifest["key"]}  # one cache served both runs
    assert out.count("| beta=") == 2 and "eval_rewards/accuracies" in out
    assert {state["tracking_uri"] for state in states} == {f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"}
    client = MlflowClient(tracking_uri=states[0]["tracking_uri"])
    experiment = client.get_experiment_by_name("raydpo-sweep")
    found = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_id for run in found) == sorted(state["run_id"] for state in states)


def test_job_configs_are_checked_whole_before_any_work(tmp_path, capsys):
    """A misspelled section of a job config, or a bad value in any point of a sweep, stops the job with
    one line before it starts anything."""
    sys.path.insert(0, str(ROOT / "pipelines"))
    import full
    import sweep

    config = tmp_path / "job.yaml"
    config.write_text(f"precompute:\n  model: {tmp_path}\ntrian:\n  beta: 0.2\n")
    assert full.main(["--config", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "full.py: error: unknown section 'trian' in the job config: its sections are precompute, train, smoke"
    ]
    overrides = [f"smoke.model_dir={tmp_path / 'model'}", f"train.output={tmp_path / 'runs'}"]
    argv = [arg for item in overrides for arg in ("--set", item)] + ["--sweep", "train.beta=0.1,-1"]
    assert sweep.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "sweep.py: error: beta must be > 0, got -1.0"
    assert not list((tmp_path / "runs").glob("0*"))  # no point ran
