"""`TrainConfig`: the settings of `raydpo train`, each declared once with its help and choices (the loss
settings are `LossSettings`' fields), and validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from raydpo.config.fields import (
    CPU_ALLOCATORS,
    LR_SCHEDULERS,
    PREFIX_SHARING,
    RAY_ADDRESS_HELP,
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
