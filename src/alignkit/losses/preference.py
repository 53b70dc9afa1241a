"""Preference losses: one small pure function per loss, registered by name.

Every function takes per-pair summed completion log-probs (`PairLogps`, each field
shape [B]) and the loss hyperparameters (`LossParams`), and returns
`(losses [B], chosen_rewards [B], rejected_rewards [B])`. The caller averages the
losses over pairs and logs the rewards. Names and formulas follow TRL's
`DPOTrainer` (and its CPO/ORPO/KTO trainers for the reference-free and unpaired
losses), so curves can be compared with TRL runs.

Notation in the docstrings: for a pair (x, y_w, y_l), r_w = log pi(y_w|x) - log
pi_ref(y_w|x) and r_l likewise (the log-ratios); d = r_w - r_l; b = beta;
eps = label_smoothing; sigma the logistic function; |y| a completion's token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


@dataclass
class PairLogps:
    """Summed completion log-probs and completion token counts, one entry per pair."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    def chosen_ratio(self) -> Tensor:
        return self.chosen - _need_ref(self.ref_chosen)

    def rejected_ratio(self) -> Tensor:
        return self.rejected - _need_ref(self.ref_rejected)

    def chosen_mean(self) -> Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    def rejected_mean(self) -> Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


def _need_ref(value: Tensor | None) -> Tensor:
    if value is None:
        raise ValueError("this loss needs reference log-probs")
    return value


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def dpo_rewards(lp: PairLogps, p: LossParams) -> tuple[Tensor, Tensor]:
    """Implicit rewards b * r_w and b * r_l (detached): what TRL logs as rewards/*."""
    return (p.beta * lp.chosen_ratio()).detach(), (p.beta * lp.rejected_ratio()).detach()


def policy_rewards(lp: PairLogps, p: LossParams) -> tuple[Tensor, Tensor]:
    """Reference-free rewards b * log pi(y|x) (detached), as TRL's CPO/ORPO log them."""
    return (p.beta * lp.chosen).detach(), (p.beta * lp.rejected).detach()


def chosen_token_nll(lp: PairLogps) -> Tensor:
    """The chosen completions' mean token NLL over the batch, repeated per pair.

    The mean is over all chosen tokens of the batch (as TRL computes it), so the
    per-pair mean the caller takes returns exactly that value.
    """
    value = -lp.chosen.sum() / lp.chosen_tokens.sum().clamp(min=1)
    return value.expand_as(lp.chosen)


def mean_ratio_margin(lp: PairLogps) -> Tensor:
    """r_w/|y_w| - r_l/|y_l|: the log-ratio margin with each ratio averaged over its tokens."""
    return lp.chosen_ratio() / lp.chosen_tokens.clamp(min=1) - lp.rejected_ratio() / (
        lp.rejected_tokens.clamp(min=1)
    )


def smoothed_logistic(logits: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): logistic loss on soft labels."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


# ---------------------------------------------------------------- reference-based, paired


def sigmoid_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """DPO: -log sigma(b d). Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 (eq. 7).

    As in TRL's `sigmoid`, label smoothing is not applied here (see `robust`).
    """
    d = lp.chosen_ratio() - lp.rejected_ratio()
    return -F.logsigmoid(p.beta * d), *dpo_rewards(lp, p)


def hinge_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """SLiC hinge: max(0, 1 - b d). Zhao et al. 2023, https://arxiv.org/abs/2305.10425."""
    d = lp.chosen_ratio() - lp.rejected_ratio()
    return torch.relu(1 - p.beta * d), *dpo_rewards(lp, p)


def ipo_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """IPO, length-normalised as TRL does it: (r_w/|y_w| - r_l/|y_l| - 1/(2b))^2.

    Azar et al. 2023, https://arxiv.org/abs/2310.12036 (eq. 17, tau = b). TRL divides
    each log-ratio by its completion's token count (it checked this with the authors);
    `ipo_unnormalized` is the paper's formula on summed log-ratios.
    """
    d = mean_ratio_margin(lp)
    return (d - 1 / (2 * p.beta)) ** 2, *dpo_rewards(lp, p)


