"""DPO training step time and peak memory: raydpo against TRL's DPOTrainer, in one run.

Runs on the same model, pairs, max_length and pairs per step:
  - TRL, reference model online (a second model in memory and a second forward per step), in
    `--workers` torchrun processes of one thread (DDP over gloo),
  - TRL with precompute_ref_log_probs=True (reference forwards before training, in the trainer),
  - raydpo train as the CLI runs it without --num-workers (one worker per node on CPUs, on all of
    its cores, so ZeRO stage 0 here: one worker has nothing to partition), reference values read
    from the precompute output, with prefix sharing (each prompt computed once, the default) and
    without it (`raydpo-unshared`),
and, in the other layout of each (`--layout-runs 0` skips these):
  - TRL online in one process of `--workers` torch threads, micro batch x workers (`trl-online-1p`),
  - raydpo train on `--workers` workers of one thread, ZeRO-3 over them (`raydpo-Nw`),
  - the same with each worker's own micro-batches, not regrouped into micro-batches of near-equal
    token counts (`raydpo-Nw-unbalanced`, balance_ranks off; `--unbalanced-run 0` skips it),
and, to separate the allocator from the rest (raydpo's CPU workers run mimalloc by default):
  - raydpo train with cpu_allocator="system" (glibc's malloc, as TRL runs),
  - TRL online with mimalloc preloaded as raydpo preloads it (`--allocator-runs 0` skips these two).
Printed: the median step time over the steps after warmup, the peak memory of the largest process
(GPU memory allocated, or peak RSS on CPUs) in total and above what the process held before the
model loaded (on CPUs, the libraries' own footprint: Ray's worker runtime is larger than a torchrun
process), and the ratios.

    python benchmarks/train.py --pairs 64 --steps 10 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

WARMUP_STEPS = 2  # excluded from the median: first-step allocations, DeepSpeed/DDP bucket set-up


def trl_worker(args: argparse.Namespace) -> None:
    """One torchrun process of TRL's DPOTrainer; rank 0 writes step times and peak memory as JSON."""
    import datasets
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    memory_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref_model = None if args.mode == "precompute" else AutoModelForCausalLM.from_pretrained(args.model)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started, self.seconds = 0.0, []

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

    timer = StepTimer()
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        precompute_ref_log_probs=args.mode == "precompute",
        per_device_train_batch_size=args.micro_batch,
        max_length=args.max_length,
        max_steps=args.steps,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to=[],
        seed=42,
        dataloader_drop_last=True,
    )
    started = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=datasets.load_from_disk(args.rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    wall = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = torch.tensor([rss, rss - memory_at_start], dtype=torch.float64)  # as raydpo's worker measures
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if int(os.environ.get("RANK", "0")) == 0:
        figures = {"peak_memory_gb": peak[0].item(), "peak_memory_above_start_gb": peak[1].item()}
        Path(args.out).write_text(json.dumps({"step_seconds": timer.seconds, "wall_s": wall, **figures}))


def run_trl(
    mode: str,
    args: argparse.Namespace,
    model_dir: Path,
    rows_file: Path,
    workdir: Path,
    env_vars=None,
    processes: int | None = None,
) -> dict:
    """TRL under torchrun: `args.workers` processes of one thread, or `processes` processes sharing
    as many threads and taking the same pairs per step."""
    processes = processes or args.workers
    threads = args.workers // processes
    out = workdir / f"trl-{mode}.json"
    out.unlink(missing_ok=True)
    # a fresh copy of the data on disk for every run: in-memory datasets get a private temporary cache
    # per process, which TRL's main-process-first preparation cannot share between ranks
    data = Path(tempfile.mkdtemp(dir=workdir)) / "rows"
    shutil.copytree(rows_file, data)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    command += [__file__, "--trl-worker", "--mode", mode, "--model", str(model_dir), "--rows", str(data)]
    command += [
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--micro-batch",
        str(args.micro_batch * threads),
    ]
    command += ["--max-length", str(args.max_length), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env_vars or {})}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_raydpo(
    args: argparse.Namespace,
    model_dir: Path,
    cache: Path,
    workdir: Path,
    cpu_allocator: str = "mimalloc",
    prefix_sharing: str = "auto",
    balance_ranks: bool = True,
    workers: int | None = None,
) -> dict:
    """raydpo train on `workers` workers, or as many as it takes without --num-workers; the workers
    share the machine's threads and take `args.workers` x `args.micro_batch` pairs per step."""
    import raydpo
    from raydpo.resources import default_workers

    count = workers or default_workers(use_gpu=False)[0]

    output = workdir / "run"
    started = time.perf_counter()
    result = raydpo.train(
        model=str(model_dir),
        data=str(cache),
        output=str(output),
        num_workers=workers,
        cpus_per_worker=0.5,  # leaves a CPU for Ray Data; threads are the cores shared among the workers
        micro_batch_size=args.micro_batch * args.workers // count,
        max_steps=args.steps,
        learning_rate=1e-5,
        logging_steps=1,
        checkpoint_steps=None,
        max_failures=0,
        overwrite=True,
        cpu_allocator=cpu_allocator,
        prefix_sharing=prefix_sharing,
        balance_ranks=balance_ranks,
    )
    wall = time.perf_counter() - started
    return {
        "step_seconds": result.step_seconds,
        "peak_memory_gb": result.metrics["peak_memory_gb"],
        "peak_memory_above_start_gb": result.metrics["peak_memory_above_start_gb"],
        "wall_s": wall,
    }


