"""DPO-family preference losses: pure functions of per-sequence log-probs.

The formulas and dtype handling are those of TRL 1.16 `DPOTrainer._compute_loss`, split into one small
function per loss type so that each can be tested alone. Nothing here talks to other processes or logs:
the trainer computes log-probs, builds `LossInputs` and calls `preference_loss`. The loss types and
their settings are declared in `raydpo.loss_settings` (no torch there, so configs are checked without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raydpo.loss_settings import FDivergence, LossSettings, LossType


@dataclass
class LossInputs:
    """Per-sequence values for a batch of B pairs (the trainer computes them; all shapes [B] unless noted)."""

    chosen_logps: torch.Tensor  # policy, sum over completion tokens
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None  # may be None when the settings need no reference
    ref_rejected_logps: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None  # completion token counts (ipo, sigmoid_norm)
    rejected_lengths: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None  # scalar: mean NLL over all chosen completion tokens (sft, rpo)
    wpo_weights: torch.Tensor | None = None  # chosen weight * rejected weight (use_weighting)


@dataclass
class PairTerms:
    """What the loss functions read: log-ratios against the reference and their f-divergence scores."""

    inputs: LossInputs
    ref_chosen_logps: torch.Tensor  # zeros when reference-free
    ref_rejected_logps: torch.Tensor
    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor  # equal to the log-ratios for reverse KL
    rejected_scores: torch.Tensor

    @property
    def delta_score(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: sum over types of weight * mean per-sequence loss, plus the RPO term
    chosen_rewards: torch.Tensor  # [B], beta * chosen log-ratio, detached
    rejected_rewards: torch.Tensor
    per_type: dict[LossType, torch.Tensor]  # [B] per loss type, as averaged into `loss` (WPO-weighted)


def divergence_scores(logratios: torch.Tensor, f_divergence: FDivergence, alpha_coef: float) -> torch.Tensor:
    """f'(pi / pi_ref) evaluated from the log-ratio, as TRL computes it (f-DPO)."""
    if f_divergence is FDivergence.REVERSE_KL:
        return logratios
    if f_divergence is FDivergence.FORWARD_KL:  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence is FDivergence.JS_DIVERGENCE:  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    # alpha divergence: f'(t) = (t^(alpha-1) - 1) / (alpha - 1); alpha -> 1 is log t (reverse KL)
    if abs(alpha_coef - 1.0) < 1e-6:
        return logratios
    exponent = (alpha_coef - 1.0) * logratios
    dtype = exponent.dtype
    clamp_max = 11.0 if dtype == torch.float16 else 80.0  # keeps exp(.) finite once cast back to dtype
    work_dtype = torch.promote_types(dtype, torch.float32)  # half types are exponentiated in fp32
    powered = torch.exp(torch.clamp(exponent.to(work_dtype), max=clamp_max)) - 1.0
    return powered.to(dtype) * (1.0 / (alpha_coef - 1.0))


def pair_terms(inputs: LossInputs, settings: LossSettings) -> PairTerms:
    """Log-ratios and scores of a batch; reference log-probs count as zero when reference-free or absent
    (absent is allowed only where no loss reads them, e.g. sft alone: then only the rewards see it)."""
    ref_chosen, ref_rejected = inputs.ref_chosen_logps, inputs.ref_rejected_logps
    if settings.reference_free or ref_chosen is None or ref_rejected is None:
        ref_chosen, ref_rejected = (
            torch.zeros_like(inputs.chosen_logps),
            torch.zeros_like(inputs.rejected_logps),
        )
    chosen_logratios = inputs.chosen_logps - ref_chosen
    rejected_logratios = inputs.rejected_logps - ref_rejected
    f_div, coef = settings.f_divergence_type, settings.f_alpha_divergence_coef
    return PairTerms(
        inputs=inputs,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=divergence_scores(chosen_logratios, f_div, coef),
        rejected_scores=divergence_scores(rejected_logratios, f_div, coef),
    )


# One function per loss type: (terms, settings) -> per-sequence loss [B]. Paper references are TRL's.


def sigmoid_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    return -F.logsigmoid(s.beta * terms.delta_score)


def hinge_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    return torch.relu(1 - s.beta * terms.delta_score)


