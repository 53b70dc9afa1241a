"""GRPO (DeepSeekMath, arXiv:2402.03300) and its token-averaging variants, as pure
functions over per-token log-probs; names and formulas as TRL's `GRPOTrainer`.

Shapes: B completions (k per prompt, a prompt's k adjacent), T the longest completion;
`mask` [B, T] is 1 on the completion's sampled tokens (its stop token included) and 0
on padding after it.

- Advantages (`group_advantages`): A_i = r_i - mean(group of i), divided by std + 1e-4
  (the unbiased std of the group, or of the batch) unless `scale_rewards` is none
  (Dr. GRPO, arXiv:2503.20783).
- Per-token loss: -min(rho * A, clip(rho, 1 - epsilon, 1 + epsilon_high) * A) with
  rho = exp(logp - logp_old), plus beta * KL, the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 (Schulman, "Approximating KL divergence").
- Averaging (`loss_sums`) returns a numerator and a denominator whose sums over the
  micro-batches of a step give TRL's loss: grpo = mean over sequences of each sequence's
  token mean; bnpo = token mean per micro-batch; dapo (DAPO, arXiv:2503.14476) = token
  mean over the whole step; dr_grpo = token sum / (B * max_completion_length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-4
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


@dataclass(frozen=True)
class GrpoParams:
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    loss_type: str = "dapo"
    max_completion_length: int = 256


@dataclass
class TokenLosses:
    """Per-token loss [B, T] and what is logged of it."""

    loss: torch.Tensor
    kl: torch.Tensor | None  # per-token k3 KL, when beta > 0
    low_clipped: torch.Tensor  # bool [B, T]: ratio below 1 - epsilon with A < 0
    high_clipped: torch.Tensor  # bool [B, T]: ratio above 1 + epsilon_high with A > 0


def group_advantages(rewards: torch.Tensor, k: int, scale_rewards: str = "group") -> torch.Tensor:
    """[B] advantages of rewards [B] in groups of k adjacent completions."""
    grouped = rewards.view(-1, k)
    mean = grouped.mean(dim=1).repeat_interleave(k)
    advantages = rewards - mean
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(k) if k > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards) if len(rewards) > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none; got {scale_rewards}")
    return advantages / (std + STD_EPS)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(d) - d - 1, d = ref - logp (>= 0)."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    params: GrpoParams,
    ref_logps: torch.Tensor | None = None,
) -> TokenLosses:
    """The clipped surrogate (plus beta * KL) per token; advantages [B] per completion."""
    high = params.epsilon if params.epsilon_high is None else params.epsilon_high
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - params.epsilon, 1 + high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if params.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logps, ref_logps)
        loss = loss + params.beta * kl
    return TokenLosses(
        loss=loss,
        kl=kl,
        low_clipped=(ratio < 1 - params.epsilon) & (adv < 0),
        high_clipped=(ratio > 1 + high) & (adv > 0),
    )


def loss_sums(
    loss: torch.Tensor, mask: torch.Tensor, params: GrpoParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) of one micro-batch; a step's loss is sum / sum over its
    micro-batches (micro-batches of equal size, as TRL's)."""
    mask = mask.to(loss.dtype)
    tokens = (loss * mask).sum()
    if params.loss_type == "grpo":
        per_sequence = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum(), torch.tensor(float(loss.shape[0]))
    if params.loss_type == "bnpo":
        return tokens / mask.sum().clamp(min=1.0), torch.tensor(1.0)
    if params.loss_type == "dapo":
        return tokens, mask.sum().detach()
    if params.loss_type == "dr_grpo":
        return tokens, torch.tensor(float(loss.shape[0] * params.max_completion_length))
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {params.loss_type}")
