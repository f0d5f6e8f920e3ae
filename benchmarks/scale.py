"""Precompute and training start-up as the data grows: does the driver's cost stay flat?

The bundled pairs are repeated with distinct ids (JSONL shards of 50k rows) and precomputed on a tiny
model with a short max_length, so the pipeline rather than the model is measured. Each size runs in a
fresh process with its own local Ray instance and prints:

- wall time and pairs/s of the precompute;
- the driver's peak RSS and the peak RSS of the largest Ray worker process (sampled every 0.2 s);
- the number of part files written;
- the time a rerun of the same command takes (a cache hit: fingerprints from the digest cache);
- training start-up: from `raydpo.train` to the start of step 1 (one worker, one step), with the
  streaming shuffle (`shuffle="files"`, the default) and with the full one (`shuffle="full"`).

With `--kill`, the largest size (or `--kill-size N`) is also run as `raydpo precompute`, SIGKILLed when the
scorer stalls in the call after its first quarter of rows, and run again: the rerun's "resumed" count and wall time
show what was not recomputed.

    python benchmarks/scale.py --sizes 10000 100000 1000000 --kill
    python benchmarks/scale.py --sizes --kill --kill-size 300000   # only the kill and the resume
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

SHARD_ROWS = 50_000
MAX_LENGTH = 128
CALL_ROWS = 64 * 8  # rows of a scorer call: the batch size below times the default sort window


def write_data(folder: Path, size: int, language: str) -> Path:
    """SIZE rows in JSONL shards: the bundled pairs repeated, each row with its own id."""
    from raydpo.toy import sample_data_dir

    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    base = json.loads((sample_data_dir() / f"dpo_{language}_demo.json").read_text(encoding="utf-8"))
    lines = [json.dumps(row, ensure_ascii=False) for row in base]
    for shard, start in enumerate(range(0, size, SHARD_ROWS)):
        with open(folder / f"part-{shard:05d}.jsonl", "w", encoding="utf-8") as handle:
            for index in range(start, min(start + SHARD_ROWS, size)):
                row = lines[index % len(lines)]
                handle.write(f'{{"id": "{index}", {row[1:]}\n')
    (folder / "done").touch()
    return folder


class PeakMemory:
    """Peak RSS of this process and of the largest Ray worker process, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil, self.interval = psutil, interval
        self.driver = self.worker = 0
        self.worker_title = ""  # the largest worker's process title at its peak: what it was running
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def _watch(self) -> None:
        me = self.psutil.Process()
        while not self.stopped.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for process in self.psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = process.info["cmdline"] or []
                if cmdline and cmdline[0].startswith("ray::") and process.info["memory_info"]:
                    rss = process.info["memory_info"].rss
                    if rss > self.worker:
                        self.worker, self.worker_title = rss, cmdline[0].split()[0]
            self.stopped.wait(self.interval)


def measure(size: int, data: Path, model: Path, workdir: Path) -> dict:
    """One size, in this process: precompute, a rerun, then training up to step 1."""
    import ray

    import raydpo
    from raydpo import cache

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    output = workdir / "cache"
    settings = {"model": str(model), "dataset": str(data), "output": str(output), "id_column": "id"}
    settings.update(max_length=MAX_LENGTH, num_actors=1, batch_size=64)
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = raydpo.precompute(settings)
        wall = time.perf_counter() - started
    counts = result.train.counts
    files = len(cache.read_manifest(str(output / "train")).files)
    started = time.perf_counter()
    assert raydpo.precompute(settings).train.cached
    rerun = time.perf_counter() - started

    startup = {}
    for shuffle in ("files", "full"):
        started = time.time()  # wall clock, as MLflow stamps metrics
        trained = raydpo.train(
            model=str(model),
            data=str(output),
            output=str(workdir / f"run-{shuffle}"),
            max_steps=1,
            num_workers=1,
            micro_batch_size=2,
            grad_accum=1,
            shuffle=shuffle,
        )
        startup[shuffle] = _step1_start(trained, started)
    ray.shutdown()
    return {
        "size": size,
        "read": counts.read,
        "written": counts.written,
        "wall_s": wall,
        "pairs_per_s": counts.read / wall,
        "driver_peak_mib": memory.driver / 2**20,
        "worker_peak_mib": memory.worker / 2**20,
        "worker_peak_title": memory.worker_title,
        "part_files": files,
        "rerun_s": rerun,
        "startup_files_s": startup["files"],
        "startup_full_s": startup["full"],
    }


