"""Stage configurations: one small dataclass per stage, validated on construction.

Configs load from YAML (keys mirror the CLI flags, with ``-`` or ``_``) and take dotted
overrides such as ``precompute.batch_size=16``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from raydpo.errors import RaydpoError, one_line
from raydpo.numerics import DTYPES

CPU_ALLOCATORS = ("mimalloc", "system")
TRUNCATION_MODES = ("keep_start",)
PREFIX_SHARING = ("auto", "on", "off")


@dataclass
class PrecomputeConfig:
    """Settings of the reference log-prob precompute stage (`raydpo precompute`)."""

    model: str
    """Reference model: a local directory or a Hugging Face hub id."""
    dataset: str | None = None
    """Preference data: JSON/JSONL/Parquet file or folder (local or pyarrow URI such as s3://),
    a dataset saved with `datasets.save_to_disk`, or a name `datasets.load_dataset` accepts."""
    output: str = "raydpo-cache"
    """Output directory; the train split goes to OUTPUT/train, the eval split to OUTPUT/eval."""
    split: str = "train"
    """Split to read from a Hugging Face dataset."""
    eval_dataset: str | None = None
    """Optional eval data, same kinds of source as `dataset`."""
    eval_split: str | None = None
    """Split of `eval_dataset` (defaults to `split`)."""
    tokenizer: str | None = None
    """Tokenizer to use; defaults to the model's."""
    id_column: str | None = None
    """Column holding a stable row id; without it, pair ids are a content hash."""
    limit: int | None = None
    """Read only the first N rows of each source (smoke runs, benchmarks)."""
    max_length: int | None = 1024
    """Maximum prompt+completion tokens per sequence (TRL's default is 1024). None: no truncation."""
    max_prompt_length: int | None = None
    """If set, prompts are cut to their last N tokens before `max_length` applies."""
    truncation_mode: str = "keep_start"
    """How sequences longer than `max_length` are cut: `keep_start` (TRL's only supported mode)."""
    batch_size: int = 8
    """Pairs per reference forward (chosen and rejected go through together: 2x sequences)."""
    sort_window: int = 8
    """Batches the scorer receives at once and sorts by length, so little of each forward is padding."""
    num_actors: int = 1
    """Size of the scorer actor pool."""
    gpus_per_actor: float = 0.0
    """GPUs per scorer actor (1 on a GPU cluster; 0 runs on CPU)."""
    cpus_per_actor: float = 1.0
    """CPUs per scorer actor (what Ray reserves for it)."""
    cpu_threads_per_actor: int | None = None
    """Torch threads of a CPU scorer; None: the cores of its machine shared among the pool's actors
    (at least `cpus_per_actor`), so one actor on a small machine uses all of its cores."""
    max_actor_restarts: int = 3
    """Times Ray restarts a dead scorer actor (its unfinished batches are retried on the new one)."""
    rows_per_file: int = 2048
    """Pairs per Parquet part file; each file is written atomically, and a rerun after a crash
    recomputes only the pairs of files that were not written."""
    dtype: str = "auto"
    """Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers (e.g. sdpa, flash_attention_2); None: its default."""
    logits_chunk_tokens: int = 2048
    """Completion tokens per chunk of the LM head and log-softmax; bounds the [tokens, vocab] buffer."""
    store_token_logps: bool = False
    """Also store per-token reference log-probs of each completion."""
    prefix_sharing: str = "auto"
    """One forward per pair, `prompt | chosen | rejected`, so the prompt is computed once: auto (on where
    the model's attention passes a load-time check that shared equals unshared), on, or off. The values
    are the same either way, so the setting is not part of the cache key."""
    trust_remote_code: bool = False
    """Run code shipped with the model repository. Off unless asked for: it executes arbitrary Python."""
    overwrite: bool = False
    """Replace an existing output computed from different inputs."""
    ray_address: str | None = None
    """Ray cluster to join: host:port of its head, or "local"; default: $RAY_ADDRESS, else the cluster
    `ray start` recorded on this machine if it answers, else a new local instance (a process already
    connected to Ray stays on its cluster)."""

    def __post_init__(self) -> None:
        self.model, self.tokenizer = local_path_or_id(self.model), local_path_or_id(self.tokenizer)
        _positive(self, "batch_size", "sort_window", "num_actors", "logits_chunk_tokens", "rows_per_file")
        if self.max_actor_restarts < 0:
            raise RaydpoError("max_actor_restarts must be >= 0")
        _positive(self, "max_length", "max_prompt_length", "limit", "cpu_threads_per_actor", allow_none=True)
        if self.cpus_per_actor <= 0 and self.gpus_per_actor <= 0:
            raise RaydpoError("cpus_per_actor must be > 0 when gpus_per_actor is 0")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise RaydpoError("gpus_per_actor and cpus_per_actor must be >= 0")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise RaydpoError(
                f"truncation_mode={self.truncation_mode!r} is not supported: use 'keep_start' "
                "('keep_end' is deprecated in TRL and would give chosen and rejected different prompts)"
            )
        if self.dtype not in DTYPES:
            raise RaydpoError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _choice(self, "prefix_sharing", PREFIX_SHARING)
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise RaydpoError("max_prompt_length must be smaller than max_length")

    def tokenization_settings(self) -> dict[str, Any]:
        """The settings that decide the token ids; recorded in the manifest and checked by training."""
        return {
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncation_mode": self.truncation_mode,
        }


def local_path_or_id(value: str | None) -> str | None:
    """A model or tokenizer given as an existing local directory becomes absolute: Ray workers do not
    share the driver's working directory. Hub ids and URIs pass unchanged."""
    if value is None or "://" in value or not Path(value).expanduser().is_dir():
        return value
    return str(Path(value).expanduser().resolve())


def _choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise RaydpoError(f"{name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")


def _positive(config: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RaydpoError(f"{name} must be a positive integer, got {value!r}")


def from_mapping(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from a mapping whose keys may use `-` or `_`; unknown keys are an error."""
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise RaydpoError(f"unknown {cls.__name__} setting {key!r}")
        kwargs[name] = value
    missing = missing_required(cls, kwargs)
    if missing:
        raise RaydpoError(f"{cls.__name__}: {missing[0]} is required")
    return cls(**kwargs)


def missing_required(cls: type, values: dict[str, Any]) -> list[str]:
    """The settings of a config dataclass that have no default and are absent (or None) in `values`."""
    return [
        f.name
        for f in fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and values.get(f.name) is None
    ]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file gives an empty dict)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise RaydpoError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise RaydpoError(f"config file {path} is not valid YAML: {one_line(error)}") from None
    if not isinstance(data, dict):
        raise RaydpoError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `a.b=value` overrides (values parsed as YAML scalars) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RaydpoError(f"override {item!r} must look like key=value or section.key=value")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RaydpoError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else None
    return values


def load(
    path: str | Path | None, overrides: Sequence[str] = (), section: str | None = None
) -> dict[str, Any]:
    """The settings of a YAML file (none: empty) with dotted overrides applied.

    Without `section`, the whole mapping (a job's `precompute:` and `train:` sections). With it, that
    stage's settings, keys spelled with `_`: the file's `section:` mapping, or the file itself when it
    is flat; overrides may leave out the `section.` prefix.
    """
    values = load_yaml(path) if path else {}
    if section is None:
        return apply_overrides(values, list(overrides))
    nested = values.get(section)
    stage = {
        key.replace("-", "_"): value
        for key, value in (nested if isinstance(nested, dict) else values).items()
    }
    return apply_overrides(stage, [item.removeprefix(f"{section}.") for item in overrides])


Config = TypeVar("Config")


def coerce(
    cls: type[Config], config: Config | Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """A stage's config from what its function was given: a config, a mapping or nothing, with keyword
    overrides on top (validated again when there are any)."""
    overrides = overrides or {}
    if isinstance(config, cls):
        return from_mapping(cls, {**as_dict(config), **overrides}) if overrides else config
    return from_mapping(cls, {**(config or {}), **overrides})


def as_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (for manifests, MLflow params and printing)."""
    return dataclasses.asdict(config)


@dataclass
class TrainConfig:
    """Settings of the DPO training stage (`raydpo train`)."""

    model: str
    """Policy to train: its initial weights must be the precompute's reference model."""
    data: str = "raydpo-cache"
    """Precompute output (OUTPUT or OUTPUT/train)."""
    eval_data: str | None = None
    """Precomputed eval split; defaults to DATA/eval when it exists."""
    output: str = "raydpo-run"
    """Run directory: final model, MLflow store (by default), Ray Train results."""
    num_workers: int = 2
    """Ray Train workers (one GPU each with use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each training worker."""
    loss_type: list[str] | str = "sigmoid"
    """Loss type(s), as in TRL; several at once with loss_weights."""
    loss_weights: list[float] | None = None
    """One weight per loss type (default 1 each), e.g. MPO: sigmoid,bco_pair,sft with 0.8,0.2,1.0."""
    beta: float = 0.1
    """Strength of the KL penalty towards the reference (TRL default)."""
    label_smoothing: float = 0.0
    """robust: label flip probability; exo_pair: epsilon; aot/aot_unpaired: smoothing; in [0, 0.5)."""
    f_divergence_type: str = "reverse_kl"
    """reverse_kl (standard DPO), forward_kl, js_divergence or alpha_divergence (f-DPO)."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of alpha_divergence."""
    discopop_tau: float = 0.05
    """Temperature of the discopop loss."""
    rpo_alpha: float | None = None
    """RPO: add rpo_alpha x the NLL of the chosen completions."""
    use_weighting: bool = False
    """WPO: weight each pair by the policy probability of its completions."""
    ld_alpha: float | None = None
    """LD-DPO: tokens past the shorter completion count with this weight, in [0, 1]."""
    reference_free: bool = False
    """Take reference log-probs as zero."""
    learning_rate: float = 1e-6
    """Peak learning rate (TRL's DPO default)."""
    lr_scheduler: str = "linear"
    """linear or cosine decay after warmup."""
    warmup_ratio: float = 0.0
    """Share of the steps with a linear warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay, on weight matrices only."""
    epochs: int = 1
    """Passes over the training pairs (each with its own seeded shuffle)."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs."""
    micro_batch_size: int = 8
    """Pairs per worker per forward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value (TRL default 1.0)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (0-3)."""
    offload_optimizer: bool = False
    """ZeRO: keep optimizer state in CPU memory."""
    offload_params: bool = False
    """ZeRO-3: keep parameters in CPU memory."""
    activation_checkpointing: bool = False
    """Recompute activations in backward (less memory, about a third more compute)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON that replaces the built config."""
    dtype: str = "auto"
    """Model dtype: auto (bf16 on GPU, fp32 on CPU, as the precompute decides), float32, bfloat16 or
    float16. It must be the dtype the cache was scored in; bf16/fp16 train with DeepSpeed's 16-bit path."""
    attn_implementation: str | None = None
    """Attention kernel (sdpa, flash_attention_2, eager); default: the model's. In 16-bit dtypes it must
    be the kernel the cache was scored with."""
    disable_dropout: bool = True
    """Set every dropout probability of the policy to 0 (TRL's default): the reference was scored
    without dropout, so step 1 reproduces it. --no-disable-dropout trains with the model's dropout."""
    trust_remote_code: bool = False
    """Run code shipped with the model repository (as in precompute). Only for repositories you trust."""
    lora_r: int | None = None
    """Train a LoRA adapter of this rank instead of all weights."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get LoRA adapters (peft's `target_modules`)."""
    logging_steps: int = 10
    """Log metrics every N optimizer steps (and at step 1)."""
    eval_steps: int | None = None
    """Evaluate every N steps; the eval split is always evaluated at the end."""
    checkpoint_steps: int | None = 500
    """Save a Ray Train checkpoint (the full DeepSpeed state) every N steps."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage."""
    max_failures: int = 1
    """Worker failures survived by restarting from the latest checkpoint."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints (local path or URI); default OUTPUT/checkpoints."""
    resume: bool = False
    """Continue an interrupted run in OUTPUT from its latest checkpoint."""
    overwrite: bool = False
    """Replace a finished or interrupted run in OUTPUT."""
    skip_nonfinite_loss: bool = False
    """Skip micro-batches whose loss is NaN/inf (counted) instead of stopping with their pair ids."""
    seed: int = 42
    """Seed of the data order and of any random initialisation (LoRA)."""
    logits_chunk_tokens: int = 2048
    """Completion tokens per LM-head chunk: bounds the [tokens, vocab] fp32 buffer."""
    prefix_sharing: str = "auto"
    """One forward and backward per pair, `prompt | chosen | rejected`, so the prompt is computed once:
    auto (on where the policy's attention passes a check at start that shared equals unshared), on,
    or off. The log-probs and gradients are the same either way."""
    cpu_allocator: str = "mimalloc"
    """Memory allocator of CPU training workers: "mimalloc" (preloaded from the cmeel-mimalloc wheel;
    freed memory is kept for reuse) or "system" (the C library's malloc). glibc's malloc fragments
    its heap under ZeRO-3's gather/free churn and grows step after step; see docs/benchmarks.md."""
    mlflow_tracking_uri: str | None = None
    """Tracking server; default: $MLFLOW_TRACKING_URI, else a SQLite file in the run directory."""
    experiment: str = "raydpo"
    """MLflow experiment name."""
    reference_is_different: bool = False
    """The reference of the cache is on purpose not the policy as trained (other weights, dtype or
    attention kernel): these are not compared, and step 1 is not required to reproduce it."""
    sync_ref_model: bool = False
    """TR-DPO; refused: a fixed cache cannot follow a moving reference."""
    ray_address: str | None = None
    """Ray cluster to join: host:port of its head, or "local"; default: $RAY_ADDRESS, else the cluster
    `ray start` recorded on this machine if it answers, else a new local instance (a process already
    connected to Ray stays on its cluster)."""

    def __post_init__(self) -> None:
        self.model = local_path_or_id(self.model)
        _positive(
            self,
            "num_workers",
            "epochs",
            "micro_batch_size",
            "grad_accum",
            "logging_steps",
            "logits_chunk_tokens",
        )
        _positive(self, "max_steps", "eval_steps", "checkpoint_steps", "lora_r", allow_none=True)
        _positive(self, "keep_checkpoints")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise RaydpoError(
                f"max_failures must be an integer >= -1 (-1: unlimited), got {self.max_failures!r}"
            )
        if self.cpus_per_worker <= 0 and not self.use_gpu:
            raise RaydpoError("cpus_per_worker must be > 0 when training on CPUs")
        if self.resume and self.overwrite:
            raise RaydpoError("resume and overwrite exclude each other")
        if self.offload_params and self.zero_stage != 3:
            raise RaydpoError("offload_params needs zero_stage 3")
        if self.sync_ref_model:
            raise RaydpoError(
                "sync_ref_model (TR-DPO) needs a reference that moves with the policy; the precomputed "
                "reference is fixed, so it cannot work here"
            )
        if self.dtype not in DTYPES:
            raise RaydpoError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise RaydpoError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.cpu_allocator not in CPU_ALLOCATORS:
            raise RaydpoError(
                f"cpu_allocator must be {' or '.join(CPU_ALLOCATORS)}, got {self.cpu_allocator!r}"
            )
        _choice(self, "prefix_sharing", PREFIX_SHARING)
        if self.lr_scheduler not in ("linear", "cosine"):
            raise RaydpoError(f"lr_scheduler must be linear or cosine, got {self.lr_scheduler!r}")
        if self.learning_rate <= 0 or not 0 <= self.warmup_ratio < 1:
            raise RaydpoError("learning_rate must be > 0 and warmup_ratio in [0, 1)")
        self.loss_settings()  # validates the loss combination

    def loss_settings(self):
        from raydpo.losses import LossSettings

        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        return LossSettings(
            loss_types=tuple(types),
            loss_weights=tuple(self.loss_weights) if self.loss_weights is not None else None,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.discopop_tau,
            rpo_alpha=self.rpo_alpha,
            use_weighting=self.use_weighting,
            ld_alpha=self.ld_alpha,
            reference_free=self.reference_free,
        )


__all__ = [
    "PrecomputeConfig",
    "TrainConfig",
    "apply_overrides",
    "as_dict",
    "coerce",
    "from_mapping",
    "load",
    "load_yaml",
]
