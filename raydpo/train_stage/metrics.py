"""A worker's metrics: per-rank sums kept on the device, all-reduced once per logging step into TRL's
means, and the peak memory of the run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from raydpo.train_stage.forward import Forward

# Per-rank sums, all-reduced together; means are formed after the reduction. The device sums are
# tensors added on the device; the counts are known on the host and never wait for the device.
DEVICE_SUMS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "chosen_tokens",
    "logits/rejected",
    "rejected_tokens",
)
HOST_COUNTS = ("micro_batches", "pairs", "tokens")
PAIR_MEANS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
PAIR_MEANS += ("logps/chosen", "logps/rejected")


@dataclass
class MetricWindow:
    """Per-rank sums of the metrics over a logging window (or an eval pass)."""

    device: torch.device
    sums: torch.Tensor | None = None  # DEVICE_SUMS, on the device
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOST_COUNTS, 0))
    started: float = field(default_factory=time.perf_counter)

    def add(self, forward: Forward) -> None:
        """Add a micro-batch's values: device work only, no host sync."""
        output, scores = forward.output, forward.scores
        chosen_rewards, rejected_rewards = output.chosen_rewards, output.rejected_rewards
        chosen_logits, rejected_logits = scores.split(scores.logits_sums)
        chosen_lengths, rejected_lengths = scores.split(scores.lengths)
        values = torch.stack(
            [
                value.detach().to(torch.float64)
                for value in (
                    forward.loss,
                    chosen_rewards.sum(),
                    rejected_rewards.sum(),
                    (chosen_rewards > rejected_rewards).sum(),
                    (chosen_rewards - rejected_rewards).sum(),
                    forward.inputs.chosen_logps.sum(),
                    forward.inputs.rejected_logps.sum(),
                    chosen_logits.sum(),
                    chosen_lengths.sum(),
                    rejected_logits.sum(),
                    rejected_lengths.sum(),
                )
            ]
        )
        self.sums = values if self.sums is None else self.sums + values
        self.counts["micro_batches"] += 1
        self.counts["pairs"] += chosen_rewards.numel()
        self.counts["tokens"] += forward.tokens

    def reduce(self) -> dict[str, float]:
        """All-reduce the sums (one collective, one host read) and form TRL's means."""
        import torch.distributed as dist

        sums = self.sums if self.sums is not None else torch.zeros(len(DEVICE_SUMS), dtype=torch.float64)
        counts = torch.tensor([self.counts[name] for name in HOST_COUNTS], dtype=torch.float64)
        total = torch.cat([sums.to(self.device), counts.to(self.device)])
        if dist.is_initialized():
            dist.all_reduce(total)
        s = dict(zip(DEVICE_SUMS + HOST_COUNTS, total.cpu().tolist(), strict=True))
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {"loss": s["loss"] / max(s["micro_batches"], 1)}
        metrics.update({name: s[name] / max(s["pairs"], 1) for name in PAIR_MEANS})
        metrics["logits/chosen"] = s["logits/chosen"] / max(s["chosen_tokens"], 1)
        metrics["logits/rejected"] = s["logits/rejected"] / max(s["rejected_tokens"], 1)
        metrics["tokens_per_second"] = s["tokens"] / elapsed
        metrics["samples_per_second"] = s["pairs"] / elapsed
        metrics["_tokens"] = s["tokens"]
        metrics["_pairs"] = s["pairs"]
        return metrics


def peak_memory_gb(device: torch.device, baseline: float = 0.0, reduce: bool = True) -> float:
    """The largest peak over the workers: GPU memory allocated by torch, or on CPUs the process's peak
    RSS; minus `baseline` (the peak before the model loaded: the libraries' own footprint on CPUs)."""
    import resource

    import torch.distributed as dist

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    value = torch.tensor([peak - baseline], dtype=torch.float64, device=device)
    if reduce and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()
