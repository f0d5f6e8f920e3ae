"""A worker's metrics: per-rank sums kept on the device, all-reduced once per logging step into TRL's
means, and the peak memory of the run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from raydpo.train_stage.forward import Forward

# A row of per-rank sums for each micro-batch, all-reduced together once per logging step; means are
# formed after the reduction. TRL takes each metric's mean over one micro-batch of every rank (a
# "round"), then averages the rounds of a logging window unweighted: the rows keep rounds apart.
ROUND_SUMS = (
    "loss",  # the micro-batches' mean losses, summed
    "pair_loss",  # each mean loss times its pairs (eval_loss: Hugging Face's evaluation loop weights by pairs)
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
    "entropy",  # over the tokens of both completions
    "mean_token_accuracy",  # the chosen completions' tokens that are the argmax
)
ROUND_COUNTS = ("micro_batches", "pairs", "tokens")  # known on the host: never wait for the device
PAIR_MEANS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
PAIR_MEANS += ("logps/chosen", "logps/rejected")


@dataclass
class MetricWindow:
    """Per-rank sums of the metrics over a logging window (or an eval pass), a row per round."""

    device: torch.device
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # round -> ROUND_SUMS, on the device
    counts: dict[int, list[int]] = field(default_factory=dict)  # round -> ROUND_COUNTS, on the host
    started: float = field(default_factory=time.perf_counter)

    def add(self, forward: Forward, round_index: int | None = None) -> None:
        """Add a micro-batch's values as round `round_index` (default: the next round): device work
        only, no host sync."""
        output, scores = forward.output, forward.scores
        chosen_rewards, rejected_rewards = output.chosen_rewards, output.rejected_rewards
        chosen_logits, rejected_logits = scores.split(scores.logits_sums)
        chosen_mask, rejected_mask = scores.split(scores.target_mask)
        pairs = chosen_rewards.numel()
        values = torch.stack(
            [
                value.detach().to(torch.float64)
                for value in (
                    forward.loss,
                    forward.loss * pairs,
                    chosen_rewards.sum(),
                    rejected_rewards.sum(),
                    (chosen_rewards > rejected_rewards).sum(),
                    (chosen_rewards - rejected_rewards).sum(),
                    forward.inputs.chosen_logps.sum(),
                    forward.inputs.rejected_logps.sum(),
                    chosen_logits.sum(),
                    chosen_mask.sum(),  # the tokens the logits were taken at
                    rejected_logits.sum(),
                    rejected_mask.sum(),
                    scores.entropy_sums.sum(),
                    scores.split(scores.top1_counts)[0].sum(),
                )
            ]
        )
        index = len(self.rows) if round_index is None else round_index
        self.rows[index] = values if index not in self.rows else self.rows[index] + values
        counts = self.counts.setdefault(index, [0, 0, 0])
        for position, value in enumerate((1, pairs, forward.tokens)):
            counts[position] += value

    def reduce(self, pair_weighted_loss: bool = False) -> dict[str, float]:
        """All-reduce the rows (two collectives: the round count, then the rows) and form TRL's means:
        each metric's mean over a round, averaged over the rounds. The loss is the mean over
        micro-batches, or with `pair_weighted_loss` over pairs (an eval pass)."""
        import torch.distributed as dist

        count = torch.tensor([max(self.rows, default=-1) + 1], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        names = ROUND_SUMS + ROUND_COUNTS
        host = torch.zeros(max(int(count.item()), 1), len(ROUND_COUNTS), dtype=torch.float64)
        for index, values in self.counts.items():
            host[index] = torch.tensor(values, dtype=torch.float64)
        table = torch.cat(
            [
                torch.zeros(len(host), len(ROUND_SUMS), dtype=torch.float64, device=self.device),
                host.to(self.device),
            ],
            dim=1,
        )
        for index, values in self.rows.items():
            table[index, : len(ROUND_SUMS)] = values.to(self.device)
        if dist.is_initialized():
            dist.all_reduce(table)
        column = dict(zip(names, table.cpu().T, strict=True))
        taken = column["pairs"] > 0  # rounds with any pairs

        def round_mean(total: str, *counts: str) -> float:
            means = column[total][taken] / sum(column[count][taken] for count in counts).clamp(min=1)
            return means.mean().item() if len(means) else 0.0

        elapsed = max(time.perf_counter() - self.started, 1e-9)
        pairs, tokens = column["pairs"].sum().item(), column["tokens"].sum().item()
        if pair_weighted_loss:
            metrics = {"loss": column["pair_loss"].sum().item() / max(pairs, 1)}
        else:
            metrics = {"loss": column["loss"].sum().item() / max(column["micro_batches"].sum().item(), 1)}
        metrics.update({name: round_mean(name, "pairs") for name in PAIR_MEANS})
        metrics["logits/chosen"] = round_mean("logits/chosen", "chosen_tokens")
        metrics["logits/rejected"] = round_mean("logits/rejected", "rejected_tokens")
        metrics["entropy"] = round_mean("entropy", "chosen_tokens", "rejected_tokens")
        metrics["mean_token_accuracy"] = round_mean("mean_token_accuracy", "chosen_tokens")
        metrics["tokens_per_second"] = tokens / elapsed
        metrics["samples_per_second"] = pairs / elapsed
        metrics["_tokens"] = tokens
        metrics["_pairs"] = pairs
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