def ipo_unnormalized_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """IPO as written in the paper, on summed log-ratios: (d - 1/(2b))^2.

    Azar et al. 2023, https://arxiv.org/abs/2310.12036 (eq. 17). The loss grows with
    completion length, so b usually needs to be much smaller than for `ipo`.
    """
    d = lp.chosen_ratio() - lp.rejected_ratio()
    return (d - 1 / (2 * p.beta)) ** 2, *dpo_rewards(lp, p)


def robust_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """Robust DPO for noisy labels: [-(1-eps) log sigma(b d) + eps log sigma(-b d)] / (1 - 2 eps).

    Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409 (eq. 7).
    """
    d = lp.chosen_ratio() - lp.rejected_ratio()
    eps = p.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(p.beta * d) + eps * F.logsigmoid(-p.beta * d)) / (
        1 - 2 * eps
    )
    return losses, *dpo_rewards(lp, p)


def exo_pair_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """EXO (pairwise): KL(q || p_eps) with q = (sigma(b d), sigma(-b d)), p_eps = (1 - eps, eps).

    Ji et al. 2024, https://arxiv.org/abs/2402.00856 (eq. 16). Needs eps > 0 (TRL
    uses 1e-3 when label_smoothing is 0; `check_params` enforces it here).
    """
    z = p.beta * (lp.chosen_ratio() - lp.rejected_ratio())
    eps = torch.tensor(p.label_smoothing, dtype=z.dtype, device=z.device)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - torch.log(eps)
    )
    return losses, *dpo_rewards(lp, p)


def nca_pair_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """NCA (pairwise): -log sigma(b r_w) - 1/2 log sigma(-b r_w) - 1/2 log sigma(-b r_l).

    Chen et al. 2024, https://arxiv.org/abs/2402.05369.
    """
    cw, cl = p.beta * lp.chosen_ratio(), p.beta * lp.rejected_ratio()
    losses = -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)
    return losses, *dpo_rewards(lp, p)


def bco_pair_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """BCO (pairwise, no running mean shift): -log sigma(b r_w) - log sigma(-b r_l).

    Jung et al. 2024, https://arxiv.org/abs/2404.04656.
    """
    cw, cl = p.beta * lp.chosen_ratio(), p.beta * lp.rejected_ratio()
    return -F.logsigmoid(cw) - F.logsigmoid(-cl), *dpo_rewards(lp, p)