def _step1_start(result, started_wall: float) -> float:
    """Seconds from the `train` call to the start of step 1: step 1's metric time less its duration."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=result.tracking_uri).get_metric_history(result.run_id, "loss")
    logged = min(metric.timestamp for metric in history if metric.step == 1) / 1000
    step = result.step_seconds[0] if result.step_seconds else 0.0
    return logged - step - started_wall


def kill_and_resume(size: int, data: Path, model: Path, workdir: Path) -> dict:
    """`raydpo precompute` killed with SIGKILL while its scorer (one actor: its calls are counted in one
    process) stalls in call size / (4 * CALL_ROWS) + 1, about a quarter of the way in, then run again."""
    from raydpo.faults import FAULT_DIR_ENV, FAULT_ENV, fired

    output = workdir / "killed"
    command = [
        sys.executable,
        "-m",
        "raydpo.cli",
        "precompute",
        "--model",
        str(model),
        "--dataset",
        str(data),
    ]
    command += ["--output", str(output), "--id-column", "id", "--max-length", str(MAX_LENGTH)]
    command += ["--num-actors", "1", "--batch-size", "64"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    faults = workdir / "faults"
    faults.mkdir()
    at = max(1, size // (4 * CALL_ROWS)) + 1
    job = subprocess.Popen(
        command,
        env={**env, FAULT_ENV: f"precompute.score:{at}:stall", FAULT_DIR_ENV: str(faults)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started = time.perf_counter()
    while fired(faults, "precompute.score") is None and job.poll() is None:
        time.sleep(0.5)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_after = time.perf_counter() - started
    started = time.perf_counter()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    if rerun.returncode:
        raise SystemExit(f"the resumed run failed: {rerun.stderr[-2000:]}")
    resume_wall = time.perf_counter() - started
    counts = json.loads((output / "train" / "manifest.json").read_text())["counts"]
    return {"killed_after_s": killed_after, "resume_wall_s": resume_wall, **counts}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--data", choices=["en", "zh"], default="zh")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "raydpo-scale")
    parser.add_argument("--kill", action="store_true", help="also kill and resume the largest size")
    parser.add_argument("--kill-size", type=int, help="the size to kill and resume (default: the largest)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure this size
    args = parser.parse_args()

    from raydpo.toy import build_toy_model

    model = args.workdir / "model"
    if not (model / "config.json").exists():
        build_toy_model(model, hidden_size=16, num_layers=1, num_heads=2)
    if args.one is not None:
        data = write_data(args.workdir / f"data-{args.data}-{args.one}", args.one, args.data)
        with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
            print(json.dumps(measure(args.one, data, model, Path(workdir))), flush=True)
        return

    rows = []
    for size in args.sizes:
        data = write_data(args.workdir / f"data-{args.data}-{size}", size, args.data)
        child = [
            sys.executable,
            __file__,
            "--one",
            str(size),
            "--data",
            args.data,
            "--workdir",
            str(args.workdir),
        ]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"size {size} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(format_row(rows[-1]), flush=True)

    if rows:
        first, last = rows[0], rows[-1]
        print(
            f"\n{last['size']} against {first['size']} pairs: driver peak RSS "
            f"{last['driver_peak_mib'] / first['driver_peak_mib']:.2f}x (target <= 1.2x), pairs/s "
            f"{last['pairs_per_s'] / first['pairs_per_s']:.2f}x (target >= 0.95x)"
        )
    if args.kill:
        size = args.kill_size or max(args.sizes)
        data = write_data(args.workdir / f"data-{args.data}-{size}", size, args.data)
        with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
            outcome = kill_and_resume(size, data, model, Path(workdir))
        full = {row["size"]: row["wall_s"] for row in rows}.get(size)
        print(
            f"{size} pairs killed after {outcome['killed_after_s']:.0f} s; the rerun took "
            f"{outcome['resume_wall_s']:.0f} s" + (f" (a full run {full:.0f} s)" if full else "") + ": "
            f"{outcome['resumed']} of {outcome['read']} rows kept, {outcome['read'] - outcome['resumed']} computed"
        )


def format_row(row: dict) -> str:
    return (
        f"{row['size']:>9} pairs: {row['wall_s']:7.1f} s, {row['pairs_per_s']:6.0f} pairs/s, driver peak "
        f"{row['driver_peak_mib']:6.0f} MiB, largest worker {row['worker_peak_mib']:6.0f} MiB "
        f"({row.get('worker_peak_title', '?')}), "
        f"{row['part_files']} part files, rerun {row['rerun_s']:.2f} s, training start-up "
        f"{row['startup_files_s']:.1f} s (shuffle files) / {row['startup_full_s']:.1f} s (full)"
    )


if __name__ == "__main__":
    main()
