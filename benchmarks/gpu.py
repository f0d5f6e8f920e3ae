"""The two hot paths of raydpo on one GPU, in bf16, beside the way TRL computes the same values.

A model of Qwen2-0.5B's shape (random weights, built locally: nothing is downloaded) scores and trains
on synthetic pairs of a fixed token budget. Measured with torch and transformers alone, so it runs on
a bare GPU image:

  - precompute: the reference scorer's forward (`raydpo.logprobs.completion_logps`: the LM head and
    log-softmax over completion positions only, in chunks) against TRL's forward: where TRL is
    installed, its own (`add_fused_lm_head`, `fused_lm_head=True`, as `DPOTrainer` calls it), and the
    full-logits forward of earlier TRL versions (`[2B, T, vocab]` logits, `selective_log_softmax`);
  - training: one optimizer step of the policy (chunked head, the sigmoid DPO loss against cached
    reference values, backward, AdamW) against TRL's online step (a reference forward, then the
    policy's, then the same loss, backward and AdamW), in both TRL forms.

Printed for each: tokens/s (prompt + completion tokens of both sequences of a pair, padding excluded),
model FLOP utilisation (6·N FLOPs per trained token, 2·N per scored token, plus attention, over the
GPU's dense bf16 peak) and peak GPU memory, with the medians over the timed iterations and the ratios.
Each attention kernel that loads is measured (sdpa, and flash_attention_2 where installed).

With `--full` (where Ray, DeepSpeed and MLflow are installed) it also runs the two stages themselves on
the bundled pairs: `raydpo.precompute` on one GPU actor and `raydpo.train` on one GPU worker, and prints
their own throughput figures and peak memory.

    python benchmarks/gpu.py                      # on a GPU: Qwen2-0.5B shape, bf16
    python benchmarks/gpu.py --device cpu --size tiny --iters 2   # a quick check that it runs
    python benchmarks/gpu.py --full               # also the stages, under Ray and DeepSpeed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # raydpo from the working tree

from raydpo import attention  # noqa: E402
from raydpo.layout import pack_batch, pack_pairs  # noqa: E402
from raydpo.logprobs import attention_mode, completion_logps, packs_rows, use_prefix_sharing  # noqa: E402
from raydpo.losses import LossInputs, LossSettings, preference_loss  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs this is run on; --peak-tflops overrides.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}

SIZES = {
    # Qwen2-0.5B's published config
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


@dataclass
class Pairs:
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def batch(self, start: int, size: int) -> tuple[list[list[int]], ...]:
        rows = slice(start, start + size)
        return self.prompts[rows], self.chosen[rows], self.rejected[rows]

    def tokens(self, start: int, size: int) -> int:
        prompts, chosen, rejected = self.batch(start, size)
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True))


def synthetic_pairs(count: int, prompt_len: int, completion_len: int, vocab: int, seed: int) -> Pairs:
    """Random token ids; lengths vary by up to a quarter around the given ones, as real pairs do."""
    generator = torch.Generator().manual_seed(seed)

    def sequence(length: int) -> list[int]:
        jitter = int(torch.randint(-length // 4, length // 4 + 1, (1,), generator=generator))
        return torch.randint(0, vocab, (max(1, length + jitter),), generator=generator).tolist()

    return Pairs(
        prompts=[sequence(prompt_len) for _ in range(count)],
        chosen=[sequence(completion_len) for _ in range(count)],
        rejected=[sequence(completion_len) for _ in range(count)],
    )


def build_model(size: str, attn: str, dtype: torch.dtype, device: torch.device, min_vocab: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = {**SIZES[size], "vocab_size": max(SIZES[size]["vocab_size"], min_vocab)}
    config = Qwen2Config(**shape, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model


def model_flops_per_token(model, seq_len: int, training: bool) -> float:
    """6N (training) or 2N (forward) FLOPs per token, N without the embedding table, plus attention's
    12·layers·hidden·seq (training) / 4·layers·hidden·seq (forward), causal halved, as in PaLM's MFU."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    params -= config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    attention = config.num_hidden_layers * config.hidden_size * seq_len
    return (6 * params + 6 * attention) if training else (2 * params + 2 * attention)


