"""What stops a training run: a cache that does not fit it (checked by the driver before any worker
starts), and in the workers a non-finite loss or a first step that does not reproduce the cache.

A non-finite micro-batch is stopped on, or skipped on every rank alike, before the step-1 reference
check, which runs on the first micro-batch with a finite loss.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydpo import cache
from raydpo.config import TrainConfig
from raydpo.errors import RaydpoError
from raydpo.numerics import check_cache_numerics, resolve_numerics
from raydpo.tokenize import tokenizer_fingerprint

if TYPE_CHECKING:
    import torch

    from raydpo.losses import LossInputs

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = ["pair_id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
REFERENCE_TOLERANCE = 1e-3  # relative gap between policy and cached reference at step 1 that stops the run


# ---- before the run: the cache -----------------------------------------------------------------------


def check_cache_matches(
    config: TrainConfig, splits: dict[str, cache.CacheSplit], tokenizer
) -> dict[str, Any]:
    """The cached reference must come from this policy (unless said otherwise) and this tokenizer."""
    train_manifest = splits["train"].manifest
    for name, split in splits.items():
        manifest = split.manifest
        for what in ("model", "tokenizer"):
            if getattr(manifest.fingerprints, what) != getattr(train_manifest.fingerprints, what):
                raise RaydpoError(
                    f"the {name} split was precomputed with a different {what} than the train split"
                )
        if manifest.settings != train_manifest.settings:
            raise RaydpoError(
                f"the {name} split was tokenized with other settings than the train split: "
                f"{manifest.settings} vs {train_manifest.settings}"
            )
    if tokenizer_fingerprint(tokenizer) != train_manifest.fingerprints.tokenizer:
        used = f"the tokenizer {config.tokenizer}" if config.tokenizer else f"the tokenizer of {config.model}"
        raise RaydpoError(
            f"{used} is not the one {splits['train'].path} was tokenized with ({train_manifest.tokenizer}); "
            "pass that one with --tokenizer, or precompute again with this one"
        )
    policy = cache.model_fingerprint(config.model)
    same = policy == train_manifest.fingerprints.model
    if not same and not config.reference_is_different:
        raise RaydpoError(
            f"the reference log-probs in {splits['train'].path} were computed with {train_manifest.model}, "
            f"whose weights differ from {config.model}; pass --reference-is-different if that is intended"
        )
    numerics = resolve_numerics(
        config.model, config.dtype, config.attn_implementation, config.trust_remote_code, config.use_gpu
    )
    if not config.reference_is_different:
        note = check_cache_numerics(train_manifest.settings, **numerics)
        if note:
            logger.info("%s", note)
    return {
        "model": train_manifest.model,
        "same_as_policy": same,
        "fingerprint": train_manifest.fingerprints.model,
        "numerics": numerics,
    }


def required_columns(config: TrainConfig) -> list[str]:
    settings = config.loss_settings()
    reference = cache.LD_REFERENCE_COLUMNS if settings.ld_alpha is not None else cache.REFERENCE_COLUMNS
    return TOKEN_COLUMNS + list(reference)


def finite_rows(split: cache.CacheSplit, columns: list[str]) -> dict[str, int]:
    """Check the schema and count the rows whose reference values are all finite (the others are skipped).

    The counts come from the data files' footers, where the precompute wrote them. A file without them
    (written by other means) has its reference columns read (8 bytes a row), a file at a time in a few
    threads, so the driver's memory stays that of one file and an object store's latency overlaps."""
    schema = pq.read_schema(split.files[0], filesystem=split.filesystem) if split.files else None
    missing = [name for name in columns if schema is None or name not in schema.names]
    if missing:
        raise RaydpoError(f"{split.path} lacks the columns {missing}: not a usable precompute output")
    reference = [name for name in columns if name in cache.REFERENCE_COLUMNS + cache.LD_REFERENCE_COLUMNS]
    key = ",".join(reference)
    noted = split.nonfinite if split.file_rows else [None] * len(split.files)
    counted, unnoted = [], []
    for path, rows, footer in zip(split.files, split.file_rows or noted, noted, strict=True):
        if footer is not None and key in footer:
            counted.append((rows, rows - footer[key]))
        else:
            unnoted.append(path)

    def count(path: str) -> tuple[int, int]:
        table = pq.read_table(path, filesystem=split.filesystem, columns=reference)
        return table.num_rows, int(pc.sum(cache.finite_mask(table, reference)).as_py() or 0)

    counted += cache.concurrently(count, unnoted)
    rows, usable = sum(n for n, _ in counted), sum(k for _, k in counted)
    return {"rows": rows, "usable": usable, "nonfinite_reference": rows - usable}


def drop_nonfinite(batch: pa.Table, names: list[str]) -> pa.Table:
    """Ray Data transform: keep the rows whose reference values are finite."""
    return batch.filter(cache.finite_mask(batch, names))


# ---- in the workers: the values of a step ------------------------------------------------------------


class StepChecks:
    """The checks on the micro-batches of a worker's steps, with as few host syncs as they allow.

    Every rank must take the same path (backward is a collective under ZeRO), so a loss's finiteness is
    all-reduced. With `skip_nonfinite_loss`, whether a micro-batch is used decides on the host whether
    backward runs and a replacement is drawn, before backward: one all-reduce and one host read per
    micro-batch. Without it a non-finite loss stops the run, so the losses of a step stay on the device
    and are read together once per optimizer step, before the update (`before_update`): the stop names
    the micro-batch a check per micro-batch would name, and no non-finite gradient is applied. The first
    micro-batch of step 1 is read at once, together with the reference check it runs.
    """

    def __init__(self, config: TrainConfig, rank: int, dropout_on: bool, device: torch.device):
        self.config = config
        self.rank = rank
        self.dropout_on = dropout_on
        self.device = device
        self.reference: dict[str, float] | None = None  # the step-1 check, once run
        self._unread: list[tuple[torch.Tensor, Any]] = []  # this step's losses and pair ids, not yet read

    def admit(self, loss: torch.Tensor, inputs: LossInputs, pair_ids: Any, step: int) -> bool:
        """Whether the micro-batch goes into the update; on a non-finite loss the run stops (on every
        rank alike), or with `skip_nonfinite_loss` this returns False on every rank."""
        reference_due = step == 1 and self.reference is None  # before any update, on the first finite loss
        if not reference_due and not self.config.skip_nonfinite_loss:
            self._unread.append((loss.detach(), pair_ids))
            return True
        values = [_nonfinite(loss)]
        if reference_due:
            values += [
                (inputs.chosen_logps - inputs.ref_chosen_logps).abs().max(),
                (inputs.rejected_logps - inputs.ref_rejected_logps).abs().max(),
                inputs.ref_chosen_logps.abs().max(),
                inputs.ref_rejected_logps.abs().max(),
            ]
        nonfinite, *gaps = self._max_over_ranks(values)
        if nonfinite:
            self._nonfinite(loss, pair_ids, step)
            return False
        if reference_due:
            # the largest absolute log-ratio over this micro-batch of every worker, and the largest cached
            # value it is relative to: far above float noise, the cache came from other weights or numerics
            self.reference = {
                "ref_check/max_abs_logratio": max(gaps[:2]),
                "ref_check/max_abs_ref_logps": max(gaps[2:]),
            }
            enforce_reference_check(self.reference, self.config, self.dropout_on, self.rank)
        return True

    def before_update(self, step: int) -> None:
        """Stop the run, before the optimizer step, if a loss of this step was non-finite on any rank."""
        if not self._unread:
            return
        unread, self._unread = self._unread, []
        flags = self._max_over_ranks([_nonfinite(loss) for loss, _ in unread])
        if any(flags):
            loss, pair_ids = unread[next(i for i, flag in enumerate(flags) if flag)]
            self._nonfinite(loss, pair_ids, step)

    def _max_over_ranks(self, values: list[torch.Tensor]) -> list[float]:
        """One all-reduce (max) of the values packed in one tensor, and one host read."""
        import torch
        import torch.distributed as dist

        packed = torch.stack([value.detach().to(self.device, torch.float64) for value in values])
        if dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        return packed.tolist()

    def _nonfinite(self, loss: torch.Tensor, pair_ids: Any, step: int) -> None:
        """Stop naming the step and the pair ids of a worker whose loss was non-finite (every rank gets
        here together, so they gather them), or (skip_nonfinite_loss) skip the micro-batch."""
        import torch.distributed as dist

        own = (self.rank, loss.item(), [str(pair_id) for pair_id in pair_ids]) if _nonfinite(loss) else None
        gathered = [own]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, own)
        rank, value, ids = next(entry for entry in gathered if entry is not None)
        where = f"step {step}, worker {rank} (loss {value:.4g}), pairs {ids}"
        if not self.config.skip_nonfinite_loss:
            raise AgreedStop(
                f"non-finite loss on some worker at {where}; skip_nonfinite_loss skips such batches"
            )
        logger.warning("skipping a micro-batch with a non-finite loss at %s", where)


def _nonfinite(loss: torch.Tensor):
    import torch

    return (~torch.isfinite(loss.detach())).any()


def enforce_reference_check(check: dict[str, float], config, dropout_on: bool, rank: int) -> None:
    """Stop the run (every rank, with the same message) when step 1 does not reproduce the cache.

    Not enforced when the reference is different on purpose, or when the policy trains with dropout
    (disable_dropout=False): its step-1 log-probs then carry dropout noise, and only a warning says so.
    """
    gap, scale = check["ref_check/max_abs_logratio"], check["ref_check/max_abs_ref_logps"]
    tolerance = REFERENCE_TOLERANCE * max(scale, 1.0)
    if gap <= tolerance or config.reference_is_different:
        return
    found = (
        f"at step 1 the policy's log-probs differ from the cached reference by up to {gap:.4g} "
        f"(tolerance {tolerance:.3g}, largest |reference log-prob| {scale:.4g})"
    )
    if dropout_on:
        if rank == 0:
            logger.warning("%s: the policy trains with dropout (disable_dropout=False)", found)
        return
    raise ReferenceMismatchError(
        f"{found}: the cache was scored by another model or other numerics than this policy "
        "(weights, dtype, attention kernel, model code); precompute again for this policy, or pass "
        "--reference-is-different if that is intended"
    )


class AgreedStop(RuntimeError):
    """A stop every rank reaches together, for a reason in the data or the settings (a non-finite loss,
    a reference that step 1 does not reproduce). A restart would stop again at the same place, so the
    workers end the run with it (`loop.train_loop`) rather than fail, which Ray Train would retry."""


class ReferenceMismatchError(AgreedStop):
    """Step 1 of training does not reproduce the cached reference log-probs."""
