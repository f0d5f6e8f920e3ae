"""Preference losses: hand-derived values, an independent scalar re-derivation, and TRL's own code.

The TRL check runs the real `DPOTrainer._compute_loss` of the installed TRL on a fake model output: the
method is read from TRL's source file and compiled alone, so the test does not import transformers.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from raydpo.errors import RaydpoError
from raydpo.losses import (
    LOSS_FUNCTIONS,
    FDivergence,
    LossInputs,
    LossSettings,
    LossType,
    divergence_scores,
    ld_combine,
    preference_loss,
    wpo_weights,
)

LN2 = math.log(2)


def softplus(x: float) -> float:
    """-log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def pairs(chosen, rejected, ref_chosen=None, ref_rejected=None, **extra) -> LossInputs:
    """LossInputs from lists (float64); reference log-probs default to zero, so log-ratios = log-probs."""
    t = lambda values: None if values is None else torch.tensor(values, dtype=torch.float64)  # noqa: E731
    ref_chosen = [0.0] * len(chosen) if ref_chosen is None else ref_chosen
    ref_rejected = [0.0] * len(rejected) if ref_rejected is None else ref_rejected
    fields = {k: (torch.tensor(v) if k == "chosen_nll" else t(v)) for k, v in extra.items()}
    return LossInputs(t(chosen), t(rejected), t(ref_chosen), t(ref_rejected), **fields)


def loss_of(inputs: LossInputs, **settings) -> float:
    return preference_loss(inputs, LossSettings(**settings)).loss.item()


# --- every loss type on fixed values -----------------------------------------------------------------

# (loss type, settings, inputs, expected, derivation). Log-ratios are the log-probs (reference zero).
HAND_CASES = [
    ("sigmoid", {}, pairs([0.0], [0.0]), LN2, "delta 0: -log sigmoid(0) = ln 2"),
    ("sigmoid", {"beta": 0.5}, pairs([2.0], [-2.0]), softplus(-2), "beta*delta = 2: log(1 + e^-2)"),
    ("hinge", {"beta": 0.5}, pairs([1.0], [0.0]), 0.5, "relu(1 - 0.5*1)"),
    ("hinge", {"beta": 0.5}, pairs([3.0], [-1.0]), 0.0, "relu(1 - 0.5*4) = 0: margin met"),
    (
        "ipo",
        {"beta": 0.5},
        pairs([4.0, 0.0], [-2.0, 0.0], chosen_lengths=[4, 0], rejected_lengths=[2, 0]),
        (1.0 + 1.0) / 2,
        "pair 1: 4/4 - (-2/2) = 2, (2 - 1/(2*0.5))^2 = 1; pair 2: lengths clamp to 1, (0 - 1)^2 = 1",
    ),
    (
        "exo_pair",
        {"label_smoothing": 0.1},
        pairs([0.0], [0.0]),
        math.log(0.5) - 0.5 * math.log(0.1 * 0.9),
        "q = (1/2, 1/2): KL(q || (0.9, 0.1)) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)",
    ),
    ("nca_pair", {}, pairs([0.0], [0.0]), 2 * LN2, "ln2 + 0.5 ln2 + 0.5 ln2"),
    ("robust", {"label_smoothing": 0.2}, pairs([0.0], [0.0]), LN2, "((0.8 - 0.2) ln2) / (1 - 0.4)"),
    (
        "robust",
        {"beta": 0.5, "label_smoothing": 0.2},
        pairs([2.0], [-2.0]),
        (0.8 * softplus(-2) - 0.2 * softplus(2)) / 0.6,
        "x = 2: ((1-e) softplus(-x) - e softplus(x)) / (1 - 2e)",
    ),
    ("bco_pair", {}, pairs([0.0], [0.0]), 2 * LN2, "-log sigmoid(0) - log sigmoid(0)"),
    ("sppo_hard", {"beta": 0.5}, pairs([1.0], [-1.0]), 0.0, "targets +-1/(2 beta) = +-1 are met exactly"),
    ("sppo_hard", {"beta": 0.5}, pairs([0.0], [0.0]), 2.0, "(0 - 1)^2 + (0 + 1)^2"),
    (
        "aot",
        {"beta": 1.0},
        pairs([3.0, 0.0], [0.0, 1.0], ref_chosen=[0.0, 2.0], ref_rejected=[0.0, 0.0]),
        (softplus(1) + softplus(-1)) / 2,
        "policy margins (3, -1) sort to (-1, 3), reference (0, 2) to (0, 2): deltas (-1, 1)",
    ),
    (
        "aot",
        {"beta": 1.0, "label_smoothing": 0.25},
        pairs([1.0], [0.0]),
        0.75 * softplus(-1) + 0.25 * softplus(1),
        "delta 1 with smoothing e: (1-e) softplus(-1) + e softplus(1)",
    ),
    (
        "aot_unpaired",
        {"beta": 1.0},
        pairs([2.0, -1.0], [0.0, 1.0]),
        (softplus(1) + softplus(-1)) / 2,
        "chosen (2, -1) sorts to (-1, 2), rejected (0, 1) to (0, 1): deltas (-1, 1)",
    ),
    ("apo_zero", {}, pairs([0.0], [0.0]), 1.0, "(1 - 1/2) + 1/2"),
    ("apo_zero", {"beta": 0.5}, pairs([2.0], [-2.0]), 2 * (1 - sigmoid(1)), "1 - s(1) + s(-1)"),
    ("apo_down", {}, pairs([0.0], [0.0]), 1.0, "1/2 + (1 - 1/2)"),
    ("apo_down", {"beta": 0.5}, pairs([2.0], [-2.0]), sigmoid(1) + 1 - sigmoid(2), "s(1) + 1 - s(0.5*4)"),
    ("discopop", {}, pairs([0.0], [0.0]), 0.5 * LN2 + 0.5, "mix 1/2: 0.5 ln2 + 0.5 e^0"),
    ("sft", {}, pairs([-3.0, 0.0], [0.0, 0.0], chosen_nll=1.5), 1.5, "the chosen NLL itself"),
    (
        "sigmoid_norm",
        {"beta": 0.5},
        pairs([4.0], [-2.0], chosen_lengths=[4], rejected_lengths=[2]),
        softplus(-1),
        "per-token delta 1 - (-1) = 2, beta*2 = 1: -log sigmoid(1)",
    ),
]