def _length_normalized_delta(terms: PairTerms) -> torch.Tensor:
    chosen = terms.chosen_scores / terms.inputs.chosen_lengths.clamp(min=1.0)
    rejected = terms.rejected_scores / terms.inputs.rejected_lengths.clamp(min=1.0)
    return chosen - rejected


def ipo_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """IPO (Eq. 17), with scores averaged per completion token as TRL does (beta is the paper's tau)."""
    return (_length_normalized_delta(terms) - 1 / (2 * s.beta)) ** 2


def exo_pair_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """EXO-pref (Eq. 16): KL from softmax(beta * delta) over {chosen, rejected} to [1 - eps, eps]."""
    logits = s.beta * terms.delta_score
    epsilon = torch.tensor(s.label_smoothing, device=logits.device)
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-epsilon))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(epsilon))
    return chosen_term + rejected_term


def nca_pair_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    chosen_rewards, rejected_rewards = s.beta * terms.chosen_logratios, s.beta * terms.rejected_logratios
    return (
        -F.logsigmoid(chosen_rewards)
        - 0.5 * F.logsigmoid(-chosen_rewards)
        - 0.5 * F.logsigmoid(-rejected_rewards)
    )


def robust_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """Robust DPO: unbiased under labels flipped with probability `label_smoothing`."""
    clean = -(1 - s.label_smoothing) * F.logsigmoid(s.beta * terms.delta_score)
    flipped = -s.label_smoothing * F.logsigmoid(-s.beta * terms.delta_score)
    return (clean - flipped) / (1 - 2 * s.label_smoothing)


def bco_pair_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    return -F.logsigmoid(s.beta * terms.chosen_logratios) - F.logsigmoid(-s.beta * terms.rejected_logratios)


def sppo_hard_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """SPPO with hard probabilities: P = 1 for the chosen completion, 0 for the rejected one."""
    return (terms.chosen_logratios - 0.5 / s.beta) ** 2 + (terms.rejected_logratios + 0.5 / s.beta) ** 2


def _smoothed_sigmoid(delta: torch.Tensor, s: LossSettings) -> torch.Tensor:
    return (
        -F.logsigmoid(s.beta * delta) * (1 - s.label_smoothing)
        - F.logsigmoid(-s.beta * delta) * s.label_smoothing
    )


def aot_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """AOT (paired): policy and reference chosen-rejected margins, each sorted over the batch."""
    policy_margins, _ = torch.sort(terms.inputs.chosen_logps - terms.inputs.rejected_logps, dim=0)
    ref_margins, _ = torch.sort(terms.ref_chosen_logps - terms.ref_rejected_logps, dim=0)
    return _smoothed_sigmoid(policy_margins - ref_margins, s)