def sppo_hard_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected):
    (r_w - 1/(2b))^2 + (r_l + 1/(2b))^2. Wu et al. 2024, https://arxiv.org/abs/2405.00675.
    """
    half = 0.5 / p.beta
    losses = (lp.chosen_ratio() - half) ** 2 + (lp.rejected_ratio() + half) ** 2
    return losses, *dpo_rewards(lp, p)


def aot_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """AOT (paired): smoothed logistic loss of b (sort(pi_w - pi_l) - sort(ref_w - ref_l)).

    Melnyk et al. 2024, https://arxiv.org/abs/2406.05882. The log-ratio margins of the
    policy and of the reference are each sorted over the batch and compared rank by
    rank (distributional alignment), so the loss depends on the whole batch.
    """
    policy, _ = torch.sort(lp.chosen - lp.rejected, dim=0)
    ref, _ = torch.sort(_need_ref(lp.ref_chosen) - _need_ref(lp.ref_rejected), dim=0)
    return smoothed_logistic(p.beta * (policy - ref), p.label_smoothing), *dpo_rewards(lp, p)


def aot_unpaired_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """AOT (unpaired): smoothed logistic loss of b (sort(r_w) - sort(r_l)) over the batch.

    Melnyk et al. 2024, https://arxiv.org/abs/2406.05882.
    """
    chosen, _ = torch.sort(lp.chosen_ratio(), dim=0)
    rejected, _ = torch.sort(lp.rejected_ratio(), dim=0)
    return smoothed_logistic(p.beta * (chosen - rejected), p.label_smoothing), *dpo_rewards(lp, p)


def apo_zero_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """APO-zero: 1 - sigma(b r_w) + sigma(b r_l): raise chosen, lower rejected.

    D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266 (eq. 7). For chosen
    answers better than the model's own.
    """
    cw, cl = p.beta * lp.chosen_ratio(), p.beta * lp.rejected_ratio()
    return 1 - torch.sigmoid(cw) + torch.sigmoid(cl), *dpo_rewards(lp, p)


def apo_down_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """APO-down: sigma(b r_w) + 1 - sigma(b (r_w - r_l)): lower both, rejected more.

    D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266 (eq. 8). For chosen
    answers worse than the model's own.
    """
    rw, rl = lp.chosen_ratio(), lp.rejected_ratio()
    losses = torch.sigmoid(p.beta * rw) + 1 - torch.sigmoid(p.beta * (rw - rl))
    return losses, *dpo_rewards(lp, p)


def discopop_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """DiscoPOP (log-ratio modulated): with z = b d and m = sigma(z / tau),
    (1 - m) * (-log sigma(z)) + m * exp(-z). Chris Lu et al. 2024,
    https://arxiv.org/abs/2406.08414 (eq. 5).

    m * exp(-z) is computed as exp(log sigma(z / tau) - z): for very negative z the
    naive product is 0 * inf = NaN, this form is 0 (TRL computes the naive one).
    """
    z = p.beta * (lp.chosen_ratio() - lp.rejected_ratio())
    logistic = torch.sigmoid(-z / p.discopop_tau) * -F.logsigmoid(z)
    return logistic + torch.exp(F.logsigmoid(z / p.discopop_tau) - z), *dpo_rewards(lp, p)


def sft_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """NLL of the chosen completions (mean over the batch's chosen tokens).

    Combined with `sigmoid` it is RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733):
    `pref.rpo_alpha` adds it with that weight. The loss needs no reference, but as in
    TRL the reference is still scored so that the logged rewards are DPO's.
    """
    return chosen_token_nll(lp), *dpo_rewards(lp, p)


def sigmoid_norm_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """Length-normalised DPO: -log sigma(b (r_w/|y_w| - r_l/|y_l|)), as TRL's `sigmoid_norm`."""
    d = mean_ratio_margin(lp)
    return -F.logsigmoid(p.beta * d), *dpo_rewards(lp, p)


# ---------------------------------------------------------------- reference-free, paired


def simpo_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """SimPO: smoothed logistic loss of b (mean log pi(y_w) - mean log pi(y_l)) - gamma.

    Meng et al. 2024, https://arxiv.org/abs/2405.14734 (eq. 6); gamma = pref.simpo_gamma,
    means over each completion's tokens. No reference model. Rewards are b times the
    mean log-probs (as TRL's CPOTrainer logs them for SimPO).
    """
    z = p.beta * (lp.chosen_mean() - lp.rejected_mean()) - p.simpo_gamma
    rewards = (p.beta * lp.chosen_mean()).detach(), (p.beta * lp.rejected_mean()).detach()
    return smoothed_logistic(z, p.label_smoothing), *rewards


def cpo_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """CPO: smoothed logistic loss of b (log pi(y_w) - log pi(y_l)) + alpha * NLL(y_w).

    Xu et al. 2024, https://arxiv.org/abs/2401.08417 (eq. 3 plus the NLL term);
    alpha = pref.cpo_alpha; NLL is the chosen tokens' mean over the batch, as in TRL.
    """
    z = p.beta * (lp.chosen - lp.rejected)
    losses = smoothed_logistic(z, p.label_smoothing) + p.cpo_alpha * chosen_token_nll(lp)
    return losses, *policy_rewards(lp, p)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(lp: PairLogps, p: LossParams) -> LossOutput:
    """ORPO: NLL(y_w) - b log sigma(log odds(y_w) - log odds(y_l)).

    Hong et al. 2024, https://arxiv.org/abs/2403.07691 (eqs. 4-7), b = lambda. The odds
    use the mean token log-prob l of each completion: log odds = l - log(1 - exp(l)).
    NLL is the chosen tokens' mean over the batch. Rewards are b times the mean log-probs.
    """
    cw, cl = lp.chosen_mean(), lp.rejected_mean()
    log_odds = (cw - cl) - (log1mexp(cw) - log1mexp(cl))
    losses = chosen_token_nll(lp) - p.beta * F.logsigmoid(log_odds)
    return losses, (p.beta * cw).detach(), (p.beta * cl).detach()