def trl_fused_head():
    """TRL's `add_fused_lm_head` (TRL >= 1.15: how its `DPOTrainer` scores, tile by tile over completion
    positions, with a Triton kernel on a GPU), or None where TRL is not installed."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        return None
    return add_fused_lm_head


def trl_logps(model, packed, fused: bool) -> torch.Tensor:
    """TRL's concatenated forward. `fused`: its `DPOTrainer._compute_loss` (labels -100 outside the
    completion, `fused_lm_head=True`, summed log-probs); else the full-logits forward of TRL < 1.15,
    `selective_log_softmax` over `[2B, T, vocab]` logits (TRL's own where installed)."""
    if fused:
        labels = packed.input_ids.masked_fill(packed.completion_mask == 0, -100)
        outputs = model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        return outputs.log_probs[:, -(packed.input_ids.shape[1] - 1) :].sum(dim=1)
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:

        def selective_log_softmax(logits, index):
            return torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)

    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits[:, :-1]
    labels = packed.input_ids[:, 1:]
    mask = packed.completion_mask[:, 1:].bool()
    token_logps = selective_log_softmax(logits.float(), labels)
    return (token_logps * mask).sum(dim=1)


def trl_variants() -> list[tuple[str, bool]]:
    """The TRL rows, the first one being what the ratios are taken against: TRL's own fused head where
    TRL is installed, and the full-logits forward of earlier TRL versions."""
    full = ("TRL full logits", False)
    if trl_fused_head() is None:
        return [full]
    import trl

    return [(f"TRL {trl.__version__} fused head", True), full]


def patch_trl_head(*models) -> None:
    add_fused_lm_head = trl_fused_head()
    for model in models:
        if add_fused_lm_head is not None and not getattr(model, "_trl_fused_head", False):
            add_fused_lm_head(model)  # `fused_lm_head=False` keeps the original forward
            model._trl_fused_head = True


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    inputs = LossInputs(chosen, rejected, ref_chosen, ref_rejected)
    return preference_loss(inputs, LossSettings()).loss


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0


def batch_starts(args, pairs: Pairs) -> list[int]:
    """The first pair of each iteration's batch: successive batches, wrapping around."""
    span = len(pairs.prompts) - args.batch_size + 1
    return [(iteration * args.batch_size) % span for iteration in range(args.warmup + args.iters)]


def measure(name: str, step, args, pairs: Pairs, model, timer: Timer, training: bool, peak: float):
    """Run `step(batch)` over successive batches; warmup iterations are not timed."""
    timer.reset_peak()
    seconds, tokens = [], []
    for iteration, start in enumerate(batch_starts(args, pairs)):
        batch = pairs.batch(start, args.batch_size)
        timer.sync()
        began = time.perf_counter()
        step(start, batch)
        timer.sync()
        if iteration >= args.warmup:
            seconds.append(time.perf_counter() - began)
            tokens.append(pairs.tokens(start, args.batch_size))
    per_step = statistics.median(seconds)
    tokens_per_s = statistics.median(t / s for t, s in zip(tokens, seconds, strict=True))
    seq_len = args.prompt_len + args.completion_len
    flops = model_flops_per_token(model, seq_len, training) * tokens_per_s
    return {
        "name": name,
        "step_s": per_step,
        "tokens_per_s": tokens_per_s,
        "mfu": flops / (peak * 1e12) if peak else float("nan"),
        "peak_gib": timer.peak_gib(),
    }


def scorer_steps(model, args, device, shared: bool = False):
    pad = 0
    patch_trl_head(model)

    @torch.inference_mode()
    def raydpo_step(start, batch):
        packed = pack_batch(*batch, pad, shared, shared and packs_rows(model)).to(device)
        completion_logps(model, packed, args.chunk_tokens).sums.float().cpu()

    def trl_step(fused: bool):
        @torch.inference_mode()
        def step(start, batch):
            packed = pack_pairs(*batch, pad).to(device)
            trl_logps(model, packed, fused).cpu()

        return step

    return raydpo_step, trl_step


