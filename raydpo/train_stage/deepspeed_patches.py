"""Where raydpo changes DeepSpeed's behaviour, each change with what it works around and where upstream
tracks it; `tests/test_deepspeed_patches.py` fails when the installed DeepSpeed no longer does what a
patch assumes.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def keep_clipped_grad_norm(engine) -> None:
    """Clipping at ZeRO stage 0 in fp32, with the norm kept where `get_global_grad_norm` reads it
    (deepspeedai/DeepSpeed#7255: no grad_norm at stage 0).

    DeepSpeed's stage-0 clipping drops the norm it computes, and computes it with fp32 sums, which on
    CPUs are off by 1e-4 relative on a tensor of a few million values. ZeRO's optimizers sum in fp64; so
    does this. Without clipping no norm is computed, and none is logged, as in the Trainer."""
    import torch

    def clip_fp32_gradients() -> None:
        params = [param for param in engine.module.parameters() if param.grad is not None]
        norms = [torch.linalg.vector_norm(param.grad, dtype=torch.float64) for param in params]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), norm)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_fp32_gradients


def load_checkpoint_file(path: str, map_location=None) -> Any:
    """`torch.load(weights_only=True)` of one DeepSpeed checkpoint file: tensors, containers and the
    DeepSpeed classes a ZeRO checkpoint holds (its stage, its loss scaler and, at stages 1 and 2, where
    each parameter's slice lies in the flat partition), never arbitrary pickled objects."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoints_weights_only(engine) -> None:
    """DeepSpeed's torch checkpoint engine unpickles whatever a checkpoint file holds
    (`weights_only=False`, kept by deepspeedai/DeepSpeed#6751 because its own classes are in the
    files; #8500 for the weights-only load that refuses them); every load of model, optimizer and
    client state goes through this method."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.load = load_checkpoint_file
    else:
        logger.warning(
            "checkpoints are loaded by DeepSpeed's %s, which may unpickle them",
            type(engine.checkpoint_engine).__name__,
        )


def skip_allreduce_with_itself(engine) -> None:
    """With one data-parallel rank, no all-reduce after backward: DeepSpeed would copy every gradient into
    a flat bucket, scale it by 1/1, reduce it with itself and copy it back (the same values, a
    gradient-sized buffer more). The bf16 optimizer has summed the gradients into its fp32 buffer
    before; ZeRO's other optimizers reduce into their own buffers there, so they keep it."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if engine.dp_world_size == 1 and (
        not engine.zero_optimization() or isinstance(engine.optimizer, BF16_Optimizer)
    ):
        engine.enable_backward_allreduce = False
