"""raydpo: preference tuning (DPO) of language models at cluster scale on Ray.

Stage 1, `precompute`, computes the reference model's log-probs once on a Ray Data actor pool and caches
them as Parquet; stage 2, `train`, runs DeepSpeed ZeRO-3 DPO on the policy alone under Ray Train.

Importing this package is cheap and has no side effects: the stages load Ray, torch and transformers
when they are called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PrecomputeConfig": "raydpo.config",
    "RaydpoError": "raydpo.errors",
    "precompute": "raydpo.precompute_stage.pipeline",
    "PrecomputeResult": "raydpo.precompute_stage.pipeline",
    "read_output": "raydpo.cache",
    "TrainConfig": "raydpo.config",
    "TrainResult": "raydpo.train_stage",
    "TrainingFailed": "raydpo.errors",
    "train": "raydpo.train_stage",
    "run": "raydpo.job",
    "JobResult": "raydpo.job",
}

if TYPE_CHECKING:
    from raydpo.cache import read_output
    from raydpo.config import PrecomputeConfig, TrainConfig
    from raydpo.errors import RaydpoError, TrainingFailed
    from raydpo.job import JobResult, run
    from raydpo.precompute_stage.pipeline import PrecomputeResult, precompute
    from raydpo.train_stage import TrainResult, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raydpo' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [  # noqa: F822 - resolved lazily by __getattr__
    "JobResult",
    "PrecomputeConfig",
    "PrecomputeResult",
    "RaydpoError",
    "TrainConfig",
    "TrainResult",
    "TrainingFailed",
    "precompute",
    "read_output",
    "run",
    "train",
]
