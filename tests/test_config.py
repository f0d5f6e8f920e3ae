"""Config validation, YAML loading and dotted overrides."""

from __future__ import annotations

import pytest

from raydpo.config import PrecomputeConfig, TrainConfig, apply_overrides, from_mapping, load_yaml
from raydpo.errors import RaydpoError


def test_yaml_with_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("precompute:\n  model: m\n  batch-size: 4\n")
    values = apply_overrides(load_yaml(path), ["precompute.batch_size=16", "precompute.max_length=null"])
    config = from_mapping(PrecomputeConfig, values["precompute"])
    assert (config.batch_size, config.max_length) == (16, None)


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (PrecomputeConfig, {"model": "m", "batch_size": 0}, "batch_size must be a positive integer"),
        (PrecomputeConfig, {"model": "m", "truncation_mode": "keep_end"}, "keep_end"),
        (PrecomputeConfig, {"model": "m", "dtype": "int8"}, "dtype must be one of"),
        (PrecomputeConfig, {"model": "m", "max_length": 64, "max_prompt_length": 64}, "max_prompt_length"),
        (PrecomputeConfig, {"model": "m", "colour": 1}, "unknown PrecomputeConfig setting"),
        (PrecomputeConfig, {}, "missing 1 required positional argument"),
        (TrainConfig, {"model": "m", "beta": 0}, "beta and discopop_tau must be > 0"),
        (TrainConfig, {"model": "m", "loss_type": "dpo++"}, "loss type"),
        (TrainConfig, {"model": "m", "label_smoothing": 0.7, "loss_type": "robust"}, "label_smoothing"),
        (TrainConfig, {"model": "m", "sync_ref_model": True}, "reference is fixed"),
        (TrainConfig, {"model": "m", "zero_stage": 4}, "zero_stage"),
    ],
)
def test_invalid_settings_are_one_clear_error(cls, values, message):
    with pytest.raises(RaydpoError, match=message):
        from_mapping(cls, values)


def test_bad_override_and_yaml(tmp_path):
    with pytest.raises(RaydpoError, match="key=value"):
        apply_overrides({}, ["beta"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(RaydpoError, match="not valid YAML"):
        load_yaml(bad)
