"""The DPO-family loss types and the settings of a loss: which losses, their weights, their parameters.

Plain Python, no torch: the train config declares and checks its loss settings through `LossSettings`
before any heavy import; the math that reads them is in `raydpo.losses`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from raydpo.errors import RaydpoError


class LossType(str, Enum):
    """The loss types of TRL 1.x, with what each needs from the trainer."""

    SIGMOID = "sigmoid"
    HINGE = "hinge"
    IPO = "ipo"
    EXO_PAIR = "exo_pair"
    NCA_PAIR = "nca_pair"
    ROBUST = "robust"
    BCO_PAIR = "bco_pair"
    SPPO_HARD = "sppo_hard"
    AOT = "aot"
    AOT_UNPAIRED = "aot_unpaired"
    APO_ZERO = "apo_zero"
    APO_DOWN = "apo_down"
    DISCOPOP = "discopop"
    SFT = "sft"
    SIGMOID_NORM = "sigmoid_norm"

    def __str__(self) -> str:  # "sigmoid", not "LossType.SIGMOID", in logs and MLflow params
        return self.value

    @property
    def needs_reference(self) -> bool:  # reads ref_chosen/rejected_logps
        return self is not LossType.SFT

    @property
    def length_normalized(self) -> bool:  # divides scores by chosen/rejected_lengths
        return self in (LossType.IPO, LossType.SIGMOID_NORM)

    @property
    def needs_chosen_nll(self) -> bool:  # reads the mean NLL of the chosen completion tokens
        return self is LossType.SFT

    @property
    def batch_coupled(self) -> bool:  # sorts across the batch: a pair's loss depends on the other pairs
        return self in (LossType.AOT, LossType.AOT_UNPAIRED)

    @property
    def uses_label_smoothing(self) -> bool:  # every other loss ignores label_smoothing
        return self in (LossType.EXO_PAIR, LossType.ROBUST, LossType.AOT, LossType.AOT_UNPAIRED)

    @property
    def supports_f_divergence(self) -> bool:  # built on the chosen-rejected score difference (f-DPO)
        return self in _F_DIVERGENCE_LOSSES


_F_DIVERGENCE_LOSSES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)


class FDivergence(str, Enum):
    """The f-divergence regularising the policy towards the reference (f-DPO); reverse KL is plain DPO."""

    REVERSE_KL = "reverse_kl"
    FORWARD_KL = "forward_kl"
    JS_DIVERGENCE = "js_divergence"
    ALPHA_DIVERGENCE = "alpha_divergence"

    def __str__(self) -> str:
        return self.value


LOSS_TYPES = tuple(member.value for member in LossType)
F_DIVERGENCES = tuple(member.value for member in FDivergence)


@dataclass(frozen=True)
class LossSettings:
    """Which losses to combine and their hyper-parameters; strings and lists (from YAML) are accepted.

    Each field's default and help are also the train config's (`TrainConfig` declares its loss settings
    from these fields).
    """

    loss_types: tuple[LossType, ...] | str = field(
        default="sigmoid",
        metadata={
            "help": "Loss type(s), as in TRL; several at once with loss_weights.",
            "choices": LOSS_TYPES,
        },
    )
    loss_weights: tuple[float, ...] | None = field(
        default=None,
        metadata={
            "help": "One weight per loss type (default 1 each), e.g. MPO: sigmoid,bco_pair,sft with 0.8,0.2,1.0."
        },
    )
    beta: float = field(
        default=0.1, metadata={"help": "Strength of the KL penalty towards the reference (TRL default)."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "robust: label flip probability; exo_pair: epsilon; aot/aot_unpaired: smoothing; "
            "in [0, 0.5)."
        },
    )
    f_divergence_type: FDivergence | str = field(
        default="reverse_kl",
        metadata={
            "help": "The f-divergence towards the reference: reverse_kl is standard DPO, the others f-DPO.",
            "choices": F_DIVERGENCES,
        },
    )
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "alpha of alpha_divergence."})
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of the discopop loss."})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "RPO: add rpo_alpha x the NLL of the chosen completions."}
    )
    use_weighting: bool = field(
        default=False,
        metadata={"help": "WPO: weight each pair by the policy probability of its completions."},
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={"help": "LD-DPO: tokens past the shorter completion count with this weight, in [0, 1]."},
    )
    reference_free: bool = field(default=False, metadata={"help": "Take reference log-probs as zero."})

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the dataclass is frozen; normalise the inputs once here
        raw_types = [self.loss_types] if isinstance(self.loss_types, str) else list(self.loss_types)
        set_(self, "loss_types", tuple(_parse_enum(LossType, name, "loss type") for name in raw_types))
        set_(self, "f_divergence_type", _parse_enum(FDivergence, self.f_divergence_type, "f_divergence_type"))
        for name in ("beta", "label_smoothing", "f_alpha_divergence_coef", "discopop_tau"):
            set_(self, name, _finite(getattr(self, name), name))
        for name in ("rpo_alpha", "ld_alpha"):
            if getattr(self, name) is not None:
                set_(self, name, _finite(getattr(self, name), name))
        if self.loss_weights is not None:
            set_(self, "loss_weights", tuple(_finite(w, "loss_weights") for w in self.loss_weights))
        for name in ("use_weighting", "reference_free"):
            if not isinstance(getattr(self, name), bool):
                raise RaydpoError(f"{name} must be true or false, got {getattr(self, name)!r}")

        types, names = self.loss_types, [t.value for t in self.loss_types]
        if not types:
            raise RaydpoError("loss_types must name at least one loss type")
        if len(set(types)) != len(types):
            raise RaydpoError(f"loss_types lists a loss twice: {names}; give it once")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise RaydpoError(f"loss_weights has {len(self.loss_weights)} values for {len(types)} loss types")
        if self.loss_weights is not None and min(self.loss_weights) < 0:
            raise RaydpoError(f"loss_weights must be >= 0, got {list(self.loss_weights)}")
        for name in ("beta", "discopop_tau"):
            if not getattr(self, name) > 0:  # NaN too
                raise RaydpoError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise RaydpoError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if LossType.EXO_PAIR in types and self.label_smoothing == 0:
            raise RaydpoError("exo_pair needs label_smoothing > 0 (its epsilon; the EXO paper suggests 1e-3)")
        if self.label_smoothing > 0 and not any(t.uses_label_smoothing for t in types):
            raise RaydpoError(
                f"label_smoothing has no effect on {names}; only exo_pair, robust, aot, aot_unpaired use it "
                "(for cDPO-style smoothing of the sigmoid loss use 'robust')"
            )
        if self.f_divergence_type is not FDivergence.REVERSE_KL and not all(
            t.supports_f_divergence for t in types
        ):
            raise RaydpoError(
                f"f_divergence_type={self.f_divergence_type.value!r} works only with "
                f"{sorted(_F_DIVERGENCE_LOSSES)}, got {names}; use 'reverse_kl' with these losses"
            )
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise RaydpoError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise RaydpoError(f"ld_alpha must lie in [0, 1], got {self.ld_alpha}")
        if self.use_weighting and any(t.batch_coupled for t in types):
            raise RaydpoError("use_weighting (WPO) does not work with aot/aot_unpaired: they sort pairs")

    @property
    def weights(self) -> tuple[float, ...]:
        """The weight of each loss type (1.0 each when `loss_weights` is not given)."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and any(t.needs_reference for t in self.loss_types)

    @property
    def needs_lengths(self) -> bool:
        return any(t.length_normalized for t in self.loss_types)

    @property
    def needs_chosen_nll(self) -> bool:
        return self.rpo_alpha is not None or any(t.needs_chosen_nll for t in self.loss_types)


def _parse_enum(enum_type: type[Enum], value: object, what: str):
    try:
        return enum_type(value)
    except (ValueError, TypeError):
        valid = ", ".join(member.value for member in enum_type)
        raise RaydpoError(f"unknown {what} {value!r}; expected one of: {valid}") from None


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RaydpoError(f"{name} must be a finite number, got {value!r}")
    return float(value)
