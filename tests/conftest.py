"""Shared fixtures: one Ray instance per session, a tiny local model, the real sample data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# s3:// in the tests is a local S3-compatible server (the `s3_server` fixture), never a real store. The
# settings are made here, before Ray starts, because Ray workers inherit the environment of their node.
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT,
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)

# Ray's console log handler (`PlainRayHandler`, made by `import ray` and again by `import ray.data`)
# writes in the driver to the sys.stderr of the moment it was made, not of the moment it writes.
# Made inside a test with capsys, it would keep that test's stream, closed after it, and every later
# Ray log line would print "--- Logging error ---". Made here, it keeps pytest's session-wide stream.
import ray.data  # noqa: E402, F401

from raydpo.data import sharegpt_to_conversational as to_conversational  # noqa: E402, F401
from raydpo.faults import FAULT_DIR_ENV, FAULT_ENV, fired  # noqa: E402
from raydpo.toy import build_toy_model, sample_data_dir  # noqa: E402

RELIABILITY_DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
RELIABILITY_HEADER = """# Reliability: faults and bad input, as the tests found them

Written by the test suite itself (`tests/conftest.py`) at the end of a full run in which every
reliability test passed, so each line below is what a test injected and then observed on this
code. Faults are real: processes are killed with SIGKILL or exit mid-work, files are truncated on
disk; nothing is mocked. Regenerate with the README's test command.

| area | fault or input | how it was injected | what was observed |
| --- | --- | --- | --- |
"""


class ReliabilityLog:
    """What each reliability test injected and observed; becomes docs/reliability.md."""

    def __init__(self):
        self.rows: dict[str, tuple[str, str, str, str]] = {}

    def record(self, key: str, area: str, fault: str, injected: str, observed: str) -> None:
        self.rows[key] = (area, fault, injected, observed)

    def markdown(self) -> str:
        cells = [
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
            for _, row in sorted(self.rows.items())
        ]
        return RELIABILITY_HEADER + "\n".join(cells) + "\n"


RELIABILITY = ReliabilityLog()


@pytest.fixture(scope="session")
def reliability() -> ReliabilityLog:
    """Record a row of docs/reliability.md: `reliability.record(key, area, fault, injected, observed)`."""
    return RELIABILITY


def pytest_collection_modifyitems(config, items):
    config._reliability_total = sum(1 for item in items if "reliability" in item.fixturenames)


def pytest_sessionfinish(session, exitstatus):
    """Rewrite docs/reliability.md after a full, passing run (not after a selection of tests)."""
    config = session.config
    full_run = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    selected = config.option.keyword or config.option.markexpr or not full_run
    total = getattr(config, "_reliability_total", 0)
    if exitstatus == 0 and not selected and total and len(RELIABILITY.rows) >= total:
        RELIABILITY_DOC.write_text(RELIABILITY.markdown(), encoding="utf-8")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return sample_data_dir()


@pytest.fixture(scope="session")
def en_rows(sample_dir) -> list[dict]:
    return json.loads((sample_dir / "dpo_en_demo.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def zh_rows(sample_dir) -> list[dict]:
    return json.loads((sample_dir / "dpo_zh_demo.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with a BPE tokenizer trained on the sample data (ChatML template)."""
    return build_toy_model(tmp_path_factory.mktemp("models") / "toy", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def tokenizer(toy_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_model)


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session, a local one pinned as raydpo pins what it joins."""
    import ray
    import ray.data

    from raydpo.cluster import init_ray

    init_ray("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Ray Data sets up its log handler on its first execution; doing that here, under pytest's
    # session-long capture, keeps it from binding to a test's capsys stream that is closed afterwards
    ray.data.range(1).materialize()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) at S3_ENDPOINT with an empty bucket `raydpo`, started and stopped
    by the tests."""
    import urllib.request

    import pyarrow.fs as pafs

    port = S3_ENDPOINT.rsplit(":", 1)[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{S3_ENDPOINT}/moto-api/", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the S3 server did not start at {S3_ENDPOINT}")
                time.sleep(0.3)
        pafs.S3FileSystem(endpoint_override=S3_ENDPOINT, allow_bucket_creation=True).create_dir("raydpo")
        yield S3_ENDPOINT
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`raydpo ...` in a fresh process, as a user types it: without RAY_ADDRESS (so on its own local Ray
    instance unless told otherwise), with `env` added to this process's environment."""
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "raydpo.cli", *args]
    return subprocess.run(
        command, env={**environment, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def run_cli_on_terminal(*args: str, timeout: float = 600) -> tuple[int, str]:
    """`raydpo ...` with stdout and stderr on a pseudo-terminal, as in a user's shell: returns the exit
    code and what the terminal received (line ends as the program wrote them)."""
    import pty
    import select

    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "raydpo.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**environment, "COLUMNS": "200"},
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break  # exited, and nothing more arrives (a child may still hold the terminal)
                continue
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:  # EIO: every holder of the terminal has closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
    return code, b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


# the ports a Ray node's agents take; each node of a test gets its own (the session's instance holds
# the defaults)
AGENT_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
)


def start_ray_node(
    temp_dir: Path, *args: str, env: dict[str, str], wrapper: tuple[str, ...] = (), timeout: float = 300
) -> subprocess.Popen:
    """`ray start --block ARGS` on 127.0.0.1 with a temp dir and ports of its own (its output goes to
    TEMP_DIR.log), returned once the node runs; the caller stops it with `stop_ray_nodes`. `wrapper` is
    a command prefix the node runs under."""
    log = temp_dir.with_suffix(".log")
    command = [*wrapper, "ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]
    command += ["--disable-usage-stats", f"--node-manager-port={free_port()}"]
    command += [f"--object-manager-port={free_port()}", *[f"--{name}={free_port()}" for name in AGENT_PORTS]]
    with open(log, "w") as output:
        node = subprocess.Popen([*command, *args], env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text():
        if node.poll() is not None or time.monotonic() > deadline:
            stop_ray_nodes(node)
            pytest.fail(f"the Ray node did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    return node


def stop_ray_nodes(*nodes: subprocess.Popen) -> None:
    """Stop nodes `start_ray_node` started (`ray start --block` stops its node's processes on SIGTERM)."""
    for node in nodes:
        node.terminate()
    for node in nodes:
        try:
            node.wait(timeout=120)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def inject(monkeypatch, directory: Path, fault: str) -> None:
    """Arm a fault (`point:n:action[@rank]`, see raydpo.faults) in the processes and Ray workers a test starts."""
    monkeypatch.setenv(FAULT_ENV, fault)
    monkeypatch.setenv(FAULT_DIR_ENV, str(directory))


def kill_when_fired(
    directory: Path, point: str, target=None, ready=None, timeout: float = 300
) -> threading.Thread:
    """Watch for fault `point` to stall its process, then SIGKILL that process (or `target()`'s group),
    once `ready()` (if given) holds."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = fired(directory, point)
            if pid is not None and (ready is None or ready()):
                if target is None:
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.killpg(target(), signal.SIGKILL)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def kill_job_when_fired(
    job: subprocess.Popen, directory: Path, point: str, ready, timeout: float = 180
) -> None:
    """SIGKILL JOB's process group (started with `start_new_session=True`) once fault `point` stalls a
    process of it and `ready()` holds; past TIMEOUT the group is killed anyway, so the test's checks of
    what the job had written fail rather than hang."""
    watcher = kill_when_fired(directory, point, target=lambda: job.pid, ready=ready, timeout=timeout)
    watcher.join(timeout=timeout + 20)
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    assert job.wait(timeout=60) == -signal.SIGKILL
