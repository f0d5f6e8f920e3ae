"""What a command shows: the console less the libraries' noise, status lines in place on a terminal,
and the whole output in a log file kept with the command's output."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raydpo import console


def _drain(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.mark.parametrize("terminal", [False, True])
def test_console_filters_noise_and_repeats_and_keeps_status_lines(terminal):
    out_read, out_write = os.pipe()
    log = io.StringIO()
    screen = console.Console(out_write, log, terminal=terminal)
    lines = [
        "2026-12-02 00:40:09,402\tINFO streaming_executor.py:215 -- Starting execution of Dataset d_0. Full",
        "\x1b[36m(RayTrainWorker pid=7)\x1b[0m step 1/8 (12%)  loss 0.6931  accuracy 0.00",
        "\x1b[36m(RayTrainWorker pid=7)\x1b[0m step 1/8 (12%)  loss 0.6931  accuracy 0.00",  # Ray Train's repeat
        "\x1b[36m(RayTrainWorker pid=7)\x1b[0m step 2/8 (25%)  loss 0.7453  accuracy 0.50",
        "\x1b[36m(RayTrainWorker pid=7)\x1b[0m Checkpoint successfully created at: Checkpoint(...)",
        # Ray Train's records of a worker failure, which raydpo's own line reports
        "(TrainController pid=9) [FailurePolicy] RETRY",
        "(TrainController pid=9)   Error count: 1 (max allowed: 1)",
        "(RayTrainWorker pid=8) a line of another process meanwhile",
        "(TrainController pid=9) The actor died unexpectedly before finishing this task.",
        "(TrainController pid=9) ray.train.WorkerGroupError: Training failed due to worker errors:",
        "(TrainController pid=9) The actor died unexpectedly before finishing this task.",  # its message again
        "(TrainController pid=9) Graceful shutdown of backend failed. This is expected if one of the workers",
        "(TrainController pid=9) Traceback (most recent call last):",
        "(TrainController pid=9)     raise value",
        "(TrainController pid=9) ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing",
        "(TrainController pid=9) raydpo: worker failure 1: the process of worker rank 0 died (pid 8 on ...)",
        "a warning the user should read",
        "(pid=gcs_server) [2026-12-03 13:47:56,834 E 7282 7282] (gcs_server) gcs_actor_scheduler.cc:538: Failed to "
        "kill actor 00c4, return status: Invalid: KillActor RPC failed for actor 00c4: RpcError: RPC error: Socket "
        "closed rpc_code: 14",
        "Loading weights:   0%|  | 0/21 [00:00<?, ?it/s]\rLoading weights: 100%|##| 21/21 [00:00<00:00]",
    ]
    for line in lines:
        screen.line(line, out_write)
    screen.status("precompute train  0:00:03  64 rows read")
    screen.status("precompute train  0:00:09  64 rows read  63 scored", final=True)
    shown = _drain(out_read)

    logged = log.getvalue().splitlines()
    assert logged[0].endswith("Starting execution of Dataset d_0. Full")  # everything reaches the log,
    assert logged[1] == logged[2] == "(RayTrainWorker pid=7) step 1/8 (12%)  loss 0.6931  accuracy 0.00"
    assert logged[-3] == "Loading weights: 100%|##| 21/21 [00:00<00:00]"  # a redrawn bar's last state
    assert "Starting execution" not in shown and "Checkpoint successfully" not in shown
    assert "Loading weights" not in shown and "Failed to kill actor" not in shown
    assert shown.count("step 1/8") == 1  # a repeated line is shown once
    assert "a warning the user should read\n" in shown
    assert "FailurePolicy" not in shown and "Traceback" not in shown and "actor died" not in shown
    assert "(RayTrainWorker pid=8) a line of another process meanwhile\n" in shown
    assert "(TrainController pid=9) raydpo: worker failure 1:" in shown  # after the blocks, shown again
    assert sum("TrainController" in line for line in logged) == 10  # the log keeps every line
    if terminal:
        # a status line is redrawn in place; the next ordinary line leaves it standing and goes below
        assert "\r\x1b[K\x1b[36m" not in shown  # colour codes stay out of the status line's text
        assert "\r\x1b[K(RayTrainWorker pid=7) step 2/8 (25%)  loss 0.7453  accuracy 0.50\n" in shown
        assert shown.endswith(
            "\r\x1b[Kprecompute train  0:00:03  64 rows read"
            "\r\x1b[Kprecompute train  0:00:09  64 rows read  63 scored\n"
        )
    else:
        assert "\r" not in shown and "\x1b" not in shown
        assert "(RayTrainWorker pid=7) step 2/8 (25%)  loss 0.7453  accuracy 0.50\n" in shown
        assert shown.endswith("precompute train  0:00:09  64 rows read  63 scored\n")


COMMAND = r"""
import os, subprocess, sys
from raydpo import console
from raydpo.console import run_command
from raydpo.errors import RaydpoError, TrainingFailed

def command():
    console.keep_log_in(sys.argv[1])
    print("from python")
    subprocess.run([sys.executable, "-c", "import os; os.write(2, b'from a child process\\n')"], check=True)
    if sys.argv[2] != "pass":
        os.makedirs(sys.argv[1])
    if sys.argv[2] == "bad":
        raise RaydpoError("the input is wrong")
    if sys.argv[2] == "failed":
        raise TrainingFailed("the run failed")

sys.exit(run_command("raydpo test", command, log="test"))
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COMMAND, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("outcome", "code", "error"),
    [("failed", 1, "raydpo test: the run failed"), ("bad", 2, "raydpo test: error: the input is wrong")],
)
def test_run_log_keeps_everything_printed_in_the_output(tmp_path, outcome, code, error):
    """Python's prints, a child process writing to the inherited descriptors, and the error that ended the
    command go to OUTPUT/logs/NAME-<time>.log. A failed run names it just before its error line; bad
    input keeps its one line."""
    output = tmp_path / "out"
    ran = _run(str(output), outcome)
    assert ran.returncode == code, ran.stderr
    assert "from python" in ran.stdout and "from a child process" in ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert lines[-1] == error
    (kept,) = (output / "logs").glob("test-*.log")
    assert ("full log: " in ran.stderr) == (code == 1)
    if code == 1:
        assert lines[-2] == f"full log: {kept}"
    text = kept.read_text()
    for line in ("from python", "from a child process", error):
        assert line in text


def test_run_log_stays_in_the_temp_dir_when_the_output_is_missing(tmp_path):
    ran = _run(str(tmp_path / "never-made"), "pass")
    assert ran.returncode == 0, ran.stderr
    out = ran.stdout.strip().splitlines()
    assert out[0] == "from python" and out[-1].startswith("full log: ")
    path = Path(out[-1].removeprefix("full log: "))
    assert path.parent.name == "raydpo-logs" and "from a child process" in path.read_text()
    path.unlink()
