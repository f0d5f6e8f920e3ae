"""`PrecomputeConfig`: the settings of `raydpo precompute`, each declared once with its help and choices,
and validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raydpo.config.fields import (
    CPU_ALLOCATORS,
    PREFIX_SHARING,
    RAY_ADDRESS_HELP,
    TRUNCATION_MODES,
    check_choices,
    check_positive,
    local_path_or_id,
    setting,
)
from raydpo.errors import RaydpoError
from raydpo.numerics import DTYPES


@dataclass
class PrecomputeConfig:
    """Settings of the reference log-prob precompute stage (`raydpo precompute`)."""

    model: str = setting(help="Reference model: a local directory or a Hugging Face hub id.")
    dataset: str | None = setting(
        None,
        help=(
            "Preference data: JSON/JSONL/Parquet file or folder (local or pyarrow URI such as s3://), a "
            "dataset saved with `datasets.save_to_disk`, or a name `datasets.load_dataset` accepts."
        ),
    )
    output: str = setting(
        "raydpo-cache",
        help="Output directory; the train split goes to OUTPUT/train, the eval split to OUTPUT/eval.",
    )
    split: str = setting(
        "train", help="Split to read from a Hugging Face dataset; only its files are read and prepared."
    )
    dataset_config: str | None = setting(
        None, help="Config (subset) of a Hugging Face dataset: `datasets.load_dataset`'s `name`."
    )
    dataset_revision: str | None = setting(
        None, help="Branch, tag or commit of a hub dataset (`datasets.load_dataset`'s `revision`)."
    )
    data_files: list[str] | dict[str, Any] | None = setting(
        None,
        help=(
            "Data files of a Hugging Face dataset, as `datasets.load_dataset` takes them: files or patterns "
            "(the train split) or, in YAML, a mapping of split to files. Relative to `dataset` when it is a "
            "folder (`dataset: json` reads them as JSON). Apply, like `dataset_config` and "
            "`dataset_revision`, to `dataset` and to an `eval_dataset` that names the same dataset."
        ),
    )
    eval_dataset: str | None = setting(None, help="Optional eval data, same kinds of source as `dataset`.")
    eval_split: str | None = setting(
        None,
        help=(
            "Split of `eval_dataset` (defaults to `split`); without `eval_dataset`, the eval split is this "
            "split of `dataset`."
        ),
    )
    eval_split_ratio: float | None = setting(
        None,
        help=(
            "Carve the eval split from the training data: each pair goes to eval with this probability, by a "
            "seeded hash of its pair id (a rerun gives the same split; the share is close, not exact)."
        ),
    )
    eval_split_count: int | None = setting(
        None,
        help=(
            "Carve exactly this many pairs from the training data as the eval split: those whose seeded "
            "hash of the pair id is smallest (one more pass over the data tokenizes it to find them)."
        ),
    )
    eval_split_seed: int = setting(0, help="Seed of the hash that carves the eval split.")
    tokenizer: str | None = setting(None, help="Tokenizer to use; defaults to the model's.")
    id_column: str | None = setting(
        None, help="Column holding a stable row id; without it, pair ids are a content hash."
    )
    limit: int | None = setting(
        None, help="Read only the first N rows of each source (smoke runs, benchmarks)."
    )
    max_length: int | None = setting(
        1024,
        help="Maximum prompt+completion tokens per sequence (TRL's default is 1024). None: no truncation.",
    )
    max_prompt_length: int | None = setting(
        None, help="If set, prompts are cut to their last N tokens before `max_length` applies."
    )
    truncation_mode: str = setting(
        "keep_start",
        help="How sequences longer than `max_length` are cut (TRL supports only `keep_start`).",
        choices=TRUNCATION_MODES,
    )
    batch_size: int = setting(
        8, help="Pairs per reference forward (chosen and rejected go through together: 2x sequences)."
    )
    sort_window: int = setting(
        8,
        help="Batches the scorer receives at once and sorts by length, so little of each forward is padding.",
    )
    num_actors: int | None = setting(
        None,
        help=(
            "Scorer actors; None: as many as the cluster's GPUs hold with gpus_per_actor, else one per node "
            "with CPUs, on all of its cores."
        ),
    )
    gpus_per_actor: float = setting(
        0.0,
        help="GPUs per scorer actor, at most 1 (1 on a GPU cluster, a fraction to share one; 0 runs on CPU).",
    )
    cpus_per_actor: float = setting(1.0, help="CPUs per scorer actor (what Ray reserves for it).")
    cpu_threads_per_actor: int | None = setting(
        None,
        help=(
            "Torch threads of a CPU scorer; None: the cores of its node shared among the pool's actors "
            "there (at least `cpus_per_actor`), so one actor on a small machine uses all of its cores."
        ),
    )
    cpu_allocator: str = setting(
        "mimalloc",
        help=(
            'Memory allocator of CPU scorer actors: "mimalloc" (preloaded from the cmeel-mimalloc wheel) or '
            "\"system\" (the C library's malloc). With glibc's malloc a scorer's heap fragments under "
            "forwards of varying shapes and grows with the number of pairs; see docs/benchmarks.md."
        ),
        choices=CPU_ALLOCATORS,
    )
    max_actor_restarts: int = setting(
        3, help="Times Ray restarts a dead scorer actor (its unfinished batches are retried on the new one)."
    )
    rows_per_file: int = setting(
        2048,
        help=(
            "Pairs per Parquet part file; each file is written atomically, and a rerun after a crash "
            "recomputes only the pairs of files that were not written."
        ),
    )
    dtype: str = setting("auto", help="Model dtype; auto: bf16 on GPU, fp32 on CPU.", choices=DTYPES)
    attn_implementation: str | None = setting(
        None,
        help=(
            "Attention kernel passed to transformers (e.g. sdpa, flex_attention, flash_attention_2); None: its "
            "default. Prefix sharing needs sdpa, eager or, on a GPU, flex_attention."
        ),
    )
    logits_chunk_tokens: int = setting(
        2048,
        help="Completion tokens per chunk of the LM head and log-softmax; bounds the [tokens, vocab] buffer.",
    )
    store_token_logps: bool = setting(
        False, help="Also store per-token reference log-probs of each completion."
    )
    prefix_sharing: str = setting(
        "auto",
        help=(
            "One forward per pair, `prompt | chosen | rejected`, so the prompt is computed once: auto (on "
            "where the model's attention passes a load-time check that shared equals unshared), on, or off. "
            "The values are the same either way, so the setting is not part of the cache key."
        ),
        choices=PREFIX_SHARING,
    )
    trust_remote_code: bool = setting(
        False,
        help="Run code shipped with the model repository. Off unless asked for: it executes arbitrary Python.",
    )
    overwrite: bool = setting(False, help="Replace an existing output computed from different inputs.")
    ray_address: str | None = setting(None, help=RAY_ADDRESS_HELP)

    def __post_init__(self) -> None:
        self.model = local_path_or_id(self.model, "model", saved_model=True)
        self.tokenizer = local_path_or_id(self.tokenizer, "tokenizer")
        check_positive(self, "batch_size", "sort_window", "logits_chunk_tokens", "rows_per_file")
        if self.max_actor_restarts < 0:
            raise RaydpoError("max_actor_restarts must be >= 0")
        check_positive(
            self,
            "max_length",
            "max_prompt_length",
            "limit",
            "num_actors",
            "cpu_threads_per_actor",
            allow_none=True,
        )
        if self.cpus_per_actor <= 0 and self.gpus_per_actor <= 0:
            raise RaydpoError("cpus_per_actor must be > 0 when gpus_per_actor is 0")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise RaydpoError("gpus_per_actor and cpus_per_actor must be >= 0")
        if self.gpus_per_actor > 1:
            raise RaydpoError(
                f"gpus_per_actor {self.gpus_per_actor:g}: a scorer actor runs its model on one GPU, so the "
                "others would sit idle; use 1 (or a fraction, to share a GPU). A model larger than one GPU "
                "cannot be scored yet"
            )
        if self.truncation_mode == "keep_end":
            raise RaydpoError(
                "truncation_mode='keep_end' is not supported: use 'keep_start' "
                "('keep_end' is deprecated in TRL and would give chosen and rejected different prompts)"
            )
        check_choices(self)
        self._check_eval_carve()
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise RaydpoError("max_prompt_length must be smaller than max_length")

    def _check_eval_carve(self) -> None:
        """An eval split comes from one place: `eval_dataset`, `eval_split`, a ratio or a count."""
        check_positive(self, "eval_split_count", allow_none=True)
        ratio = self.eval_split_ratio
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
            raise RaydpoError(f"eval_split_ratio must be between 0 and 1, got {ratio!r}")
        carves = [
            name for name in ("eval_split_ratio", "eval_split_count") if getattr(self, name) is not None
        ]
        given = [name for name in ("eval_dataset", "eval_split") if getattr(self, name) is not None]
        if carves and len(carves + given) > 1:
            raise RaydpoError(
                f"{' and '.join(carves + given)} exclude each other: the eval split is carved from the "
                "training data or read from eval_dataset/eval_split, not both"
            )
        if self.data_files is not None and not isinstance(self.data_files, (str, list, dict)):
            raise RaydpoError("data_files must be files, a list of them or a mapping of split to files")

    def tokenization_settings(self) -> dict[str, Any]:
        """The settings that decide the token ids; recorded in the manifest and checked by training."""
        return {
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncation_mode": self.truncation_mode,
        }
