"""One online step's update from its scored rollouts: GRPO (clipped ratio, k3 KL to the
reference) or online DPO (best against worst completion per prompt, any pair loss).

Gradients of a step are the sum over its micro-batches divided by the step's
normaliser, so accumulation gives the loss of the whole step.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from alignkit.config.check import loss_plan
from alignkit.data.batching import pair_batch
from alignkit.losses.grpo import GrpoParams, group_advantages, loss_sums, token_losses
from alignkit.losses.preference import needs_reference
from alignkit.train.attention import base_model
from alignkit.train.logps import token_logps
from alignkit.train.loop import backward_exact
from alignkit.train.online_setup import OnlineRun
from alignkit.train.pref import loss_params, pair_loss_sums
from alignkit.train.reference import adapter_off, reference_scorer
from alignkit.train.rollout import (
    Rollout,
    best_worst_pairs,
    per_completion,
    rollout_batch,
)


def reference_token_logps(online: OnlineRun, batch: Any, chunk: int) -> torch.Tensor:
    run = online.run
    model = online.ref_model or run.model
    off = (
        adapter_off(run.accelerator.unwrap_model(run.model))
        if online.ref_model is None
        else nullcontext()
    )
    with torch.no_grad(), off:
        return token_logps(model, batch, chunk)


def one_prompt_copy(model: Any) -> bool:
    """Whether all k completions may share one copy of their prompt (full attention; the
    band of a sliding window is built for two branches, so those go two at a time)."""
    return not getattr(base_model(model).config, "sliding_window", None)


def grpo_micro_batch(
    online: OnlineRun, rollouts: list[Rollout], advantages: torch.Tensor, params: GrpoParams
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Numerator and denominator of one micro-batch's loss, and its metric sums over tokens."""
    run, n = online.run, len(rollouts)
    cfg, device = run.recipe.train, run.accelerator.device
    pad = run.data.tokenizer.pad_token_id
    batch = rollout_batch(rollouts, pad, cfg.padding_free, one_prompt_copy(run.model)).to(device)
    logps, mask = per_completion(token_logps(run.model, batch, cfg.logps_chunk), batch, n)
    ref = None
    if params.beta != 0.0:
        ref, _ = per_completion(reference_token_logps(online, batch, cfg.logps_chunk), batch, n)
    losses = token_losses(logps, logps.detach(), advantages.to(device), params, ref)
    numerator, denominator = loss_sums(losses.loss, mask, params)
    m = mask.float()
    sums = {
        "clip_ratio/low_mean": (losses.low_clipped.float() * m).sum(),
        "clip_ratio/high_mean": (losses.high_clipped.float() * m).sum(),
        "clip_ratio/region_mean": ((losses.low_clipped | losses.high_clipped).float() * m).sum(),
        "tokens": m.sum(),
    }
    if losses.kl is not None:
        sums["kl"] = (losses.kl.detach() * m).sum()
    return numerator, denominator, sums


def grpo_update(
    online: OnlineRun, rollouts: list[Rollout], total: list[float]
) -> tuple[float, dict[str, float]]:
    """Backward over the step's micro-batches; gradients divided by the step's normaliser."""
    run = online.run
    cfg = run.recipe.online
    params = GrpoParams(
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        max_completion_length=cfg.max_completion_length,
    )
    advantages = group_advantages(torch.tensor(total), cfg.num_generations, cfg.scale_rewards)
    size = run.recipe.train.micro_batch_size * cfg.num_generations
    loss, denominator, sums = 0.0, 0.0, {}
    for s in range(0, len(rollouts), size):
        with run.accelerator.autocast():
            num, den, part = grpo_micro_batch(
                online, rollouts[s : s + size], advantages[s : s + size], params
            )
        backward_exact(run.accelerator, num)
        loss, denominator = loss + float(num.detach()), denominator + float(den)
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in part.items()}
    scale_gradients(run.model, 1 / max(denominator, 1e-12))
    tokens = sums.pop("tokens")
    return loss / max(denominator, 1e-12), {k: v / max(tokens, 1.0) for k, v in sums.items()}


def online_dpo_update(
    online: OnlineRun, rollouts: list[Rollout], total: list[float]
) -> tuple[float | None, dict[str, float]]:
    """Best-vs-worst pairs trained with pref.loss; the step's loss is the mean over pairs
    (None, and no update, when every prompt's rewards tie)."""
    run = online.run
    recipe, acc = run.recipe, run.accelerator
    pairs, ties = best_worst_pairs(rollouts, total, recipe.online.num_generations)
    metrics: dict[str, float] = {"pairs": float(len(pairs)), "ties": float(ties)}
    if not pairs:
        return None, metrics
    names, weights = loss_plan(recipe.pref)
    score = None
    if needs_reference(names):
        score = reference_scorer(
            run.model, acc.unwrap_model(run.model), online.ref_model, recipe.train.logps_chunk
        )
    layout = "shared" if recipe.train.padding_free else "padded"
    pad = run.data.tokenizer.pad_token_id
    loss, sums = 0.0, {}
    size = recipe.train.micro_batch_size
    for s in range(0, len(pairs), size):
        batch = pair_batch(pairs[s : s + size], pad, layout).to(acc.device)
        with acc.autocast():
            loss_sum, _, part = pair_loss_sums(
                run.model,
                batch,
                score,
                names,
                weights,
                loss_params(recipe.pref),
                recipe.train.logps_chunk,
            )
        backward_exact(acc, loss_sum)
        loss += float(loss_sum.detach())
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in part.items()}
    scale_gradients(run.model, 1 / len(pairs))
    return loss / len(pairs), metrics | {k: v / len(pairs) for k, v in sums.items()}


def scale_gradients(model: Any, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)
