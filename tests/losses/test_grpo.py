"""GRPO's advantages, per-token loss and averaging against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.grpo import GrpoParams, group_advantages, k3_kl, loss_sums, token_losses


def test_group_advantages_subtract_the_group_mean_and_divide_by_its_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, unbiased std 1; group 2: all equal, so 0 whatever the scale
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 3, "group"), expected)
    torch.testing.assert_close(
        group_advantages(rewards, 3, "none"), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    )
    # batch: deviations from the batch mean 3.5 square-sum to 15.5, so std = sqrt(15.5 / 5)
    batch_std = math.sqrt(15.5 / 5)
    torch.testing.assert_close(
        group_advantages(rewards, 3, "batch"),
        torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (batch_std + 1e-4),
    )


def test_clipped_surrogate_per_token():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1
    up = token_losses(logps, old, torch.tensor([1.0]), GrpoParams(epsilon=0.2))
    # A = +1: -min(1.5, clip 1.2) = -1.2 (clipped high); -min(0.5, 0.8) = -0.5; -1
    torch.testing.assert_close(up.loss, torch.tensor([[-1.2, -0.5, -1.0]]))
    assert up.high_clipped.tolist() == [[True, False, False]]
    assert not up.low_clipped.any()
    down = token_losses(logps, old, torch.tensor([-1.0]), GrpoParams(epsilon=0.2))
    # A = -1: -min(-1.5, -1.2) = 1.5; -min(-0.5, -0.8) = 0.8 (clipped low); 1
    torch.testing.assert_close(down.loss, torch.tensor([[1.5, 0.8, 1.0]]))
    assert down.low_clipped.tolist() == [[False, True, False]]
    dapo = token_losses(logps, old, torch.tensor([1.0]), GrpoParams(epsilon=0.2, epsilon_high=0.28))
    assert dapo.loss[0, 0].item() == pytest.approx(-1.28)


def test_k3_kl_and_the_beta_term():
    logps, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    # d = ref - logp = log 0.5: exp(d) - d - 1 = 0.5 + log 2 - 1
    expected = 0.5 + math.log(2) - 1
    assert k3_kl(logps, ref).item() == pytest.approx(expected)
    losses = token_losses(logps, logps.detach(), torch.tensor([0.0]), GrpoParams(beta=0.1), ref)
    assert losses.loss.item() == pytest.approx(0.1 * expected)
    with pytest.raises(ValueError, match="reference"):
        token_losses(logps, logps, torch.tensor([0.0]), GrpoParams(beta=0.1))


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])  # the 9s are padding after a stop token


@pytest.mark.parametrize(
    ("loss_type", "numerator", "denominator"),
    [
        ("grpo", 2.0 + 4.0, 2.0),  # per-sequence token means 2 and 4, over 2 sequences
        ("bnpo", 10.0 / 4.0, 1.0),  # token mean of the micro-batch
        ("dapo", 10.0, 4.0),  # token sum over the step's token count
        ("dr_grpo", 10.0, 2.0 * 5.0),  # over sequences x max_completion_length (5)
    ],
)
def test_loss_averaging_as_trl(loss_type, numerator, denominator):
    num, den = loss_sums(LOSS, MASK, GrpoParams(loss_type=loss_type, max_completion_length=5))
    assert (num.item(), den.item()) == pytest.approx((numerator, denominator))


def test_dapo_over_micro_batches_is_the_token_mean_of_the_step():
    params = GrpoParams(loss_type="dapo")
    whole = loss_sums(LOSS, MASK, params)
    parts = [loss_sums(LOSS[i : i + 1], MASK[i : i + 1], params) for i in range(2)]
    assert sum(n for n, _ in parts) / sum(d for _, d in parts) == pytest.approx(
        (whole[0] / whole[1]).item()
    )
