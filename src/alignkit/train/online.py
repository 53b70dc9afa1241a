"""On-policy training (`alignkit online`): sample, score, train; setup, loop, save.

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
Gradients of a step are the sum over its micro-batches divided by the step's
normaliser, so accumulation gives the loss of the whole step.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

from alignkit import rundir
from alignkit.chat_templates import resolve_template
from alignkit.config import Recipe
from alignkit.config.check import check, loss_plan
from alignkit.console import Log, captured, live_progress, terminal
from alignkit.data.batching import pair_batch
from alignkit.data.prompts import load_prompts
from alignkit.errors import AlignkitError
from alignkit.generate import prompt_ids, stop_token_ids
from alignkit.losses.grpo import GrpoParams, group_advantages, loss_sums, token_losses
from alignkit.losses.preference import needs_reference
from alignkit.models import load_tokenizer, resolve_device
from alignkit.rewards import NamedReward, Prompt, build_rewards, score_all, weighted_sum
from alignkit.train.attention import base_model
from alignkit.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from alignkit.train.logps import token_logps
from alignkit.train.loop import MetricsLog, backward_exact
from alignkit.train.pref import disable_dropout, load_reference, loss_params, pair_loss_sums
from alignkit.train.reference import adapter_off, reference_scorer
from alignkit.train.rollout import (
    Rollout,
    SamplingSettings,
    best_worst_pairs,
    per_completion,
    rollout_batch,
    sample_rollouts,
    step_seed,
)
from alignkit.train.stage import (
    StageData,
    StageRun,
    finish,
    keep_exact_layout,
    load_trainable,
    make_accelerator,
    make_optimizer,
    open_output_dir,
    plan_output_dir,
)

CURVES = [
    ["reward", "eval_reward"],
    ["loss"],
    ["completions/mean_length"],
    ["kl", "clip_ratio/region_mean"],
]


@dataclass
class PromptIds:
    prompt: Prompt
    ids: list[int]


@dataclass(kw_only=True)
class OnlineRun:
    """An online stage's parts beside the shared `StageRun`."""

    run: StageRun
    prompts: list[PromptIds]
    eval_prompts: list[PromptIds]
    rewards: list[NamedReward]
    stop_ids: list[int]
    ref_model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    steps: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe


# ---------------------------------------------------------------- setup


def prompts_per_step(recipe: Recipe) -> int:
    return recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps


def online_steps(recipe: Recipe, n_prompts: int) -> int:
    """train.max_steps, else the whole steps of train.epochs (an epoch's incomplete tail
    is dropped, as offline); an error when the prompts cannot fill one step."""
    per_step = prompts_per_step(recipe)
    if n_prompts < per_step:
        raise AlignkitError(
            f"Only {n_prompts} prompts: fewer than one step of {per_step} (train."
            "micro_batch_size x train.gradient_accumulation_steps). Lower those or add prompts."
        )
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    return n_prompts // per_step * recipe.train.epochs


def tokenize_prompts(
    prompts: list[Prompt], tokenizer: Any, template: Any, limit: int
) -> tuple[list[PromptIds], int]:
    """Prompt ids rendered up to the assistant turn; prompts over `limit` tokens dropped."""
    kept, dropped = [], 0
    for p in prompts:
        ids = prompt_ids(p.messages, template, tokenizer)
        if len(ids) > limit:
            dropped += 1
        else:
            kept.append(PromptIds(p, ids))
    return kept, dropped