@pytest.mark.parametrize(
    ("loss_type", "settings", "inputs", "expected", "derivation"),
    HAND_CASES,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(HAND_CASES)],
)
def test_loss_by_hand(loss_type, settings, inputs, expected, derivation):
    """Each case carries its derivation. Inputs are float64; exo_pair's epsilon is a float32 tensor as in
    TRL, hence rel=1e-7 rather than float64 precision."""
    out = preference_loss(inputs, LossSettings(loss_types=(loss_type,), **settings))
    assert out.loss.item() == pytest.approx(expected, rel=1e-7, abs=1e-12), derivation
    assert set(out.per_type) == {LossType(loss_type)}


def test_every_loss_type_has_a_function_and_a_hand_case():
    assert set(LOSS_FUNCTIONS) == set(LossType)
    assert {LossType(case[0]) for case in HAND_CASES} == set(LossType)


# --- an independent scalar re-derivation on random values --------------------------------------------


def scalar_loss(lt: str, xc: float, xr: float, d: float, norm: float, nll: float, beta, eps, tau) -> float:
    """One pair's loss from its paper, in Python floats. xc, xr: chosen and rejected log-ratios; d: the
    margin the loss compares (xc - xr; AOT: after sorting); norm: the per-token margin (ipo, sigmoid_norm)."""
    z = beta * d
    if lt == "sigmoid":
        return softplus(-z)
    if lt == "hinge":
        return max(0.0, 1 - z)
    if lt == "ipo":
        return (norm - 1 / (2 * beta)) ** 2
    if lt == "exo_pair":  # KL((s(z), s(-z)) || (1 - eps, eps))
        return sigmoid(z) * math.log(sigmoid(z) / (1 - eps)) + sigmoid(-z) * math.log(sigmoid(-z) / eps)
    if lt == "nca_pair":
        return softplus(-beta * xc) + 0.5 * softplus(beta * xc) + 0.5 * softplus(beta * xr)
    if lt == "robust":
        return ((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2 * eps)
    if lt == "bco_pair":
        return softplus(-beta * xc) + softplus(beta * xr)
    if lt == "sppo_hard":
        return (xc - 1 / (2 * beta)) ** 2 + (xr + 1 / (2 * beta)) ** 2
    if lt in ("aot", "aot_unpaired"):
        return (1 - eps) * softplus(-z) + eps * softplus(z)
    if lt == "apo_zero":
        return 1 - sigmoid(beta * xc) + sigmoid(beta * xr)
    if lt == "apo_down":
        return sigmoid(beta * xc) + 1 - sigmoid(z)
    if lt == "discopop":
        return (1 - sigmoid(z / tau)) * softplus(-z) + sigmoid(z / tau) * math.exp(-z)
    if lt == "sft":
        return nll
    assert lt == "sigmoid_norm"
    return softplus(-beta * norm)


def scalar_losses(lt: str, c, r, rc, rr, lc, lr, nll, beta, eps, tau) -> list[float]:
    """`scalar_loss` over a batch; the AOT losses pair up sorted margins instead of each pair's own."""
    xc = [a - b for a, b in zip(c, rc, strict=True)]  # chosen log-ratios
    xr = [a - b for a, b in zip(r, rr, strict=True)]
    margins = [a - b for a, b in zip(xc, xr, strict=True)]
    if lt == "aot":  # policy margins and reference margins, each sorted
        policy = sorted(a - b for a, b in zip(c, r, strict=True))
        reference = sorted(a - b for a, b in zip(rc, rr, strict=True))
        margins = [a - b for a, b in zip(policy, reference, strict=True)]
    if lt == "aot_unpaired":
        margins = [a - b for a, b in zip(sorted(xc), sorted(xr), strict=True)]
    return [
        scalar_loss(
            lt, xc[i], xr[i], margins[i], xc[i] / max(lc[i], 1) - xr[i] / max(lr[i], 1), nll, beta, eps, tau
        )
        for i in range(len(c))
    ]


@pytest.mark.parametrize("loss_type", [t.value for t in LossType])
def test_matches_scalar_formulas_on_random_values(loss_type):
    """The per-sequence losses equal a float-by-float re-derivation, on 6 random pairs."""
    g = torch.Generator().manual_seed(1)
    c, r, rc, rr = (-10 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    lc, lr = (torch.randint(0, 12, (6,), generator=g) for _ in range(2))
    eps = 0.1 if LossType(loss_type).uses_label_smoothing else 0.0
    settings = LossSettings(loss_types=(loss_type,), beta=0.3, label_smoothing=eps, discopop_tau=0.5)
    inputs = LossInputs(c, r, rc, rr, lc, lr, chosen_nll=torch.tensor(2.5, dtype=torch.float64))
    out = preference_loss(inputs, settings)
    expected = scalar_losses(loss_type, *(v.tolist() for v in (c, r, rc, rr, lc, lr)), 2.5, 0.3, eps, 0.5)
    rel = 1e-6 if loss_type == "exo_pair" else 1e-10  # exo_pair's epsilon is a float32 tensor, as in TRL
    assert out.per_type[LossType(loss_type)].tolist() == pytest.approx(expected, rel=rel, abs=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 6, rel=rel)


# --- f-divergences ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("divergence", "coef", "logratio", "expected"),
    [
        ("reverse_kl", 0.5, 1.25, 1.25),  # f'(t) = log t
        ("forward_kl", 0.5, LN2, 0.5),  # f'(t) = 1 - 1/t at t = 2
        ("js_divergence", 0.5, 0.0, 0.0),  # f'(t) = log(2t / (t + 1)) at t = 1
        ("js_divergence", 0.5, LN2, math.log(4 / 3)),  # at t = 2
        ("alpha_divergence", 0.5, -2 * LN2, -2.0),  # (t^(a-1) - 1)/(a-1) at t = 1/4, a = 1/2: (2-1)/(-1/2)
        ("alpha_divergence", 2.0, LN2, 1.0),  # a = 2, t = 2: (2 - 1)/1
        ("alpha_divergence", 1.0, 0.7, 0.7),  # a = 1 is the log t limit (reverse KL)
        ("alpha_divergence", 0.5, -200.0, -2 * (math.exp(80) - 1)),  # exponent 100 clamped to 80 in fp32
    ],
)
def test_divergence_scores(divergence, coef, logratio, expected):
    score = divergence_scores(torch.tensor([logratio]), FDivergence(divergence), coef)
    assert score.dtype == torch.float32
    assert score.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_alpha_divergence_fp16_clamp_and_dtype():
    """fp16 exponents are capped at 11 (exp(11) ~ 59874 < 65504) and the result keeps fp16. With a = 3 the
    score is (e^(2x) - 1) / 2: x = -30 gives (e^-60 - 1) / 2 = -1/2; x = 30 gives (e^11 - 1) / 2."""
    scores = divergence_scores(
        torch.tensor([-30.0, 30.0], dtype=torch.float16), FDivergence.ALPHA_DIVERGENCE, 3
    )
    assert scores.dtype == torch.float16
    assert scores.tolist() == pytest.approx([-0.5, (math.exp(11) - 1) / 2], rel=1e-3)


def test_f_divergence_reaches_the_loss():
    """sigmoid with forward KL: scores 1 - e^-x; chosen x = ln 2 -> 1/2, rejected x = 0 -> 0; beta 2 -> z = 1."""
    out = preference_loss(pairs([LN2], [0.0]), LossSettings(beta=2.0, f_divergence_type="forward_kl"))
    assert out.loss.item() == pytest.approx(softplus(-1))
    assert out.chosen_rewards.item() == pytest.approx(2 * LN2)  # rewards stay beta * log-ratio


# --- combinations, RPO, WPO, LD-DPO, reference-free ------------------------------------------------------


def test_mpo_like_weighted_combination():
    """All log-ratios zero: 0.8 * ln2 (sigmoid) + 0.2 * 2 ln2 (bco_pair) + 1.0 * 1.5 (sft)."""
    inputs = pairs([0.0, 0.0], [0.0, 0.0], chosen_nll=1.5)
    loss = loss_of(inputs, loss_types=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1])
    assert loss == pytest.approx(1.2 * LN2 + 1.5)