def aot_unpaired_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """AOT (unpaired): chosen and rejected log-ratios, each sorted over the batch."""
    chosen_sorted, _ = torch.sort(terms.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(terms.rejected_logratios, dim=0)
    return _smoothed_sigmoid(chosen_sorted - rejected_sorted, s)


def apo_zero_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """APO-zero (Eq. 7): raise the chosen likelihood, lower the rejected one."""
    return (
        1 - torch.sigmoid(s.beta * terms.chosen_logratios) + torch.sigmoid(s.beta * terms.rejected_logratios)
    )


def apo_down_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """APO-down (Eq. 8): lower both likelihoods, the rejected one more."""
    margin = terms.chosen_logratios - terms.rejected_logratios
    return torch.sigmoid(s.beta * terms.chosen_logratios) + (1 - torch.sigmoid(s.beta * margin))


def discopop_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """DiscoPOP (Eq. 5): logistic and exponential losses blended by sigmoid(logits / tau)."""
    logits = s.beta * terms.delta_score
    modulation = torch.sigmoid(logits / s.discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def sft_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """The chosen NLL (a batch scalar), expanded to [B] like the other losses; its mean is the scalar."""
    return terms.inputs.chosen_nll.expand(terms.inputs.chosen_logps.shape[0])


def sigmoid_norm_loss(terms: PairTerms, s: LossSettings) -> torch.Tensor:
    """The sigmoid loss on scores averaged per completion token."""
    return -F.logsigmoid(s.beta * _length_normalized_delta(terms))


LOSS_FUNCTIONS: dict[LossType, Callable[[PairTerms, LossSettings], torch.Tensor]] = {
    LossType.SIGMOID: sigmoid_loss,
    LossType.HINGE: hinge_loss,
    LossType.IPO: ipo_loss,
    LossType.EXO_PAIR: exo_pair_loss,
    LossType.NCA_PAIR: nca_pair_loss,
    LossType.ROBUST: robust_loss,
    LossType.BCO_PAIR: bco_pair_loss,
    LossType.SPPO_HARD: sppo_hard_loss,
    LossType.AOT: aot_loss,
    LossType.AOT_UNPAIRED: aot_unpaired_loss,
    LossType.APO_ZERO: apo_zero_loss,
    LossType.APO_DOWN: apo_down_loss,
    LossType.DISCOPOP: discopop_loss,
    LossType.SFT: sft_loss,
    LossType.SIGMOID_NORM: sigmoid_norm_loss,
}


def preference_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """The weighted sum of the configured losses over a batch of pairs, plus the RPO term if set."""
    _check_inputs(inputs, settings)
    terms = pair_terms(inputs, settings)

    def weighted(per_sequence: torch.Tensor) -> torch.Tensor:
        if not settings.use_weighting:
            return per_sequence
        return (per_sequence * inputs.wpo_weights).to(per_sequence.dtype)  # TRL multiplies in place

    per_type, loss = {}, 0.0
    for loss_type, weight in zip(settings.loss_types, settings.weights, strict=True):
        per_type[loss_type] = weighted(LOSS_FUNCTIONS[loss_type](terms, settings))
        loss = loss + per_type[loss_type].mean() * weight
    if settings.rpo_alpha is not None:
        loss = loss + weighted(sft_loss(terms, settings)).mean() * settings.rpo_alpha
    return LossOutput(
        loss=loss,
        chosen_rewards=settings.beta * terms.chosen_logratios.detach(),
        rejected_rewards=settings.beta * terms.rejected_logratios.detach(),
        per_type=per_type,
    )


def _check_inputs(inputs: LossInputs, settings: LossSettings) -> None:
    shape = inputs.chosen_logps.shape
    if inputs.chosen_logps.dim() != 1 or inputs.rejected_logps.shape != shape:
        raise ValueError(
            f"chosen/rejected logps must both have shape [B], got {shape} and "
            f"{tuple(inputs.rejected_logps.shape)}"
        )
    required = {
        "ref_chosen_logps": settings.needs_reference,
        "ref_rejected_logps": settings.needs_reference,
        "chosen_lengths": settings.needs_lengths,
        "rejected_lengths": settings.needs_lengths,
        "wpo_weights": settings.use_weighting,
    }
    for name, needed in required.items():
        value = getattr(inputs, name)
        if needed and (value is None or value.shape != shape):
            got = None if value is None else tuple(value.shape)
            raise ValueError(
                f"{[t.value for t in settings.loss_types]} need {name} of shape {tuple(shape)}, got {got}"
            )
    if settings.needs_chosen_nll and (inputs.chosen_nll is None or inputs.chosen_nll.dim() != 0):
        raise ValueError("sft and rpo_alpha need chosen_nll, the mean NLL of the chosen tokens, as a scalar")


def wpo_weights(
    per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """WPO weights (Eq. 2) of 2B sequences, as TRL: exp of the mean over completion tokens of
    log p(token) - log sum_v p_v^2, without gradient. All inputs [2B, T]; the pair weight of the loss
    is chosen weight * rejected weight (`w.chunk(2)`)."""
    completion_lengths = completion_mask.sum(dim=1).clamp_min(1)
    with torch.no_grad():
        aligned_logps = (per_token_logps - log_sum_sq_probs) * completion_mask
    return torch.exp(aligned_logps.sum(dim=1) / completion_lengths)


def ld_combine(shared_logps: torch.Tensor, tail_logps: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO log-probs: the tokens within the shorter completion's length count fully, the rest by alpha."""
    return shared_logps + ld_alpha * tail_logps
