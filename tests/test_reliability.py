"""Precompute under real faults: a scorer actor and the whole driver are killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import inject, kill_job_when_fired, kill_when_fired, run_cli, to_conversational, write_jsonl

import raydpo
from raydpo.cache import DATA_SCHEMA
from raydpo.faults import FAULT_DIR_ENV, FAULT_ENV, fired

PAIRS = 24
SETTINGS = {"batch_size": 4, "sort_window": 1, "rows_per_file": 4, "max_length": 256}
VALUE_COLUMNS = [name for name in DATA_SCHEMA.names if name.startswith("ref_")]
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


@pytest.fixture(scope="module")
def pairs_file(en_rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "pairs.jsonl"
    return write_jsonl(path, [to_conversational(row) for row in en_rows[:PAIRS]])


@pytest.fixture(scope="module")
def clean(ray_session, toy_model, pairs_file, tmp_path_factory):
    """The output of an undisturbed run, sorted by pair id."""
    output = tmp_path_factory.mktemp("faults") / "clean"
    raydpo.precompute(model=str(toy_model), dataset=str(pairs_file), output=str(output), **SETTINGS)
    return frame(output)


def frame(output: Path):
    return raydpo.read_output(str(output)).to_pandas().set_index("pair_id").sort_index()


def compare(output: Path, clean) -> dict[str, int]:
    """Every pair of the clean run exactly once, with the same tokens and values; returns lost/duplicated."""
    got = frame(output)
    lost = len(set(clean.index) - set(got.index))
    duplicated = int(got.index.duplicated().sum())
    assert lost == 0 and duplicated == 0 and list(got.index) == list(clean.index)
    for column in TOKEN_COLUMNS:
        assert [list(ids) for ids in got[column]] == [list(ids) for ids in clean[column]]
    for column in VALUE_COLUMNS:
        gap = (got[column] - clean[column]).abs().max()
        assert gap <= 1e-4, f"{column} differs by up to {gap}"
    return {"lost": lost, "duplicated": duplicated}


def test_scorer_actor_killed_mid_run(
    ray_session, toy_model, pairs_file, clean, tmp_path, monkeypatch, reliability
):
    """The scorer actor stalls in its second batch and is SIGKILLed; Ray restarts it and retries the batch."""
    inject(monkeypatch, tmp_path, "precompute.score:2:stall")
    watcher = kill_when_fired(tmp_path, "precompute.score")
    result = raydpo.precompute(
        model=str(toy_model), dataset=str(pairs_file), output=str(tmp_path / "out"), **SETTINGS
    )
    watcher.join(timeout=5)
    assert fired(tmp_path, "precompute.score") is not None
    counts = result.train.counts
    assert counts.read == counts.written + counts.rejected == PAIRS
    assert result.train.manifest.throughput.scorer_restarts == 1  # counted, and said at the end
    assert ", 1 scorer restart (" in result.train.summary()
    outcome = compare(tmp_path / "out", clean)
    reliability.record(
        "precompute-1-scorer-killed",
        "precompute",
        "a scorer actor dies mid-run",
        "the actor stalls in its 2nd batch (of 6) and is killed with SIGKILL from outside",
        f"Ray restarted the actor and retried the batch; {counts.read} pairs in, {counts.written} "
        f"written + {counts.rejected} rejected; lost {outcome['lost']}, duplicated {outcome['duplicated']}; "
        "tokens identical and values within 1e-4 of a clean run",
    )


def test_scorer_dead_beyond_its_restarts_fails_the_run_with_one_line(toy_model, pairs_file, tmp_path):
    """A scorer that dies and may not be restarted (`--max-actor-restarts 0`) fails the run: exit code 1,
    one line that says which process died where, and that a rerun keeps the pairs written, after the
    log's path; the log holds the whole error, and the console none of Ray Data's tracebacks."""
    output = tmp_path / "out"
    command = ["precompute", "--model", str(toy_model), "--dataset", str(pairs_file), "--output", str(output)]
    for key, value in SETTINGS.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    fault = {FAULT_ENV: "precompute.score:2:exit", FAULT_DIR_ENV: str(tmp_path)}
    ran = run_cli(*command, "--max-actor-restarts", "0", env=fault, timeout=300)
    assert ran.returncode == 1, ran.stderr[-3000:]
    *_, log_line, line = ran.stderr.strip().splitlines()
    assert re.fullmatch(
        r"raydpo precompute: precompute failed: a scorer actor's process died \(pid \d+ on [\d.]+: Worker "
        r"unexpectedly exits[^)]*\) and --max-actor-restarts 0 allows no more restarts; the usual causes "
        r"are the OOM killer, .*; rerun the same command to resume: the pairs "
        rf"written to {re.escape(str(output / 'train'))} are kept",
        line,
    ), line
    assert "Traceback" not in ran.stdout + ran.stderr and "Full stack trace" not in ran.stderr
    log = Path(log_line.removeprefix("full log: ")).read_text()
    assert log_line.startswith("full log: ") and "Traceback" in log and "ActorDiedError" in log
    assert not (output / "train" / "manifest.json").exists()


def test_driver_killed_mid_run_resumes_to_a_clean_result(toy_model, pairs_file, clean, tmp_path, reliability):
    """The whole job (driver, its local Ray instance, every actor) is SIGKILLed while its scorer stalls in
    its 4th call, once the pairs of the first calls are in part files (the input is one block: each call's
    pairs are written as they are scored, not when the whole block is); the same command run again
    recomputes only the missing pairs."""
    output = tmp_path / "out"
    command = [sys.executable, "-m", "raydpo.cli", "precompute", "--model", str(toy_model)]
    command += ["--dataset", str(pairs_file), "--output", str(output)]
    for key, value in SETTINGS.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    faulty = {**env, FAULT_ENV: "precompute.score:4:stall", FAULT_DIR_ENV: str(tmp_path)}
    job = subprocess.Popen(
        command, env=faulty, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    split = output / "train"

    def written() -> int:
        return len(list((split / "data").glob("part-*.parquet")))

    kill_job_when_fired(job, tmp_path, "precompute.score", ready=lambda: written() >= 2)
    assert not (split / "manifest.json").exists() and (split / "_pending.json").exists()
    kept = written()
    assert kept >= 2, f"{kept} part files written while the scorer stalled in its 4th call"
    with pytest.raises(raydpo.RaydpoError, match="unfinished"):
        raydpo.read_output(str(output))

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = json.loads((split / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["read"] == counts["written"] + counts["rejected"] == PAIRS
    assert 0 < counts["resumed"] < PAIRS  # only the pairs of files not yet written were recomputed
    outcome = compare(output, clean)
    reliability.record(
        "precompute-2-driver-killed",
        "precompute",
        "the whole job dies mid-run; the operator reruns the same command",
        "`raydpo precompute` (driver and its local Ray instance) is killed with SIGKILL (process group) while "
        "its scorer stalls in its 4th call (of 6), after the first calls' pairs are written, then run again",
        "after the kill: no manifest, `read_output` refuses the directory as unfinished; the rerun kept the "
        f"written files and recomputed the rest; {counts['read']} pairs in, {counts['written']} written + "
        f"{counts['rejected']} rejected; lost {outcome['lost']}, duplicated {outcome['duplicated']}; tokens "
        "identical and values within 1e-4 of a clean run",
    )


def test_fault_spec_is_checked_before_workers_start(monkeypatch, tmp_path):
    """A malformed spec or a missing marker directory is an error when the workers' environment is built;
    only the two fault variables are forwarded."""
    from raydpo.cluster import worker_env

    monkeypatch.setenv("RAYDPO_OTHER", "1")
    inject(monkeypatch, tmp_path, "train.after_step:4:stall@1")
    assert worker_env() == {
        "env_vars": {FAULT_ENV: "train.after_step:4:stall@1", FAULT_DIR_ENV: str(tmp_path)}
    }
    for spec in (
        "train.after_step:4",
        "train.after_step:0:stall",
        "train.after_step:1:crash",
        "x:1:exit@last",
    ):
        monkeypatch.setenv(FAULT_ENV, spec)
        with pytest.raises(raydpo.RaydpoError, match="expected <point>:<n>:<action>"):
            worker_env()
    monkeypatch.setenv(FAULT_ENV, "train.after_step:1:exit")
    monkeypatch.delenv(FAULT_DIR_ENV)
    with pytest.raises(raydpo.RaydpoError, match=FAULT_DIR_ENV):
        worker_env()