def train_steps(policy, reference, args, pairs: Pairs, device, shared: bool = False):
    pad = 0
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    patch_trl_head(policy, reference)
    cached: dict[int, torch.Tensor] = {}  # reference values, as a precompute output provides them
    with torch.inference_mode():
        for start in sorted(set(batch_starts(args, pairs))):
            packed = pack_pairs(*pairs.batch(start, args.batch_size), pad).to(device)
            cached[start] = completion_logps(reference, packed, args.chunk_tokens).sums.float().clone()

    def raydpo_step(start, batch):
        ref_chosen, ref_rejected = cached[start].chunk(2)
        packed = pack_batch(*batch, pad, shared, shared and packs_rows(policy)).to(device)
        chosen, rejected = completion_logps(policy, packed, args.chunk_tokens).sums.chunk(2)
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def trl_online_step(fused: bool):
        def step(start, batch):
            packed = pack_pairs(*batch, pad).to(device)
            with torch.no_grad():
                ref_chosen, ref_rejected = trl_logps(reference, packed, fused).chunk(2)
            chosen, rejected = trl_logps(policy, packed, fused).chunk(2)
            dpo_loss(chosen, rejected, ref_chosen, ref_rejected).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return raydpo_step, trl_online_step


def attention_kernels(requested: list[str], device: torch.device) -> list[str]:
    kernels = []
    for kernel in requested:
        if kernel == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                print("flash_attention_2: flash-attn is not installed; skipped")
                continue
            if device.type != "cuda":
                continue
        if kernel == "flex_attention" and device.type != "cuda":
            print("flex_attention: FlexAttention has no backward on CPU; skipped")
            continue
        kernels.append(kernel)
    return kernels


def peak_tflops(device: torch.device, override: float | None) -> float:
    if override:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), 0.0)


