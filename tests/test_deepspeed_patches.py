"""What each patch in `raydpo.train_stage.deepspeed_patches` assumes of the installed DeepSpeed. A test
here fails when upstream fixes or changes the behaviour a patch works around: then the patch is to be
dropped or moved with it."""

from __future__ import annotations

import inspect

import pytest

deepspeed = pytest.importorskip("deepspeed")


def test_torch_checkpoint_engine_still_unpickles_whatever_a_file_holds():
    """`load_checkpoints_weights_only` replaces the load of DeepSpeed's torch checkpoint engine, which
    calls `torch.load(..., weights_only=False)`; if it loads weights-only itself, the patch can go."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    source = inspect.getsource(TorchCheckpointEngine.load)
    assert "torch.load(" in source and "weights_only=False" in source


def test_stage0_clipping_still_drops_its_norm():
    """`keep_clipped_grad_norm` replaces `clip_fp32_gradients`, which clips through DeepSpeed's
    `clip_grad_norm_` and keeps no norm for `get_global_grad_norm` (deepspeedai/DeepSpeed#7255)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine.clip_fp32_gradients)
    assert "clip_grad_norm_(" in source and "_global_grad_norm" not in source
    assert "self.clip_fp32_gradients()" in inspect.getsource(DeepSpeedEngine._take_model_step)


def test_the_backward_allreduce_switch_is_still_read():
    """`skip_allreduce_with_itself` turns off `enable_backward_allreduce`, which the engine's backward
    reads before reducing gradients; a renamed switch would leave the patch doing nothing."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "self.enable_backward_allreduce" in inspect.getsource(DeepSpeedEngine)
