"""Reference log-prob precompute: raydpo against TRL's DPOTrainer(precompute_ref_log_probs=True).

All run in this one process on the same model, data, max_length and batch size: TRL, raydpo with
prefix sharing (each prompt computed once) and raydpo without it. The script prints the data's
prompt:completion token ratio (the gain of sharing depends on it), pairs/s and tokens/s of each (tokens
as TRL counts them, the prompt twice), their ratios (medians over the repeats), the share of each
forward that was padding, and how far apart the sets of values are.

    python benchmarks/precompute.py --pairs 96 --repeats 3               # English multi-turn
    python benchmarks/precompute.py --pairs 96 --repeats 3 --data zh     # Chinese, short prompts
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
    model_dir: Path,
    data_file: Path,
    max_length: int,
    batch_size: int,
    threads: int,
    output: str,
    prefix_sharing: str,
):
    import raydpo

    shutil.rmtree(output, ignore_errors=True)  # a fresh output: a finished one would be a cache hit
    started = time.perf_counter()
    result = raydpo.precompute(
        model=str(model_dir),
        dataset=str(data_file),
        output=output,
        max_length=max_length,
        batch_size=batch_size,
        num_actors=1,
        cpus_per_actor=threads,
        prefix_sharing=prefix_sharing,
    )
    seconds = time.perf_counter() - started
    frame = raydpo.read_output(output).to_pandas()
    stats = result.train.manifest.throughput
    return seconds, len(frame), stats.tokens, stats.padding_fraction, frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024, help="TRL's default")
    parser.add_argument("--batch-size", type=int, default=8, help="TRL's default per-device batch size")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", default=".bench")
    parser.add_argument("--data", choices=["en", "zh"], default="en", help="the bundled sample to use")
    args = parser.parse_args()

    import ray
    import torch

    from raydpo.data import canonical_pair, sharegpt_to_conversational
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
    source = json.loads((sample_data_dir() / f"dpo_{args.data}_demo.json").read_text(encoding="utf-8"))
    rows = [sharegpt_to_conversational(row) for row in source[: args.pairs]]
    data_file = workdir / f"pairs-{args.data}-{args.pairs}.json"  # raydpo reads a file, as from the CLI
    data_file.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    ray.init(num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)  # +1: the tokenize tasks

    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"model: Llama {args.hidden_size}x{args.layers}, {params / 1e6:.1f}M parameters; "
        f"{len(rows)} {args.data} pairs (conversational); max_length {args.max_length}; batch {args.batch_size}"
    )
    runs = {"TRL": [], "raydpo-shared": [], "raydpo-unshared": []}
    frames = {}
    for repeat in range(args.repeats):
        t_sec, t_pairs, t_tokens, t_pad, trl_values = run_trl(
            model_dir, rows, args.max_length, args.batch_size, threads
        )
        runs["TRL"].append((t_pairs / t_sec, t_tokens / t_sec))
        print(
            f"[{repeat + 1}/{args.repeats}] {'TRL':<16}{t_sec:7.1f}s {t_pairs} pairs {t_pairs / t_sec:6.2f} "
            f"pairs/s {t_tokens / t_sec:8.0f} tokens/s, padding {t_pad:.1%}"
        )
        for name, sharing in (("raydpo-shared", "on"), ("raydpo-unshared", "off")):
            r_sec, r_pairs, r_tokens, r_pad, frames[name] = run_raydpo(
                model_dir,
                data_file,
                args.max_length,
                args.batch_size,
                threads,
                str(workdir / "cache"),
                sharing,
            )
            runs[name].append((r_pairs / r_sec, r_tokens / r_sec))
            print(
                f"[{repeat + 1}/{args.repeats}] {name:<16}{r_sec:7.1f}s {r_pairs} pairs {r_pairs / r_sec:6.2f} "
                f"pairs/s {r_tokens / r_sec:8.0f} tokens/s, padding {r_pad:.1%}"
            )

    frame = frames["raydpo-shared"]
    prompt_tokens, completion_tokens = (
        int(frame["prompt_length"].sum()),
        int((frame["chosen_length"] + frame["rejected_length"]).sum()),
    )
    print(
        f"data: {prompt_tokens} prompt tokens, {completion_tokens} completion tokens "
        f"(prompt:completion {prompt_tokens / completion_tokens:.2f}); prompts are "
        f"{2 * prompt_tokens / (2 * prompt_tokens + completion_tokens):.0%} of the tokens TRL computes"
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
    unshared = frames["raydpo-unshared"].set_index("pair_id").loc[by_id.index]
    layout_gap = max(
        (abs(by_id[c] - unshared[c]) / unshared[c].abs().clip(lower=1.0)).max()
        for c in ("ref_chosen_logps", "ref_rejected_logps")
    )
    medians = {
        name: [statistics.median(v[i] for v in values) for i in (0, 1)] for name, values in runs.items()
    }
    for name, (pairs_per_s, tokens_per_s) in medians.items():
        print(f"median {name:<16} {pairs_per_s:6.2f} pairs/s, {tokens_per_s:8.0f} tokens/s")
    for name in ("raydpo-shared", "raydpo-unshared"):
        print(f"ratio {name}/TRL: {medians[name][0] / medians['TRL'][0]:.2f}x pairs/s")
    print(
        f"ratio shared/unshared: {medians['raydpo-shared'][0] / medians['raydpo-unshared'][0]:.2f}x pairs/s"
    )
    print(f"values: shared vs unshared max relative difference {layout_gap:.2e}")
    print(f"values: {len(diffs) // 2} pairs compared, max relative difference {max(diffs):.2e}")
    ray.shutdown()
    sys.exit(0 if diffs and max(diffs) < 1e-4 else 1)


if __name__ == "__main__":
    main()
