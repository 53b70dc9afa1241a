"""On-policy training (`alignkit online`): sample, score, train; the loop and the save
(setup in `online_setup`, the updates in `online_update`).

Each step takes `train.micro_batch_size x train.gradient_accumulation_steps` prompts,
samples `online.num_generations` completions of each from the current policy
(`train.rollout`), scores them with the rewards (`alignkit.rewards`), and trains with

- GRPO (`losses.grpo`): group-normalised advantages, the clipped ratio, the k3 KL to
  the reference when `online.beta` > 0, TRL's token averaging; or
- online DPO: per prompt the best completion against the worst, trained with
  `pref.loss` (any pair loss); prompts whose k rewards tie give no pair (counted).

The reference is the policy with its adapter off (LoRA), else a frozen copy. The
training forward is the offline stages' one (padding-free rows, chunked log-probs),
with the k completions of a prompt as branches on one copy of it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

from alignkit import rundir
from alignkit.config import Recipe
from alignkit.config.check import check
from alignkit.console import captured, live_progress
from alignkit.rewards import score_all, weighted_sum
from alignkit.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from alignkit.train.loop import MetricsLog
from alignkit.train.online_setup import (
    OnlineRun,
    PromptIds,
    check_online_setup,
    prepare_online,
    prompts_per_step,
)
from alignkit.train.online_update import grpo_update, online_dpo_update
from alignkit.train.rollout import (
    Rollout,
    SamplingSettings,
    sample_rollouts,
    step_seed,
)
from alignkit.train.stage import (
    finish,
    open_output_dir,
)

CURVES = [
    ["reward", "eval_reward"],
    ["loss"],
    ["completions/mean_length"],
    ["kl", "clip_ratio/region_mean"],
]


def step_prompts(online: OnlineRun, state: TrainState) -> tuple[list[PromptIds], int, int]:
    """The next step's prompts in this epoch's seeded order, and the position after them."""
    n, per_step = len(online.prompts), prompts_per_step(online.recipe)
    epoch, start = state.epoch, state.micro_batch
    if start + per_step > n:  # an epoch's incomplete tail is dropped, as offline
        epoch, start = epoch + 1, 0
    seed = online.recipe.train.seed * 1_000_003 + epoch
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [online.prompts[i] for i in order[start : start + per_step]]
    return chosen, epoch, start + per_step


def sampling_settings(recipe: Recipe) -> SamplingSettings:
    cfg = recipe.online
    return SamplingSettings(
        k=cfg.num_generations,
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
    )


def sample_step(
    online: OnlineRun, chosen: list[PromptIds], step: int
) -> tuple[list[Rollout], list[str]]:
    """Rollouts of the step's prompts and their texts (special tokens left out)."""
    run = online.run
    tokenizer = run.data.tokenizer
    rollouts = sample_rollouts(
        run.accelerator.unwrap_model(run.model),
        [p.ids for p in chosen],
        sampling_settings(run.recipe),
        online.stop_ids,
        tokenizer.pad_token_id,
        step_seed(run.recipe.train.seed, step),
    )
    texts = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    return rollouts, [t.strip() for t in texts]