def median_step(run: dict) -> float:
    return statistics.median(run["step_seconds"][WARMUP_STEPS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=768, help="large enough that model state, not")
    parser.add_argument(
        "--layers", type=int, default=6, help="the libraries' import overhead, dominates memory"
    )
    optional_runs = {
        "--allocator-runs": "raydpo with the system allocator and TRL online with mimalloc",
        "--layout-runs": "TRL online in one process of all the threads and raydpo on --workers workers",
        "--unbalanced-run": "raydpo on --workers workers with their own micro-batches (balance_ranks off)",
    }
    for flag, runs in optional_runs.items():
        parser.add_argument(flag, type=int, choices=(0, 1), default=1, help=f"also run {runs} (0: skip)")
    parser.add_argument("--workdir", default=".bench/train")
    parser.add_argument("--data", choices=["en", "zh"], default="en", help="the bundled sample to use")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return

    import ray
    import torch

    import raydpo
    from raydpo.data import sharegpt_to_conversational
    from raydpo.resources import cpu_allocator_env, default_workers
    from raydpo.toy import build_toy_model, sample_data_dir

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_toy_model(
        workdir / f"model-{args.hidden_size}x{args.layers}",
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=8,
    )
    source = json.loads((sample_data_dir() / f"dpo_{args.data}_demo.json").read_text(encoding="utf-8"))
    rows = [sharegpt_to_conversational(row) for row in source[: args.pairs]]
    import datasets

    rows_file = workdir / "rows"
    shutil.rmtree(rows_file, ignore_errors=True)
    datasets.Dataset.from_list(rows).save_to_disk(str(rows_file))

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cache = workdir / "cache"
    started = time.perf_counter()
    precomputed = raydpo.precompute(
        model=str(model_dir),
        dataset=ray.data.from_items(rows),
        output=str(cache),
        max_length=args.max_length,
        cpus_per_actor=max(1, (os.cpu_count() or 2) - 1),
        overwrite=True,
    )
    precompute_s = time.perf_counter() - started
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; model: Llama {args.hidden_size}x{args.layers}; "
        f"{precomputed.train.counts.written} pairs, max_length {args.max_length}; {args.workers} processes x "
        f"micro batch {args.micro_batch}; {args.steps} steps, median over steps {WARMUP_STEPS + 1}-{args.steps}"
    )
    workers = default_workers(use_gpu=False)[0]
    print(
        f"raydpo without --num-workers: {workers} worker(s) x micro batch "
        f"{args.micro_batch * args.workers // workers}, the same pairs per step"
    )
    print(f"raydpo precompute (once, reusable by every run): {precompute_s:.1f}s")
    lengths = raydpo.read_output(str(cache)).to_pandas()
    prompt_tokens = int(lengths["prompt_length"].sum())
    completion_tokens = int((lengths["chosen_length"] + lengths["rejected_length"]).sum())
    print(
        f"data: {prompt_tokens} prompt tokens, {completion_tokens} completion tokens (prompt:completion "
        f"{prompt_tokens / completion_tokens:.2f}); prompts are "
        f"{2 * prompt_tokens / (2 * prompt_tokens + completion_tokens):.0%} of the tokens a two-row step computes"
    )

    runners = {
        "trl-online": lambda: run_trl("online", args, model_dir, rows_file, workdir),
        "trl-precompute": lambda: run_trl("precompute", args, model_dir, rows_file, workdir),
        "raydpo": lambda: run_raydpo(args, model_dir, cache, workdir),  # prefix sharing: auto (on)
        "raydpo-unshared": lambda: run_raydpo(args, model_dir, cache, workdir, prefix_sharing="off"),
    }
    several = f"raydpo-{args.workers}w"
    if args.layout_runs:
        runners["trl-online-1p"] = lambda: run_trl("online", args, model_dir, rows_file, workdir, processes=1)
        runners[several] = lambda: run_raydpo(args, model_dir, cache, workdir, workers=args.workers)
    if args.layout_runs and args.unbalanced_run:
        runners[f"{several}-unbalanced"] = lambda: run_raydpo(
            args, model_dir, cache, workdir, balance_ranks=False, workers=args.workers
        )
    if args.allocator_runs:
        runners["raydpo-system"] = lambda: run_raydpo(args, model_dir, cache, workdir, cpu_allocator="system")
        # expanded as Ray expands a runtime env's variables: ${VAR} from this environment, or empty
        mimalloc = {
            key: re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(value)).strip()
            for key, value in cpu_allocator_env("mimalloc").items()
        }
        runners["trl-online-mi"] = lambda: run_trl("online", args, model_dir, rows_file, workdir, mimalloc)
    results: dict[str, list[dict]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        for name, runner in runners.items():
            results[name].append(runner())
        for name, runs in results.items():
            run = runs[-1]
            print(
                f"[{repeat + 1}/{args.repeats}] {name:17s} step {median_step(run):6.3f}s  "
                f"peak {run['peak_memory_gb']:5.2f} GiB ({run['peak_memory_above_start_gb']:5.2f} above start)  "
                f"wall {run['wall_s']:6.1f}s"
            )
    summary = {
        name: [
            statistics.median(median_step(r) for r in runs),
            statistics.median(r["peak_memory_gb"] for r in runs),
            statistics.median(r["peak_memory_above_start_gb"] for r in runs),
        ]
        for name, runs in results.items()
    }
    for name, (step, peak, above) in summary.items():
        print(f"median {name:17s} step {step:6.3f}s  peak {peak:5.2f} GiB  above start {above:5.2f} GiB")
    for name in [name for name in summary if name.startswith("raydpo")]:
        ours = summary[name]
        for peer in [peer for peer in summary if peer.startswith("trl")]:
            theirs = summary[peer]
            print(
                f"{name} vs {peer}: {theirs[0] / ours[0]:.2f}x faster per step; peak memory "
                f"{ours[1] / theirs[1]:.2f}x, above start {ours[2] / theirs[2]:.2f}x"
            )
    for name in [name for name in summary if name.startswith("raydpo-")]:
        print(f"raydpo vs {name}: {summary[name][0] / summary['raydpo'][0]:.2f}x faster per step")
    if f"{several}-unbalanced" in summary:
        ratio = summary[f"{several}-unbalanced"][0] / summary[several][0]
        print(f"{several} vs {several}-unbalanced: {ratio:.2f}x faster per step")
    ray.shutdown()


if __name__ == "__main__":
    main()
