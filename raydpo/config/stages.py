"""The two stage configs, `PrecomputeConfig` and `TrainConfig`: every setting declared once, with its
help and choices, and validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from raydpo.config.fields import (
    CPU_ALLOCATORS,
    LR_SCHEDULERS,
    PREFIX_SHARING,
    RAY_ADDRESS_HELP,
    TRUNCATION_MODES,
    ZERO_STAGES,
    check_choices,
    check_positive,
    local_path_or_id,
    loss_setting,
    setting,
)
from raydpo.errors import RaydpoError
from raydpo.loss_settings import LossSettings
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


@dataclass
class TrainConfig:
    """Settings of the DPO training stage (`raydpo train`)."""

    model: str = setting(
        help="Policy to train: its initial weights must be the precompute's reference model."
    )
    tokenizer: str | None = setting(
        None, help="The tokenizer the cache was made with (precompute --tokenizer); defaults to the model's."
    )
    data: str = setting("raydpo-cache", help="Precompute output (OUTPUT or OUTPUT/train).")
    eval_data: str | None = setting(
        None, help="Precomputed eval split; defaults to DATA/eval when it exists."
    )
    output: str = setting(
        "raydpo-run", help="Run directory: final model, MLflow store (by default), Ray Train results."
    )
    num_workers: int | None = setting(
        None,
        help=(
            "Ray Train workers (one GPU each with use_gpu); None: every GPU of the cluster with use_gpu, else "
            "one worker per node with CPUs, on all of its cores. A resumed run keeps the count it started with."
        ),
    )
    use_gpu: bool = setting(False, help="Train on GPUs (NCCL) instead of CPUs (gloo).")
    cpus_per_worker: float = setting(1.0, help="CPUs reserved by each training worker.")
    cpu_threads_per_worker: int | None = setting(
        None,
        help=(
            "Torch threads of a CPU training worker; None: the cores of its machine shared among the workers "
            "on it (at least `cpus_per_worker`), so one worker on a small machine uses all of its cores."
        ),
    )
    loss_type: list[str] | str = loss_setting("loss_types")
    loss_weights: list[float] | None = loss_setting("loss_weights")
    beta: float = loss_setting("beta")
    label_smoothing: float = loss_setting("label_smoothing")
    f_divergence_type: str = loss_setting("f_divergence_type")
    f_alpha_divergence_coef: float = loss_setting("f_alpha_divergence_coef")
    discopop_tau: float = loss_setting("discopop_tau")
    rpo_alpha: float | None = loss_setting("rpo_alpha")
    use_weighting: bool = loss_setting("use_weighting")
    ld_alpha: float | None = loss_setting("ld_alpha")
    reference_free: bool = loss_setting("reference_free")
    learning_rate: float = setting(1e-6, help="Peak learning rate (TRL's DPO default).")
    lr_scheduler: str = setting("linear", help="Learning-rate decay after warmup.", choices=LR_SCHEDULERS)
    warmup_ratio: float = setting(0.0, help="Share of the steps with a linear warmup.")
    weight_decay: float = setting(
        0.0, help="AdamW weight decay, on every weight but biases and norm weights (as the Trainer decays)."
    )
    epochs: int = setting(1, help="Passes over the training pairs (each with its own seeded shuffle).")
    shuffle: str = setting(
        "files",
        help=(
            "How each epoch is shuffled: files (the part files in a seeded random order, then a seeded buffer "
            "of `shuffle_buffer` pairs in each worker; streams, costs nothing at start) or full (a seeded "
            "permutation of all pairs, Ray Data's all-to-all shuffle: every pair is read and moved before "
            "step 1)."
        ),
        choices=("files", "full"),
    )
    shuffle_buffer: int = setting(4096, help="Pairs in each worker's shuffle buffer (shuffle files).")
    max_steps: int | None = setting(None, help="Optimizer steps; overrides epochs.")
    micro_batch_size: int = setting(8, help="Pairs per worker per forward.")
    grad_accum: int = setting(1, help="Micro-batches accumulated per optimizer step.")
    balance_ranks: bool = setting(
        True,
        help=(
            "Regroup the pairs of all workers' micro-batches so each worker gets as many pairs with near-equal "
            "token counts (ZeRO-3 makes every layer wait for the slowest worker). The step's pairs are the "
            "same; --no-balance-ranks keeps each worker's own micro-batches."
        ),
    )
    gradient_clipping: float = setting(
        1.0, help="Clip the global gradient norm to this value (TRL default 1.0)."
    )
    zero_stage: int = setting(
        3,
        help="DeepSpeed ZeRO stage; a single worker runs stage 0 unless it offloads (nothing to partition); in bf16 and fp16 stage 0 runs as 1 (DeepSpeed's fused 16-bit optimizers).",
        choices=ZERO_STAGES,
    )
    offload_optimizer: bool = setting(False, help="ZeRO: keep optimizer state in CPU memory.")
    offload_params: bool = setting(False, help="ZeRO-3: keep parameters in CPU memory.")
    activation_checkpointing: bool = setting(
        False, help="Recompute activations in backward (less memory, about a third more compute)."
    )
    deepspeed_config: str | None = setting(None, help="A DeepSpeed JSON that replaces the built config.")
    dtype: str = setting(
        "auto",
        help=(
            "Model dtype; auto: bf16 on GPU, fp32 on CPU, as the precompute decides. It must be the dtype the "
            "cache was scored in; bf16/fp16 train with DeepSpeed's 16-bit path."
        ),
        choices=DTYPES,
    )
    attn_implementation: str | None = setting(
        None,
        help=(
            "Attention kernel (sdpa, flex_attention, flash_attention_2, eager); default: the model's. In 16-bit "
            "dtypes it must be the kernel the cache was scored with. Prefix sharing needs sdpa, eager or, on a "
            "GPU, flex_attention."
        ),
    )
    disable_dropout: bool = setting(
        True,
        help=(
            "Set every dropout probability of the policy to 0 (TRL's default): the reference was scored "
            "without dropout, so step 1 reproduces it. --no-disable-dropout trains with the model's dropout."
        ),
    )
    trust_remote_code: bool = setting(
        False,
        help="Run code shipped with the model repository (as in precompute). Only for repositories you trust.",
    )
    lora_r: int | None = setting(None, help="Train a LoRA adapter of this rank instead of all weights.")
    lora_alpha: float = setting(16.0, help="LoRA scaling numerator.")
    lora_dropout: float = setting(0.0, help="Dropout on the LoRA path.")
    lora_target_modules: list[str] | str = setting(
        "all-linear", help="Modules that get LoRA adapters (peft's `target_modules`)."
    )
    logging_steps: int = setting(
        10, help="Log metrics every N optimizer steps (and at step 1, at each checkpoint and at the end)."
    )
    eval_steps: int | None = setting(
        None, help="Evaluate every N steps; the eval split is always evaluated at the end."
    )
    checkpoint_steps: int | None = setting(
        500, help="Save a Ray Train checkpoint (the full DeepSpeed state) every N steps."
    )
    keep_checkpoints: int = setting(2, help="Checkpoints kept in storage.")
    max_failures: int = setting(1, help="Worker failures survived by restarting from the latest checkpoint.")
    storage_path: str | None = setting(
        None,
        help=(
            "Ray Train storage for checkpoints (local path or URI), which many runs may share: each keeps its "
            "checkpoints in its own directory there (storage_name); default OUTPUT/checkpoints."
        ),
    )
    storage_name: str | None = setting(
        None,
        help=(
            "The run's directory in the storage path (Ray Train's run name); default: OUTPUT's base name and "
            "a short hash of its full location (`run-1a2b3c4d`). Recorded in run.json; --resume finds it there."
        ),
    )
    resume: bool = setting(False, help="Continue an interrupted run in OUTPUT from its latest checkpoint.")
    overwrite: bool = setting(False, help="Replace a finished or interrupted run in OUTPUT.")
    skip_nonfinite_loss: bool = setting(
        False,
        help="Skip micro-batches whose loss is NaN/inf (counted) instead of stopping with their pair ids.",
    )
    seed: int = setting(42, help="Seed of the data order and of any random initialisation (LoRA).")
    logits_chunk_tokens: int = setting(
        2048, help="Completion tokens per LM-head chunk: bounds the [tokens, vocab] fp32 buffer."
    )
    prefix_sharing: str = setting(
        "auto",
        help=(
            "One forward and backward per pair, `prompt | chosen | rejected`, so the prompt is computed once: "
            "auto (on where the policy's attention passes a check at start that shared equals unshared), on, "
            "or off. The log-probs and gradients are the same either way."
        ),
        choices=PREFIX_SHARING,
    )
    cpu_allocator: str = setting(
        "mimalloc",
        help=(
            'Memory allocator of CPU training workers: "mimalloc" (preloaded from the cmeel-mimalloc wheel; '
            "freed memory is kept for reuse) or \"system\" (the C library's malloc). glibc's malloc fragments "
            "its heap under ZeRO-3's gather/free churn and grows step after step; see docs/benchmarks.md."
        ),
        choices=CPU_ALLOCATORS,
    )
    mlflow_tracking_uri: str | None = setting(
        None, help="Tracking server; default: $MLFLOW_TRACKING_URI, else a SQLite file in the run directory."
    )
    system_metrics_seconds: float = setting(
        10.0,
        help=(
            "Every N seconds, one worker per node logs its node's CPU, memory, disk, network and GPU use to "
            "the MLflow run (`system/node<i>/...`, MLflow's system metrics); 0 turns it off."
        ),
    )
    experiment: str = setting("raydpo", help="MLflow experiment name.")
    run_name: str | None = setting(
        None,
        help="MLflow run name; default: the model's name, the loss and beta (`Qwen2-0.5B sigmoid beta=0.1`).",
    )
    reference_is_different: bool = setting(
        False,
        help=(
            "The reference of the cache is on purpose not the policy as trained (other weights, dtype or "
            "attention kernel): these are not compared, and step 1 is not required to reproduce it."
        ),
    )
    sync_ref_model: bool = setting(
        False, help="TR-DPO; refused: a fixed cache cannot follow a moving reference."
    )
    ray_address: str | None = setting(None, help=RAY_ADDRESS_HELP)

    def __post_init__(self) -> None:
        self.model = local_path_or_id(self.model, "model", saved_model=True)
        self.tokenizer = local_path_or_id(self.tokenizer, "tokenizer")
        check_positive(
            self,
            "epochs",
            "micro_batch_size",
            "grad_accum",
            "logging_steps",
            "logits_chunk_tokens",
            "shuffle_buffer",
        )
        check_positive(
            self,
            "num_workers",
            "max_steps",
            "eval_steps",
            "checkpoint_steps",
            "lora_r",
            "cpu_threads_per_worker",
            allow_none=True,
        )
        check_positive(self, "keep_checkpoints")
        if not isinstance(self.system_metrics_seconds, (int, float)) or self.system_metrics_seconds < 0:
            raise RaydpoError(f"system_metrics_seconds must be >= 0, got {self.system_metrics_seconds!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise RaydpoError(
                f"max_failures must be an integer >= -1 (-1: unlimited), got {self.max_failures!r}"
            )
        if self.cpus_per_worker <= 0 and not self.use_gpu:
            raise RaydpoError("cpus_per_worker must be > 0 when training on CPUs")
        if self.storage_name is not None and (
            not re.fullmatch(r"[\w.-]+", self.storage_name) or self.storage_name in (".", "..")
        ):
            raise RaydpoError(
                f"storage_name must be one directory name (letters, digits, '.', '-', '_'), got {self.storage_name!r}"
            )
        if self.resume and self.overwrite:
            raise RaydpoError("resume and overwrite exclude each other")
        if self.offload_params and self.zero_stage != 3:
            raise RaydpoError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise RaydpoError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.sync_ref_model:
            raise RaydpoError(
                "sync_ref_model (TR-DPO) needs a reference that moves with the policy; the precomputed "
                "reference is fixed, so it cannot work here"
            )
        check_choices(self)
        if self.learning_rate <= 0 or not 0 <= self.warmup_ratio < 1:
            raise RaydpoError("learning_rate must be > 0 and warmup_ratio in [0, 1)")
        if self.weight_decay < 0 or self.gradient_clipping < 0:
            raise RaydpoError("weight_decay and gradient_clipping must be >= 0 (gradient_clipping 0: none)")
        if self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise RaydpoError("lora_alpha must be > 0 and lora_dropout in [0, 1)")
        self.loss_settings()  # validates the loss combination

    def loss_settings(self) -> LossSettings:
        """The loss settings of this run (`LossSettings` checks their combination)."""
        declared = [f for f in fields(self) if "loss_setting" in f.metadata]
        return LossSettings(**{f.metadata["loss_setting"]: getattr(self, f.name) for f in declared})