def load_online_data(
    recipe: Recipe,
) -> tuple[StageData, list[PromptIds], list[PromptIds], dict[str, int]]:
    """Tokenizer, template, train prompts, held-out prompts (data.eval_sources) and the
    skipped rows per reason."""
    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(recipe.model.chat_template, tokenizer)
    prompts, skipped = load_prompts(recipe.data.sources)
    limit = recipe.data.max_length - recipe.online.max_completion_length
    kept, dropped = tokenize_prompts(prompts, tokenizer, template, limit)
    held: list[PromptIds] = []
    if recipe.data.eval_sources:
        held, _ = tokenize_prompts(
            load_prompts(recipe.data.eval_sources)[0], tokenizer, template, limit
        )
    skipped = dict(skipped) | ({f"prompt over {limit} tokens": dropped} if dropped else {})
    if not kept:
        raise AlignkitError(
            f"Every prompt is longer than data.max_length - online.max_completion_length = "
            f"{limit} tokens. Raise data.max_length."
        )
    data = StageData(
        tokenizer=tokenizer,
        template=template,
        kind="prompt",
        train_rows=kept,
        eval_rows=held,
        summary=f"{len(kept)} prompts" + (f", skipped {skipped}" if skipped else ""),
    )
    return data, kept, held, skipped


def prepare_online(recipe: Recipe, console: Console | None, log: Log | None) -> OnlineRun:
    """Accelerator, output dir plan, prompts, rewards, policy, reference and optimizer."""
    device = resolve_device(recipe.model.device)
    accelerator = make_accelerator(recipe.train, device)
    if accelerator.num_processes > 1:
        raise AlignkitError(
            "alignkit online runs in one process for now; launch it without accelerate "
            "launch (or with --num_processes 1)."
        )
    plan = plan_output_dir(recipe, "online")
    torch.manual_seed(recipe.train.seed)
    data, prompts, held, skipped = load_online_data(recipe)
    rewards = build_rewards(recipe.online, str(device))
    run = StageRun(
        command="online",
        recipe=recipe,
        accelerator=accelerator,
        plan=plan,
        data=data,
        model=None,
        console=console or terminal(),
        log=log,
    )
    run.say(online_header(recipe, len(prompts), rewards, plan.out))
    run.model = load_trainable(recipe, data, run.say)
    keep_exact_layout(run, run.model)
    disable_dropout(run.model)
    online = OnlineRun(
        run=run,
        prompts=prompts,
        eval_prompts=held,
        rewards=rewards,
        stop_ids=stop_token_ids(data.template, data.tokenizer),
        skipped=skipped,
    )
    if needs_ref(run.recipe):
        online.ref_model = (
            load_reference(run.recipe, data) if recipe.model.adapter == "none" else None
        )
    online.steps = online_steps(run.recipe, len(prompts))
    online.optimizer, online.scheduler = make_optimizer(run.model, run.recipe.train, online.steps)
    run.model, online.optimizer, online.scheduler = accelerator.prepare(
        run.model, online.optimizer, online.scheduler
    )
    return online


def needs_ref(recipe: Recipe) -> bool:
    if recipe.online.algorithm == "grpo":
        return recipe.online.beta != 0.0
    return needs_reference(loss_plan(recipe.pref)[0])


def online_header(recipe: Recipe, n: int, rewards: list[NamedReward], out: Path) -> str:
    model = Path(recipe.model.name_or_path).name or recipe.model.name_or_path
    names = " + ".join(f"{r.weight:g}*{r.name}" if r.weight != 1 else r.name for r in rewards)
    cfg = recipe.online
    return (
        f"online ({cfg.algorithm}): {model} ({recipe.model.adapter}), {n} prompts, "
        f"k={cfg.num_generations}, reward {names} -> {out}"
    )


# ---------------------------------------------------------------- one step


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


# ---------------------------------------------------------------- held-out reward


EVAL_BATCH = 16


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


# ---------------------------------------------------------------- loop and save


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


def check_online_setup(recipe: Recipe) -> None:
    if recipe.online.use_vllm:
        raise AlignkitError(
            "online.use_vllm: sampling with vLLM is not available in this version; remove it "
            "(sampling runs on transformers with the KV cache)."
        )
    if recipe.train.eval_fraction:
        raise AlignkitError(
            "alignkit online scores held-out prompts from data.eval_sources; remove "
            "train.eval_fraction and name the held-out prompts there."
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