def test_rpo_adds_alpha_times_chosen_nll_like_an_sft_term():
    """RPO: ln 2 + 0.5 * 2.0; the same as loss_types (sigmoid, sft) with weights (1, 0.5), WPO included."""
    inputs = pairs([0.0, 0.0], [0.0, 0.0], chosen_nll=2.0, wpo_weights=[0.5, 1.0])
    assert loss_of(inputs, rpo_alpha=0.5) == pytest.approx(LN2 + 1.0)
    for weighting in (False, True):
        rpo = loss_of(inputs, rpo_alpha=0.5, use_weighting=weighting)
        sft = loss_of(inputs, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_weighting=weighting)
        assert rpo == pytest.approx(sft)


def test_wpo_weights_scale_each_pair():
    """Zero log-ratios, pair weights (0.5, 1.0): mean(ln2 * 0.5, ln2 * 1.0) = 0.75 ln 2."""
    inputs = pairs([0.0, 0.0], [0.0, 0.0], wpo_weights=[0.5, 1.0])
    out = preference_loss(inputs, LossSettings(use_weighting=True))
    assert out.loss.item() == pytest.approx(0.75 * LN2)
    assert out.per_type[LossType.SIGMOID].tolist() == pytest.approx([0.5 * LN2, LN2])


def test_wpo_weights_helper():
    """Row 0: log p = log sum p^2 = ln 1/2 on both tokens -> exp(0) = 1. Row 1: ln 1/4 - ln 1/2 = ln 1/2
    on its one token -> 1/2. Row 2 has no completion token: the length clamps to 1, exp(0) = 1. Values
    outside the mask are ignored; the weights carry no gradient."""
    mask = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    logps = torch.log(torch.tensor([[0.5, 0.5, 0.1], [0.9, 0.25, 0.1], [0.3, 0.3, 0.3]])).requires_grad_()
    log_sum_sq = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.5, 0.2], [0.1, 0.1, 0.1]]))
    weights = wpo_weights(logps, log_sum_sq, mask)
    assert weights.tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert not weights.requires_grad