def reward_metrics(scores: dict[str, list[float]], total: list[float], k: int) -> dict[str, float]:
    """TRL's reward metrics: per function mean and std, the summed reward's mean and std,
    and the fraction of groups whose rewards are all equal."""
    record: dict[str, float] = {}
    for name, values in scores.items():
        record[f"rewards/{name}/mean"] = statistics.fmean(values)
        record[f"rewards/{name}/std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    groups = [total[g : g + k] for g in range(0, len(total), k)]
    record["reward"] = statistics.fmean(total)
    record["reward_std"] = statistics.stdev(total) if len(total) > 1 else 0.0
    record["frac_reward_zero_std"] = statistics.fmean(float(len(set(g)) == 1) for g in groups)
    return record


def completion_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    lengths = [len(r.completion_ids) for r in rollouts]
    return {
        "completions/mean_length": statistics.fmean(lengths),
        "completions/min_length": float(min(lengths)),
        "completions/max_length": float(max(lengths)),
        "completions/clipped_ratio": statistics.fmean(float(not r.stopped) for r in rollouts),
    }


def train_step(online: OnlineRun, state: TrainState) -> dict[str, float]:
    """Sample, score, update; the step's metrics with TRL's names."""
    run = online.run
    chosen, epoch, position = step_prompts(online, state)
    k = run.recipe.online.num_generations
    started = time.perf_counter()
    rollouts, texts = sample_step(online, chosen, state.step)
    sampled = time.perf_counter()
    prompts = [p.prompt for p in chosen for _ in range(k)]
    scores = score_all(online.rewards, prompts, texts)
    total = weighted_sum(scores, online.rewards)
    scored = time.perf_counter()
    update = grpo_update if run.recipe.online.algorithm == "grpo" else online_dpo_update
    loss, metrics = update(online, rollouts, total)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    cfg = run.recipe.train
    grad_norm = (
        run.accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
        if cfg.max_grad_norm > 0
        else None
    )
    lr = online.scheduler.get_last_lr()[0]
    online.optimizer.step()
    online.scheduler.step()
    online.optimizer.zero_grad(set_to_none=True)
    done = time.perf_counter()
    sampled_tokens = sum(len(r.completion_ids) for r in rollouts)
    state.step, state.epoch, state.micro_batch = state.step + 1, epoch, position
    state.trained_tokens += sampled_tokens
    state.train_seconds += done - started
    record = {
        "step": state.step,
        "epoch": epoch,
        **({} if loss is None else {"loss": loss}),
        "lr": lr,
        **reward_metrics(scores, total, k),
        **completion_metrics(rollouts),
        **metrics,
        "sampling_tokens_per_s": sampled_tokens / (sampled - started),
        "train_tokens_per_s": sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
        / (done - scored),
        "step_seconds": done - started,
    }
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


EVAL_BATCH = 16  # held-out prompts sampled at once


def evaluate_rewards(online: OnlineRun) -> dict[str, float]:
    """The held-out prompts' greedy completions scored: each reward's mean and the summed
    reward's mean with its standard error (eval_reward, eval_reward_se)."""
    run = online.run
    greedy = replace(sampling_settings(run.recipe), k=1, temperature=0.0)
    model, pad = run.accelerator.unwrap_model(run.model), run.data.tokenizer.pad_token_id
    texts: list[str] = []
    for s in range(0, len(online.eval_prompts), EVAL_BATCH):
        chunk = [p.ids for p in online.eval_prompts[s : s + EVAL_BATCH]]
        rollouts = sample_rollouts(model, chunk, greedy, online.stop_ids, pad, seed=0)
        decoded = run.data.tokenizer.batch_decode(
            [r.completion_ids for r in rollouts], skip_special_tokens=True
        )
        texts += [t.strip() for t in decoded]
    prompts = [p.prompt for p in online.eval_prompts]
    scores = score_all(online.rewards, prompts, texts)
    total = weighted_sum(scores, online.rewards)
    se = statistics.stdev(total) / math.sqrt(len(total)) if len(total) > 1 else 0.0
    record = {f"eval_rewards/{k}/mean": statistics.fmean(v) for k, v in scores.items()}
    return record | {"eval_reward": statistics.fmean(total), "eval_reward_se": se}


def save_online_checkpoint(online: OnlineRun, state: TrainState) -> None:
    """The one place the online loop checkpoints (weights, optimizer, schedule, RNG,
    position); sampling needs no state of its own: its seed is (train.seed, step)."""
    run = online.run
    save_checkpoint(run.accelerator, run.out, state, run.recipe.train.save_total_limit)


def load_online_checkpoint(online: OnlineRun, path: Path) -> TrainState:
    run = online.run
    return load_checkpoint(run.accelerator, run.model, path)


def online_loop(online: OnlineRun) -> TrainState:
    run = online.run
    cfg = run.recipe.train
    state = TrainState(processes=run.accelerator.num_processes)
    if run.resume_from is not None:
        run.say(f"resuming from {run.resume_from}")
        state = load_online_checkpoint(online, run.resume_from)
    log = MetricsLog(
        run.out / rundir.METRICS,
        cfg.report_to,
        True,
        state.step if run.resume_from is not None else None,
    )
    if online.eval_prompts and state.step == 0:
        log.log({"step": 0, **evaluate_rewards(online)})
    run.model.train()
    with online_progress(run.console) as progress:
        task = progress.add_task(
            "online", total=online.steps, completed=state.step, reward=float("nan"), tps=0.0
        )
        while state.step < online.steps:
            record = train_step(online, state)
            last = state.step == online.steps
            if online.eval_prompts and (
                last or (cfg.eval_steps and state.step % cfg.eval_steps == 0)
            ):
                record.update(evaluate_rewards(online))
            if state.step % cfg.logging_steps == 0 or last:
                log.log(record)
            progress.update(
                task,
                completed=state.step,
                reward=record["reward"],
                tps=record["sampling_tokens_per_s"],
            )
            if (cfg.save_steps and state.step % cfg.save_steps == 0) or last:
                save_online_checkpoint(online, state)
    log.close()
    return state


def online_progress(console: Any) -> Any:
    return live_progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("reward {task.fields[reward]:.3f}"),
        TextColumn("{task.fields[tps]:.0f} sampled tok/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def train_online(recipe: Recipe, console: Console | None = None) -> Path:
    """Train on-policy; other libraries' output goes to the output dir's log.txt."""
    check(recipe, "online")
    check_online_setup(recipe)
    with captured() as log:
        online = prepare_online(recipe, console, log)
        run = online.run
        open_output_dir(run.plan)
        if run.log is not None:
            run.log.attach(run.out / rundir.LOG)
        for reason, count in online.skipped.items():
            run.note(f"skipped {count} rows: {reason}")
        state = online_loop(online)
        finish(run, state, CURVES)
    return run.out
