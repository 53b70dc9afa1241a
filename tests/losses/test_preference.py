"""Each preference loss against hand-worked values; edge cases stay finite.

The reference pair used throughout (one pair unless stated):
  log pi(y_w) = -10, log pi(y_l) = -14, log ref(y_w) = -11, log ref(y_l) = -12,
  |y_w| = 4, |y_l| = 2  =>  r_w = 1, r_l = -2, d = r_w - r_l = 3; beta b = 0.5, b d = 1.5.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.preference import (
    PAIR_LOSSES,
    LossParams,
    PairLogps,
    combined_loss,
    kto_loss,
    kto_reference_point,
    pair_metrics,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def nls(x: float) -> float:
    """-log sigma(x)"""
    return math.log1p(math.exp(-x))


def pairs(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairLogps(
        t(chosen), t(rejected), t(chosen_tokens), t(rejected_tokens), t(ref_chosen), t(ref_rejected)
    )


ONE = pairs([-10.0], [-14.0], [-11.0], [-12.0], [4.0], [2.0])
P = LossParams(beta=0.5)

HAND_WORKED = {
    "sigmoid": (P, nls(1.5)),
    "hinge": (LossParams(beta=0.1), 1 - 0.1 * 3),  # max(0, 1 - 0.3)
    # r_w/|y_w| - r_l/|y_l| = 1/4 + 2/2 = 1.25; 1/(2b) = 1
    "ipo": (P, (1.25 - 1) ** 2),
    "ipo_unnormalized": (P, (3 - 1) ** 2),
    "robust": (
        LossParams(beta=0.5, label_smoothing=0.1),
        (0.9 * nls(1.5) - 0.1 * nls(-1.5)) / (1 - 0.2),
    ),
    "exo_pair": (
        LossParams(beta=0.5, label_smoothing=0.1),
        sig(1.5) * (-nls(1.5) - math.log(0.9)) + sig(-1.5) * (-nls(-1.5) - math.log(0.1)),
    ),
    # b r_w = 0.5, b r_l = -1
    "nca_pair": (P, nls(0.5) + 0.5 * nls(-0.5) + 0.5 * nls(1.0)),
    "bco_pair": (P, nls(0.5) + nls(1.0)),
    "sppo_hard": (P, (1 - 1) ** 2 + (-2 + 1) ** 2),  # 1/(2b) = 1
    "apo_zero": (P, 1 - sig(0.5) + sig(-1.0)),
    "apo_down": (P, sig(0.5) + 1 - sig(1.5)),
    # tau = 1: m = sigma(1.5); (1 - m) * -log sigma(1.5) + m * exp(-1.5)
    "discopop": (
        LossParams(beta=0.5, discopop_tau=1.0),
        (1 - sig(1.5)) * nls(1.5) + sig(1.5) * math.exp(-1.5),
    ),
    "sft": (P, 10 / 4),  # mean NLL of the chosen tokens
    "sigmoid_norm": (P, nls(0.5 * 1.25)),
    # means: -10/4 = -2.5 and -14/2 = -7; b (4.5) - gamma = 2.25 - 0.5
    "simpo": (LossParams(beta=0.5, simpo_gamma=0.5), nls(1.75)),
    # b (-10 + 14) = 2, plus alpha * NLL = 2.5
    "cpo": (LossParams(beta=0.5, cpo_alpha=1.0), nls(2.0) + 2.5),
    # log odds = (-2.5 + 7) - (log(1 - e^-2.5) - log(1 - e^-7)); NLL 2.5 - b log sigma(.)
    "orpo": (
        P,
        2.5 + 0.5 * nls(4.5 - (math.log(1 - math.exp(-2.5)) - math.log(1 - math.exp(-7)))),
    ),
}


@pytest.mark.parametrize("name", HAND_WORKED)
def test_loss_matches_hand_worked_value(name):
    params, expected = HAND_WORKED[name]
    losses, chosen_r, rejected_r = PAIR_LOSSES[name].fn(ONE, params)
    assert losses.item() == pytest.approx(expected, abs=1e-9)
    if PAIR_LOSSES[name].reference:  # DPO's implicit rewards b r_w and b r_l
        b = params.beta
        assert (chosen_r.item(), rejected_r.item()) == pytest.approx((b * 1, b * -2))


def test_every_registered_pair_loss_is_hand_checked():
    assert set(HAND_WORKED) | {"aot", "aot_unpaired"} == set(PAIR_LOSSES)


# Two pairs for the batch-sorting AOT losses:
#   A: pi margin -10 - -14 = 4, ref margin -11 - -12 = 1; r_w = 1, r_l = -2
#   B: pi margin -5 - -3 = -2, ref margin -4 - -6 = 2;    r_w = -1, r_l = 3
TWO = pairs([-10.0, -5.0], [-14.0, -3.0], [-11.0, -4.0], [-12.0, -6.0], [4.0, 4.0], [2.0, 2.0])


def test_aot_compares_sorted_margins():
    # sorted pi margins [-2, 4] minus sorted ref margins [1, 2] = [-3, 2]; b = 0.5
    losses, _, _ = PAIR_LOSSES["aot"].fn(TWO, P)
    assert losses.tolist() == pytest.approx([nls(-1.5), nls(1.0)])


def test_aot_unpaired_compares_sorted_log_ratios():
    # sorted r_w [-1, 1] minus sorted r_l [-2, 3] = [1, -2]
    losses, _, _ = PAIR_LOSSES["aot_unpaired"].fn(TWO, P)
    assert losses.tolist() == pytest.approx([nls(0.5), nls(-1.0)])


def test_kto_uses_the_clamped_mismatched_reference_point():
    # mismatched log-ratios 0.5 and -0.1: z = 0.2
    z = kto_reference_point(torch.tensor([-20.0, -21.0]), torch.tensor([-20.5, -20.9]))
    assert z.item() == pytest.approx(0.2)
    losses, rewards = kto_loss(
        torch.tensor([-10.0, -14.0]),
        torch.tensor([-11.0, -12.0]),
        torch.tensor([True, False]),
        z,
        P,
    )
    # desirable r = 1: 1 - sigma(b (1 - 0.2)); undesirable r = -2: 1 - sigma(b (0.2 + 2))
    assert losses.tolist() == pytest.approx([1 - sig(0.4), 1 - sig(1.1)])
    assert rewards.tolist() == pytest.approx([0.5, -1.0])
    assert kto_reference_point(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == 0


def test_weighted_combination_and_metrics():
    losses, chosen_r, rejected_r = combined_loss(ONE, ["sigmoid", "sft"], [1.0, 0.5], P)
    assert losses.item() == pytest.approx(nls(1.5) + 0.5 * 2.5)
    metrics = pair_metrics(ONE, chosen_r, rejected_r)
    assert metrics["rewards/margins"].item() == pytest.approx(1.5)
    assert metrics["rewards/accuracies"].item() == 1.0
    assert metrics["logps/chosen"].item() == -10


def extreme(margin: float) -> PairLogps:
    """log pi(y_w) - log pi(y_l) = margin, both log-probs <= -5 (valid probabilities)."""
    lp = pairs([-5.0 - max(0.0, -margin)], [-5.0 - max(0.0, margin)], [-5.0], [-5.0], [3.0], [3.0])
    lp.chosen.requires_grad_(True)
    lp.rejected.requires_grad_(True)
    return lp


PARAMS = LossParams(beta=0.5, label_smoothing=0.1)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("margin", [0.0, 1e4, -1e4])
def test_no_nan_or_inf_at_ties_and_huge_margins(name, margin):
    lp = extreme(margin)
    losses, chosen_r, rejected_r = PAIR_LOSSES[name].fn(lp, PARAMS)
    losses.sum().backward()
    grads = [g for g in (lp.chosen.grad, lp.rejected.grad) if g is not None]  # sft: no rejected
    for value in (losses, chosen_r, rejected_r, *grads):
        assert torch.isfinite(value).all(), (name, margin, value)


def test_equal_log_probs_give_the_known_tie_values():
    tie = pairs([-5.0], [-5.0], [-5.0], [-5.0], [3.0], [3.0])
    assert PAIR_LOSSES["sigmoid"].fn(tie, P)[0].item() == pytest.approx(math.log(2))
    assert PAIR_LOSSES["apo_zero"].fn(tie, P)[0].item() == pytest.approx(1.0)
    assert PAIR_LOSSES["ipo"].fn(tie, P)[0].item() == pytest.approx(1.0)  # (0 - 1)^2


def test_discopop_stays_finite_where_the_naive_blend_overflows():
    # b d = -500: exp(-z) overflows float32, but its weight sigma(z / tau) underflows to 0
    lp = pairs([-5.0], [-5.0], [-5.0], [-5.0], [3.0], [3.0])
    lp.chosen = torch.tensor([-1005.0], dtype=torch.float32)
    lp.rejected = torch.tensor([-5.0], dtype=torch.float32)
    lp.ref_chosen, lp.ref_rejected = lp.ref_chosen.float(), lp.ref_rejected.float()
    loss = PAIR_LOSSES["discopop"].fn(lp, LossParams(beta=0.5))[0]
    assert loss.item() == pytest.approx(500.0, rel=1e-4)  # -log sigma(-500) = 500
