"""Reference log-prob precompute: raydpo against TRL's DPOTrainer(precompute_ref_log_probs=True).

Both run in this one process run on the same model, data, max_length and batch size; the script prints
pairs/s and tokens/s of each, their ratio (median over the repeats), the share of each forward that was
padding, and how far apart the two sets of values are.

    python benchmarks/precompute.py --pairs 96 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def conversational(row: dict) -> dict:
    return {
        "prompt": [{"role": ROLE[turn["from"]], "content": turn["value"]} for turn in row["conversations"]],
        "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
    }


def run_trl(model_dir: Path, rows: list[dict], max_length: int, batch_size: int, threads: int):
    """TRL's precompute: tokenization + reference forwards, all inside DPOTrainer's constructor."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    datasets.disable_caching()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        precompute_ref_log_probs=True,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        use_cpu=True,
        bf16=False,
        report_to=[],
    )
    dataset = datasets.Dataset.from_list(rows)
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    seconds = time.perf_counter() - started
    data = trainer.train_dataset
    tokens = sum(  # what the collator feeds the model: each sequence cut to max_length
        min(len(p) + len(c), max_length) + min(len(p) + len(r), max_length)
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
    )
    padded = 0
    for start in range(0, len(data), batch_size):  # TRL's collator pads each batch to its longest sequence
        rows_ = data[start : start + batch_size]
        longest = max(
            min(len(p) + max(len(c), len(r)), max_length)
            for p, c, r in zip(rows_["prompt_ids"], rows_["chosen_ids"], rows_["rejected_ids"], strict=True)
        )
        padded += 2 * longest * len(rows_["prompt_ids"])
    values = {
        json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True, ensure_ascii=False): (
            c,
            r,
        )
        for row, c, r in zip(data, data["ref_chosen_logps"], data["ref_rejected_logps"], strict=True)
    }
    return seconds, len(data), tokens, 1 - tokens / padded, values


def run_raydpo(
    model_dir: Path, rows: list[dict], max_length: int, batch_size: int, threads: int, output: str
):
    import ray.data

    import raydpo

    shutil.rmtree(output, ignore_errors=True)  # a fresh output: a finished one would be a cache hit
    dataset = ray.data.from_items(rows)
    started = time.perf_counter()
    result = raydpo.precompute(
        model=str(model_dir),
        dataset=dataset,
        output=output,
        max_length=max_length,
        batch_size=batch_size,
        num_actors=1,
        cpus_per_actor=threads,
    )
    seconds = time.perf_counter() - started
    frame = raydpo.read_output(output).to_pandas()
    stats = result.train.manifest["throughput"]
    return seconds, len(frame), stats["tokens"], stats["padding_fraction"], frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024, help="TRL's default")
    parser.add_argument("--batch-size", type=int, default=8, help="TRL's default per-device batch size")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", default=".bench")
    args = parser.parse_args()

    import ray
    import torch

    from raydpo.data import canonical_pair
    from raydpo.toy import build_toy_model, sample_data_dir

    threads = os.cpu_count() or 1
    workdir = Path(args.workdir).resolve()
    model_dir = build_toy_model(
        workdir / f"model-{args.hidden_size}x{args.layers}",
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=8,
    )
    params = sum(
        t.numel()
        for t in __import__("safetensors.torch")
        .torch.load_file(str(model_dir / "model.safetensors"))
        .values()
    )
    source = json.loads((sample_data_dir() / "dpo_en_demo.json").read_text(encoding="utf-8"))
    rows = [conversational(row) for row in source[: args.pairs]]
    ray.init(num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)  # +1: the tokenize tasks

    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"model: Llama {args.hidden_size}x{args.layers}, {params / 1e6:.1f}M parameters; "
        f"{len(rows)} English pairs (conversational); max_length {args.max_length}; batch {args.batch_size}"
    )
    ours, theirs = [], []
    for repeat in range(args.repeats):
        t_sec, t_pairs, t_tokens, t_pad, trl_values = run_trl(
            model_dir, rows, args.max_length, args.batch_size, threads
        )
        r_sec, r_pairs, r_tokens, r_pad, frame = run_raydpo(
            model_dir, rows, args.max_length, args.batch_size, threads, str(workdir / "cache")
        )
        theirs.append((t_pairs / t_sec, t_tokens / t_sec))
        ours.append((r_pairs / r_sec, r_tokens / r_sec))
        print(
            f"[{repeat + 1}/{args.repeats}] TRL    {t_sec:7.1f}s {t_pairs} pairs {t_pairs / t_sec:6.2f} pairs/s "
            f"{t_tokens / t_sec:8.0f} tokens/s, padding {t_pad:.1%}"
        )
        print(
            f"[{repeat + 1}/{args.repeats}] raydpo {r_sec:7.1f}s {r_pairs} pairs {r_pairs / r_sec:6.2f} pairs/s "
            f"{r_tokens / r_sec:8.0f} tokens/s, padding {r_pad:.1%}"
        )

    by_id = frame.set_index("pair_id")
    diffs = []
    for key, (chosen, rejected) in trl_values.items():
        prompt, chosen_msgs, rejected_msgs = json.loads(key)
        pair_id = canonical_pair({"prompt": prompt, "chosen": chosen_msgs, "rejected": rejected_msgs}).pair_id
        if pair_id in by_id.index:
            row = by_id.loc[pair_id]
            for ours_value, trl_value in (
                (row["ref_chosen_logps"], chosen),
                (row["ref_rejected_logps"], rejected),
            ):
                diffs.append(abs(ours_value - trl_value) / max(abs(trl_value), 1.0))
    ratio_pairs = statistics.median(o[0] for o in ours) / statistics.median(t[0] for t in theirs)
    ratio_tokens = statistics.median(o[1] for o in ours) / statistics.median(t[1] for t in theirs)
    print(
        f"median TRL:    {statistics.median(t[0] for t in theirs):.2f} pairs/s, "
        f"{statistics.median(t[1] for t in theirs):.0f} tokens/s"
    )
    print(
        f"median raydpo: {statistics.median(o[0] for o in ours):.2f} pairs/s, "
        f"{statistics.median(o[1] for o in ours):.0f} tokens/s"
    )
    print(f"ratio raydpo/TRL: {ratio_pairs:.2f}x pairs/s, {ratio_tokens:.2f}x tokens/s")
    print(f"values: {len(diffs) // 2} pairs compared, max relative difference {max(diffs):.2e}")
    ray.shutdown()
    sys.exit(0 if diffs and max(diffs) < 1e-4 else 1)


if __name__ == "__main__":
    main()
