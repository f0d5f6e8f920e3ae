"""Stage configurations: one small dataclass per stage, validated on construction.

Each setting is declared once, as a field whose metadata holds its help and, where its values are a
fixed set, its choices: the CLI's flags and the README's configuration reference are generated from
them, and construction checks the choices. The train config's loss settings are `LossSettings`' fields.
Configs load from YAML (keys mirror the CLI flags, with ``-`` or ``_``) and take dotted
overrides such as ``precompute.batch_size=16``.
"""

from raydpo.config.fields import PREFIX_SHARING, local_path_or_id, loss_setting, setting
from raydpo.config.load import (
    apply_overrides,
    as_dict,
    coerce,
    from_mapping,
    load,
    load_yaml,
    missing_required,
)
from raydpo.config.precompute import PrecomputeConfig
from raydpo.config.train import TrainConfig

__all__ = [
    "PREFIX_SHARING",
    "PrecomputeConfig",
    "TrainConfig",
    "apply_overrides",
    "as_dict",
    "coerce",
    "from_mapping",
    "load",
    "load_yaml",
    "local_path_or_id",
    "loss_setting",
    "missing_required",
    "setting",
]
