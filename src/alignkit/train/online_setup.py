"""An online stage's setup: its prompts, rewards, policy, reference and optimizer (`OnlineRun`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from alignkit.chat_templates import resolve_template
from alignkit.config import Recipe
from alignkit.config.check import loss_plan
from alignkit.console import Log
from alignkit.data.prompts import load_prompts
from alignkit.errors import AlignkitError
from alignkit.generate import prompt_ids, stop_token_ids
from alignkit.losses.preference import needs_reference
from alignkit.models import load_tokenizer, resolve_device
from alignkit.rewards import NamedReward, Prompt, build_rewards
from alignkit.train.pref import disable_dropout, load_reference
from alignkit.train.stage import (
    StageData,
    StageRun,
    make_accelerator,
    make_optimizer,
    plan_output_dir,
    start_stage,
)


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
    header = online_header(recipe, len(prompts), rewards, plan.out)
    run = start_stage("online", recipe, accelerator, plan, data, header, console, log)
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