# ---------------------------------------------------------------- unpaired feedback


def kto_loss(
    logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor, p: LossParams
) -> tuple[Tensor, Tensor]:
    """KTO: w_d (1 - sigma(b (r - z))) for desirable, w_u (1 - sigma(b (z - r))) otherwise.

    Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306 (eq. 7). r = log pi(y|x) -
    log pi_ref(y|x) per completion; z is the reference point: the batch's mean
    log-ratio on mismatched (prompt, completion) pairs, clamped at 0 and not
    differentiated (the caller passes it). Returns (losses [N], rewards [N] = b r).

    Args:
        logps, ref_logps: [N] summed completion log-probs, policy and reference.
        desirable: [N] bool, the feedback label.
        kl: scalar reference point z.
    """
    r = logps - ref_logps
    good = p.desirable_weight * (1 - torch.sigmoid(p.beta * (r - kl)))
    bad = p.undesirable_weight * (1 - torch.sigmoid(p.beta * (kl - r)))
    return torch.where(desirable, good, bad), (p.beta * r).detach()


def kto_reference_point(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """z = max(0, mean(log pi - log pi_ref)) over mismatched pairs, detached (KTO sec. 4)."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[PairLogps, LossParams], LossOutput]
    reference: bool


PAIR_LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, True),
    "hinge": LossSpec(hinge_loss, True),
    "ipo": LossSpec(ipo_loss, True),
    "ipo_unnormalized": LossSpec(ipo_unnormalized_loss, True),
    "robust": LossSpec(robust_loss, True),
    "exo_pair": LossSpec(exo_pair_loss, True),
    "nca_pair": LossSpec(nca_pair_loss, True),
    "bco_pair": LossSpec(bco_pair_loss, True),
    "sppo_hard": LossSpec(sppo_hard_loss, True),
    "aot": LossSpec(aot_loss, True),
    "aot_unpaired": LossSpec(aot_unpaired_loss, True),
    "apo_zero": LossSpec(apo_zero_loss, True),
    "apo_down": LossSpec(apo_down_loss, True),
    "discopop": LossSpec(discopop_loss, True),
    "sft": LossSpec(sft_loss, True),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, True),
    "simpo": LossSpec(simpo_loss, False),
    "cpo": LossSpec(cpo_loss, False),
    "orpo": LossSpec(orpo_loss, False),
}
FEEDBACK_LOSSES = ("kto",)
ALL_LOSSES = (*PAIR_LOSSES, *FEEDBACK_LOSSES)


def needs_reference(names: list[str]) -> bool:
    return any(name in FEEDBACK_LOSSES or PAIR_LOSSES[name].reference for name in names)


def combined_loss(
    lp: PairLogps, names: list[str], weights: list[float], p: LossParams
) -> LossOutput:
    """sum_k w_k * loss_k per pair; the rewards are those of the first loss."""
    outputs = [PAIR_LOSSES[name].fn(lp, p) for name in names]
    total = sum(w * out[0] for w, out in zip(weights, outputs, strict=True))
    return total, outputs[0][1], outputs[0][2]


def pair_metrics(lp: PairLogps, chosen_r: Tensor, rejected_r: Tensor) -> dict[str, Tensor]:
    """Per-pair metric values with TRL's names; the loop averages them over pairs."""
    return {
        "rewards/chosen": chosen_r,
        "rewards/rejected": rejected_r,
        "rewards/accuracies": (chosen_r > rejected_r).float(),
        "rewards/margins": chosen_r - rejected_r,
        "logps/chosen": lp.chosen.detach(),
        "logps/rejected": lp.rejected.detach(),
    }