def test_ld_combine():
    """shared 2 + 0.25 * tail 4 = 3; alpha 1 is the plain sum, alpha 0 drops the tail."""
    shared, tail = torch.tensor([2.0]), torch.tensor([4.0])
    assert [ld_combine(shared, tail, a).item() for a in (0.25, 1.0, 0.0)] == [3.0, 6.0, 2.0]


def test_reference_free_ignores_reference_values():
    """Reference taken as zero: -log sigmoid(0.5 * (1 - (-1))) = softplus(-1), whatever the reference says."""
    settings = LossSettings(beta=0.5, reference_free=True)
    with_ref = preference_loss(pairs([1.0], [-1.0], ref_chosen=[9.0], ref_rejected=[-9.0]), settings)
    without = preference_loss(LossInputs(torch.tensor([1.0]), torch.tensor([-1.0])), settings)
    assert with_ref.loss.item() == pytest.approx(softplus(-1)) == without.loss.item()
    assert without.chosen_rewards.item() == 0.5
    assert not settings.needs_reference


def test_rewards_are_detached_and_the_loss_has_gradients():
    """Policy equals reference: loss ln 2 and d loss / d chosen_logps = -beta * sigmoid(0) / B = -0.025."""
    chosen, rejected = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    out = preference_loss(LossInputs(chosen, rejected, torch.zeros(2), torch.zeros(2)), LossSettings())
    out.loss.backward()
    assert out.loss.item() == pytest.approx(LN2)
    assert chosen.grad.tolist() == pytest.approx([-0.025, -0.025])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