def run_stages(args, workdir: Path) -> dict:
    """Both stages, as users run them, on a model of `args.size` saved with a tokenizer of the samples."""
    import raydpo
    from raydpo.toy import build_tokenizer, sample_data_dir

    on_gpu = args.device == "cuda"
    model_dir = workdir / f"{args.size}-random"
    if not (model_dir / "config.json").exists():
        tokenizer = build_tokenizer(sorted(sample_data_dir().glob("dpo_*_demo.json")))
        dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
        model = build_model(args.size, args.attn[0], dtype, cpu, min_vocab=len(tokenizer))
        model.config.update({"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    common = {"model": str(model_dir), "attn_implementation": args.attn[0], "dtype": args.dtype}
    cached = raydpo.precompute(
        **common,
        dataset=str(sample_data_dir() / "dpo_en_demo.json"),
        output=str(workdir / "cache"),
        max_length=args.prompt_len + args.completion_len,
        batch_size=args.batch_size,
        gpus_per_actor=1 if on_gpu else 0,
        cpus_per_actor=1,
        overwrite=True,
    )
    print(cached.summary())
    settings = dict(
        common,
        data=str(workdir / "cache"),
        output=str(workdir / "run"),
        num_workers=1,
        use_gpu=on_gpu,
        cpus_per_worker=1,
        micro_batch_size=args.batch_size,
        max_steps=args.stage_steps,
        logging_steps=1,
        overwrite=True,
    )
    try:
        trained = raydpo.train(**settings)
    except raydpo.TrainingFailed as failed:
        if "cached reference" not in str(failed):
            raise
        # the step-1 check is a finding to report; the step's speed is still worth measuring
        print(f"step-1 reference check: {failed}\nagain with reference_is_different=True")
        trained = raydpo.train(**settings, reference_is_different=True)
    print(trained.summary())
    shown = ("tokens_per_second", "samples_per_second", "peak_memory_gb", "peak_memory_above_start_gb")
    stages = {
        "precompute": cached.train.manifest.to_dict()["throughput"],
        "train": {name: trained.metrics.get(name) for name in shown}
        | steady_steps(trained.step_seconds, args.batch_size)
        | step_one_check(trained),
    }
    print(json.dumps(stages, indent=2))
    return stages


def steady_steps(seconds: list[float], pairs_per_step: int, warmup: int = 2) -> dict:
    """The median step after the first `warmup` (which load kernels and allocate the optimizer state)."""
    steady = seconds[warmup:] or seconds
    median = statistics.median(steady)
    return {
        "steady_steps": len(steady),
        "median_step_s": median,
        "steady_pairs_per_s": pairs_per_step / median,
    }


def step_one_check(trained) -> dict:
    """The step-1 comparison of the policy with the cached reference, as logged to MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained.tracking_uri)
    names = ("ref_check/max_abs_logratio", "ref_check/max_abs_ref_logps")
    return {name: [m.value for m in client.get_metric_history(trained.run_id, name)] for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="qwen2-0.5b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--attn", nargs="+", default=["sdpa", "flex_attention", "flash_attention_2"])
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward (2x sequences)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--completion-len", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--stages", nargs="+", choices=["precompute", "train"], default=["precompute", "train"]
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--full", action="store_true", help="also run both stages under Ray and DeepSpeed")
    parser.add_argument(
        "--stage-steps", type=int, default=20, help="optimizer steps of the training stage (--full)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(".bench/gpu"), help="model, cache and run (--full)"
    )
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # lines survive a run cut short by a time limit

    device = torch.device(args.device)
    timer = Timer(device)
    peak = peak_tflops(device, args.peak_tflops)
    vocab = SIZES[args.size]["vocab_size"]
    pairs = synthetic_pairs(args.pairs, args.prompt_len, args.completion_len, vocab, seed=0)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{machine}; torch {torch.__version__}; {args.size} in {args.dtype}; {args.batch_size} pairs per "
        f"forward, prompt ~{args.prompt_len} + completion ~{args.completion_len} tokens; peak {peak:g} TFLOP/s"
    )
    print(f"prompt:completion tokens {prompt_completion_ratio(pairs)}")
    results = []
    for attn in attention_kernels(args.attn, device):
        if "precompute" in args.stages:
            results += guarded(
                f"precompute ({attn})", precompute_rows, attn, args, pairs, device, timer, peak
            )
        if "train" in args.stages:
            results += guarded(f"train ({attn})", train_rows, attn, args, pairs, device, timer, peak)
        save(args, machine, results, None)  # after each kernel: a run cut short keeps what it measured
    stages = run_stages(args, args.workdir) if args.full else None
    save(args, machine, results, stages)


def precompute_rows(attn: str, args, pairs: Pairs, device, timer: Timer, peak: float) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    model = build_model(args.size, attn, dtype, device).eval()
    raydpo_step, trl_step = scorer_steps(model, args, device)
    rows = [
        measure(f"precompute {name} ({attn})", trl_step(fused), args, pairs, model, timer, False, peak)
        for name, fused in trl_variants()
    ]
    rows.append(measure(f"precompute raydpo ({attn})", raydpo_step, args, pairs, model, timer, False, peak))
    for _ in shared_variants(model, args, pairs, device):
        shared_step, _ = scorer_steps(model, args, device, shared=True)
        name = f"precompute raydpo shared ({attn}, {attention_mode(model)})"
        rows.append(measure(name, shared_step, args, pairs, model, timer, False, peak))
    return report(rows)


def train_rows(attn: str, args, pairs: Pairs, device, timer: Timer, peak: float) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    policy = build_model(args.size, attn, dtype, device).train()
    reference = build_model(args.size, attn, dtype, device).eval()
    raydpo_step, trl_step = train_steps(policy, reference, args, pairs, device)
    rows = [
        measure(f"train {name} online ({attn})", trl_step(fused), args, pairs, policy, timer, True, peak)
        for name, fused in trl_variants()
    ]
    rows.append(measure(f"train raydpo ({attn})", raydpo_step, args, pairs, policy, timer, True, peak))
    for _ in shared_variants(policy, args, pairs, device):
        shared_step, _ = train_steps(policy, reference, args, pairs, device, shared=True)
        name = f"train raydpo shared ({attn}, {attention_mode(policy)})"
        rows.append(measure(name, shared_step, args, pairs, policy, timer, True, peak))
    return report(rows)


def guarded(what: str, rows, *args) -> list[dict]:
    """One kernel's stage; a failure is printed with its traceback and the next one still runs, so one
    device session measures all that works."""
    try:
        return rows(*args)
    except Exception:  # noqa: BLE001 - reported, and the other measurements go on
        print(f"{what}: FAILED")
        traceback.print_exc(file=sys.stdout)
        return []
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def save(args, machine: str, results: list[dict], stages: dict | None) -> None:
    if args.json:
        figures = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        args.json.write_text(json.dumps({**figures, "stages": stages}, indent=2))


def prompt_completion_ratio(pairs: Pairs) -> str:
    prompt = sum(len(p) for p in pairs.prompts)
    completion = sum(len(c) + len(r) for c, r in zip(pairs.chosen, pairs.rejected, strict=True))
    return f"{prompt:,} : {completion:,} ({prompt / (2 * prompt + completion):.0%} of two sequences' tokens)"


def shared_variants(model, args, pairs: Pairs, device):
    """Switch `model` to prefix sharing where its kernel passes the load-time check (as both stages do;
    SDPA becomes segment-wise attention), then yield once per way its shared rows can attend (SDPA on
    a GPU in 16 bits: one varlen call per layer, and a segment at a time), having printed the gap of
    shared to unshared sums on one batch."""
    attn = model.config._attn_implementation
    try:
        if not use_prefix_sharing(model, "on"):
            return
    except ValueError as error:
        print(f"  shared ({attn}): skipped: {error}")
        return
    parameter = next(model.parameters())
    varlen_options = [True, False] if attention.use_varlen(parameter.device, parameter.dtype) else [None]
    for varlen in varlen_options:
        if varlen is not None:
            attention.USE_VARLEN = varlen
        print(
            f"  shared ({attn}, {attention_mode(model)}): sums within {shared_gap(model, args, pairs, device):.2g} "
            "relative of unshared"
        )
        yield
    attention.USE_VARLEN = True


def shared_gap(model, args, pairs: Pairs, device) -> float:
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        batch = pairs.batch(0, args.batch_size)
        layout = pack_batch(*batch, 0, True, packs_rows(model)).to(device)
        shared = completion_logps(model, layout, args.chunk_tokens).sums
        unshared = completion_logps(model, pack_pairs(*batch, 0).to(device), args.chunk_tokens).sums
    model.train(was_training)
    return ((shared.float() - unshared.float()).abs() / unshared.float().abs().clamp_min(1.0)).max().item()


def report(rows: list[dict]) -> list[dict]:
    """Print each row, then raydpo's rows against the first (TRL's) on the same kernel.

    Tokens count both sequences of a pair, the prompt twice, as TRL counts them, in every row: with the
    prompt shared, tokens/s and MFU are what the unshared computation would need for the same pairs."""
    theirs = rows[0]
    for row in rows:
        print(
            f"{row['name']:<58} {row['step_s'] * 1000:9.1f} ms/step {row['tokens_per_s']:12,.0f} tokens/s "
            f"MFU {row['mfu']:6.1%} peak {row['peak_gib']:6.2f} GiB"
        )
    for ours in rows[1:]:
        speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
        memory = ours["peak_gib"] / theirs["peak_gib"] if theirs["peak_gib"] else float("nan")
        print(f"  -> {ours['name']}: {speed:.2f}x TRL's tokens/s at {memory:.2f}x its peak memory")
    return rows


if __name__ == "__main__":
    main()
