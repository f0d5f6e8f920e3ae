"""The reference scorer: a plain callable class that adds the reference model's log-probs to a batch.

Ray Data runs it on an actor pool (`map_batches(ReferenceScorer, ...)`); called on a batch of
`PREPARED_SCHEMA` directly, it needs no actor pool.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydpo import cache
from raydpo.faults import fault_point
from raydpo.numerics import load_causal_lm, resolve_dtype
from raydpo.precompute_stage.progress import report
from raydpo.resources import allocator_in_effect, check_gpus_usable, cpu_threads

FORWARD_TOKENS = "_forward_tokens"  # padded tokens each pair took in its forward (for the padding figure)
COMPUTED_TOKENS = "_computed_tokens"  # tokens of each pair the model computed (the prompt once if shared)


class ReferenceScorer:
    """Scores prepared batches with the reference model: a plain callable class for `map_batches`.

    It loads the model once; each call sorts its pairs by length, runs forwards of `batch_size` pairs
    (chosen and rejected together: one row per pair with prefix sharing, else two), and returns the
    batch with the reference log-prob columns added.
    Ray restarts a dead scorer actor (up to `max_actor_restarts` times) and retries its unfinished
    batches, and part files are named by content, so a retried batch rewrites its own file rather than
    adding a second copy.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        pad_token_id: int = 0,
        batch_size: int = 8,
        chunk_tokens: int = 2048,
        store_token_logps: bool = False,
        prefix_sharing: str = "auto",
        num_threads: int | None = None,
        cpus: float = 1.0,
        pool_size: int = 1,
        cpu_allocator: str | None = None,
        progress=None,
    ):
        import torch

        from raydpo.logprobs import check_head_path, packs_rows, use_prefix_sharing

        check_gpus_usable("a reference scorer")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads or cpu_threads(cpus, pool_size))
        # the allocator this actor runs with on CPUs ("mimalloc" or "system"); None on GPUs or if not asked
        self.cpu_allocator = (
            allocator_in_effect(cpu_allocator, "reference scorer")
            if cpu_allocator and self.device.type == "cpu"
            else None
        )
        dtype = resolve_dtype(dtype, on_gpu=self.device.type == "cuda")
        loaded = load_causal_lm(model, dtype, attn_implementation, trust_remote_code)
        self.model = loaded.to(self.device).eval()
        check_head_path(self.model, self.model.config.vocab_size)
        self.shared = use_prefix_sharing(self.model, prefix_sharing)
        self.packed = self.shared and packs_rows(self.model)  # a batch's pairs in one row, no padding
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens
        self.store_token_logps = store_token_logps
        self.progress = progress  # a `progress.Tally` handle, or None
        if _restarted_actor():
            print(
                f"raydpo: a scorer actor was restarted after its process died (now pid {os.getpid()}); "
                "the batches it had not finished are scored again",
                flush=True,
            )
            report(progress, restarts=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from raydpo.layout import pack_batch, pair_width
        from raydpo.logprobs import completion_logps

        fault_point("precompute.score")

        ok = np.flatnonzero(pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False))
        prompts = batch.column("prompt_input_ids").to_pylist()
        chosens = batch.column("chosen_input_ids").to_pylist()
        rejecteds = batch.column("rejected_input_ids").to_pylist()
        columns = {name: [None] * batch.num_rows for name in self._output_names()}
        columns[FORWARD_TOKENS] = [0] * batch.num_rows
        columns[COMPUTED_TOKENS] = [0] * batch.num_rows
        width = {i: pair_width(len(prompts[i]), len(chosens[i]), len(rejecteds[i]), self.shared) for i in ok}
        order = sorted(ok, key=lambda i: width[i], reverse=True)  # longest first: memory peaks early
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            pairs = pack_batch(
                [prompts[i] for i in rows],
                [chosens[i] for i in rows],
                [rejecteds[i] for i in rows],
                self.pad_token_id,
                self.shared,
                self.packed,
            ).to(self.device)
            with torch.inference_mode():
                scores = completion_logps(self.model, pairs, self.chunk_tokens)
            self._collect(columns, rows, scores)
            row_width = pairs.input_ids.shape[1]
            for i in rows:
                columns[COMPUTED_TOKENS][i] = (
                    width[i] if self.shared else 2 * len(prompts[i]) + len(chosens[i]) + len(rejecteds[i])
                )
                # what the forward took for the pair: its row, padded to the batch's longest (two rows
                # unshared), or in a packed row its own tokens
                columns[FORWARD_TOKENS][i] = (
                    width[i] if self.packed else (row_width if self.shared else 2 * row_width)
                )
        out = batch
        for name, values in columns.items():
            dtype = (
                pa.list_(pa.float32())
                if name.endswith("token_logps")
                else (pa.int64() if name in (FORWARD_TOKENS, COMPUTED_TOKENS) else pa.float32())
            )
            out = out.append_column(name, pa.array(values, type=dtype))
        report(self.progress, scored=len(ok), tokens=sum(columns[COMPUTED_TOKENS]))
        return out

    def _output_names(self) -> list[str]:
        names = [*cache.REFERENCE_COLUMNS, *cache.LD_REFERENCE_COLUMNS]
        return names + list(cache.TOKEN_LOGPS_COLUMNS) if self.store_token_logps else names

    def _collect(self, columns: dict[str, list], rows: list[int], scores) -> None:
        sums = [t.float().cpu().numpy() for t in (scores.sums, scores.shared_sums, scores.tail_sums)]
        pairs = len(rows)
        column = cache.reference_column
        for k, i in enumerate(rows):
            for side, row in (("chosen", k), ("rejected", pairs + k)):  # chosen rows first, as scored
                columns[column(side)][i] = float(sums[0][row])
                columns[column(side, "shared")][i] = float(sums[1][row])
                columns[column(side, "tail")][i] = float(sums[2][row])
        if self.store_token_logps:
            token_logps = scores.token_logps.cpu()
            mask = scores.target_mask.cpu()
            for k, i in enumerate(rows):
                for side, row in (("chosen", k), ("rejected", pairs + k)):
                    columns[column(side, "token")][i] = token_logps[row][mask[row]].tolist()


def _restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray restarted (False for a scorer called outside Ray)."""
    import ray

    if not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # the property reads Ray's deprecated `actor_id` internally
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)