# --- properties and settings ------------------------------------------------------------------------------


def test_loss_type_properties():
    members = {name: LossType(name) for name in [t.value for t in LossType]}
    assert [n for n, t in members.items() if not t.needs_reference] == ["sft"]
    assert [n for n, t in members.items() if t.length_normalized] == ["ipo", "sigmoid_norm"]
    assert [n for n, t in members.items() if t.needs_chosen_nll] == ["sft"]
    assert [n for n, t in members.items() if t.batch_coupled] == ["aot", "aot_unpaired"]
    assert [n for n, t in members.items() if t.uses_label_smoothing] == [
        "exo_pair",
        "robust",
        "aot",
        "aot_unpaired",
    ]


def test_settings_accept_plain_strings_and_lists():
    settings = LossSettings(loss_types="ipo", f_divergence_type="js_divergence", beta=1)
    assert settings.loss_types == (LossType.IPO,) and settings.f_divergence_type is FDivergence.JS_DIVERGENCE
    assert settings.weights == (1.0,) and settings.needs_lengths and settings.needs_reference
    settings = LossSettings(loss_types=["sigmoid", "sft"], loss_weights=[1, 2])
    assert settings.loss_types == (LossType.SIGMOID, LossType.SFT) and settings.loss_weights == (1.0, 2.0)
    assert settings.needs_chosen_nll and not settings.needs_lengths
    assert LossSettings(rpo_alpha=1).needs_chosen_nll
    assert not LossSettings(loss_types=["sft"]).needs_reference
    assert f"{LossType.SIGMOID_NORM} {FDivergence.JS_DIVERGENCE}" == "sigmoid_norm js_divergence"


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"loss_types": ["sigmoid", "kto_pair"]}, "unknown loss type 'kto_pair'"),
        ({"loss_types": []}, "at least one"),
        ({"loss_types": ["sigmoid", "sigmoid"]}, "lists a loss twice"),
        ({"f_divergence_type": "kl"}, "unknown f_divergence_type 'kl'"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": float("nan")}, "beta must be a finite number"),
        ({"beta": "0.1"}, "beta must be a finite number"),
        ({"loss_types": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 values for 2 loss types"),
        ({"loss_weights": [-1.0]}, "loss_weights must be >= 0"),
        ({"loss_types": ["robust"], "label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\)"),
        ({"loss_types": ["robust"], "label_smoothing": -0.1}, r"label_smoothing must lie in \[0, 0.5\)"),
        ({"loss_types": ["exo_pair"]}, "exo_pair needs label_smoothing > 0"),
        ({"label_smoothing": 0.1}, "label_smoothing has no effect on"),
        ({"loss_types": ["bco_pair"], "f_divergence_type": "forward_kl"}, "works only with"),
        ({"loss_types": ["sigmoid", "aot"], "f_divergence_type": "alpha_divergence"}, "works only with"),
        ({"f_alpha_divergence_coef": float("inf")}, "f_alpha_divergence_coef must be a finite number"),
        ({"discopop_tau": 0.0}, "discopop_tau must be > 0"),
        ({"rpo_alpha": -0.1}, "rpo_alpha must be >= 0"),
        ({"ld_alpha": 1.5}, r"ld_alpha must lie in \[0, 1\]"),
        ({"ld_alpha": -0.1}, r"ld_alpha must lie in \[0, 1\]"),
        ({"loss_types": ["aot_unpaired"], "use_weighting": True}, "does not work with aot"),
        ({"use_weighting": "yes"}, "use_weighting must be true or false"),
    ],
)
def test_settings_reject(settings, match):
    with pytest.raises(ValueError, match=match):
        LossSettings(**settings)
    with pytest.raises(RaydpoError):  # the CLI prints it as one line
        LossSettings(**settings)


@pytest.mark.parametrize(
    ("settings", "inputs", "match"),
    [
        ({}, LossInputs(torch.zeros(2), torch.zeros(2)), "need ref_chosen_logps"),
        ({"loss_types": ["ipo"]}, pairs([0.0], [0.0]), "need chosen_lengths"),
        ({"loss_types": ["sft"]}, pairs([0.0], [0.0]), "need chosen_nll"),
        ({"rpo_alpha": 1.0}, pairs([0.0], [0.0]), "need chosen_nll"),
        ({"use_weighting": True}, pairs([0.0], [0.0]), "need wpo_weights"),
        ({}, pairs([0.0, 1.0], [0.0]), "shape"),
    ],
)
def test_missing_or_misshaped_inputs(settings, inputs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(inputs, LossSettings(**settings))


# --- TRL's own `_compute_loss` on the same batch ---------------------------------------------------------


@pytest.fixture(scope="module")
def trl_compute_loss():
    """`DPOTrainer._compute_loss` of the installed TRL, compiled from its source alone."""
    spec = importlib.util.find_spec("trl")  # finds the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("trl is not installed")
    path = Path(spec.origin).parent / "trainer" / "dpo_trainer.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DPOTrainer")
    method = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "_compute_loss")
    namespace = {"torch": torch, "F": F, "math": math, "warnings": warnings}
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["_compute_loss"]


def make_batch(
    num_pairs: int = 4, width: int = 10, dtype=torch.float32, seed: int = 0, ref_spread: float = 2.0
):
    """TRL's layout: 2B rows (chosen then rejected), a prompt then a completion, right padding; the
    reference sums differ from the policy's by ref_spread * N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * num_pairs, width, dtype=torch.long)
    for row in range(2 * num_pairs):
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        length = int(torch.randint(1, width - prompt + 1, (1,), generator=g))
        completion_mask[row, prompt : prompt + length] = 1
    shift_mask = completion_mask[:, 1:]
    token_logps = (-3 * torch.rand(shift_mask.shape, generator=g) * shift_mask).to(dtype)
    log_sum_sq = (-2 * torch.rand(shift_mask.shape, generator=g) - 0.5) * shift_mask
    ref = token_logps.float().sum(dim=1) + ref_spread * torch.randn(2 * num_pairs, generator=g)
    return completion_mask, token_logps, log_sum_sq.to(dtype), ref.to(dtype)


def run_trl(compute_loss, batch, settings: LossSettings):
    completion_mask, token_logps, log_sum_sq, ref = batch
    zeros = torch.zeros_like(token_logps)
    outputs = SimpleNamespace(
        log_probs=token_logps,
        entropy=zeros,
        mean_logits=zeros,
        is_top1=zeros.bool(),
        log_sum_sq_probs=log_sum_sq,
    )
    same = lambda t: t  # noqa: E731 - one process: gathering is the identity
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same),
        aux_loss_enabled=False,
        precompute_ref_logps=True,  # the reference log-probs come with the batch
        ld_alpha=settings.ld_alpha,
        f_divergence_type=settings.f_divergence_type.value,
        f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
        loss_types=[t.value for t in settings.loss_types],
        loss_weights=list(settings.weights),
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        use_weighting=settings.use_weighting,
        args=SimpleNamespace(discopop_tau=settings.discopop_tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss, trainer._metrics["train"]


def run_ours(batch, settings: LossSettings):
    """What the trainer will do: per-sequence sums, lengths, chosen NLL, WPO weights, LD-DPO sums."""
    completion_mask, token_logps, log_sum_sq, ref = batch
    shift_mask = completion_mask[:, 1:]
    if settings.ld_alpha is None:
        logps = token_logps.sum(dim=1)
    else:  # tokens past the shorter completion of the pair form the tail; counted by position
        lengths = shift_mask.sum(dim=1)
        shared_len = torch.minimum(*lengths.chunk(2)).repeat(2)
        position = shift_mask.cumsum(dim=1)
        shared = token_logps * ((position <= shared_len[:, None]) & shift_mask.bool())
        logps = ld_combine(shared.sum(dim=1), (token_logps - shared).sum(dim=1), settings.ld_alpha)
    chosen_mask = shift_mask.chunk(2)[0].bool()
    weights = wpo_weights(token_logps, log_sum_sq, shift_mask).chunk(2)
    inputs = LossInputs(
        *logps.chunk(2),
        *ref.chunk(2),
        *completion_mask.sum(dim=1).chunk(2),
        chosen_nll=-token_logps.chunk(2)[0][chosen_mask].mean(),
        wpo_weights=weights[0] * weights[1],
    )
    return preference_loss(inputs, settings)


TRL_CASES = (
    [{"loss_types": [t.value]} for t in LossType if t.value not in ("exo_pair",)]
    + [{"loss_types": ["exo_pair"], "label_smoothing": 1e-3}]
    + [
        {"loss_types": [t], "f_divergence_type": f}
        for t in ["sigmoid", "sigmoid_norm", "hinge", "ipo", "robust", "discopop", "sft"]
        for f in ["forward_kl", "js_divergence", "alpha_divergence"]
    ]
    + [{"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": a} for a in (0.0, 1.0, 1.5, 3.0)]
    + [{"loss_types": ["exo_pair"], "label_smoothing": 0.05, "f_divergence_type": "js_divergence"}]
    + [{"loss_types": [t], "label_smoothing": 0.2} for t in ["robust", "aot", "aot_unpaired"]]
    + [{"loss_types": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}]
    + [
        {"loss_types": [t], "use_weighting": True}
        for t in ["sigmoid", "hinge", "ipo", "bco_pair", "apo_down"]
    ]
    + [{"loss_types": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2], "use_weighting": True}]
    + [{"ld_alpha": a} for a in (0.0, 0.5, 1.0)]
    + [{"loss_types": ["ipo"], "ld_alpha": 0.3}]
)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("settings", TRL_CASES, ids=str)
def test_matches_trl_compute_loss(trl_compute_loss, settings, beta):
    settings = LossSettings(beta=beta, **settings)
    batch = make_batch()
    trl_loss, metrics = run_trl(trl_compute_loss, batch, settings)
    ours = run_ours(batch, settings)
    torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-6, atol=1e-7)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-6)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"loss_types": ["ipo"]},
        {"loss_types": ["exo_pair"], "label_smoothing": 0.01},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 3.0},  # fp16: exp(2x) clamped
        {"loss_types": ["sigmoid", "sft"], "use_weighting": False},
    ],
    ids=str,
)
def test_matches_trl_in_half_precision(trl_compute_loss, settings, dtype):
    """Same dtypes in, same result and result dtype out, bit for bit (TRL's clamp caps for fp16/bf16)."""
    settings = LossSettings(beta=2.0, **settings)
    batch = make_batch(dtype=dtype, seed=3, ref_spread=8.0)  # log-ratios up to ~12: past fp16's clamp at 11
    trl_loss, _ = run_trl(trl_compute_loss, batch, settings)
    ours = run_ours(batch, settings)
    assert ours.loss.dtype == trl_loss.dtype
    torch.testing.assert_close(ours.loss, trl_loss, rtol=0, atol=0, equal_nan=True)
