"""Reward models (`alignkit rm train`, `alignkit rm score`): setup, train, save.

A Bradley-Terry model (Bradley & Terry 1952; InstructGPT, arXiv:2203.02155): a
sequence-classification head reads one score at the last token of prompt + reply,
trained so that sigma(r_chosen - r_rejected) is high: the loss is -log sigma of the
margin, averaged over pairs. Conversations are rendered by `rewards.model.rm_ids`, the
one rendering the reward uses when scoring. The model is saved merged (LoRA folded in)
in the Hugging Face sequence-classification format, with the chat template in its
tokenizer, so `AutoModelForSequenceClassification` and `model:DIR` rewards load it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from alignkit import rundir
from alignkit.chat_templates import resolve_template
from alignkit.config import Recipe, save_recipe
from alignkit.config.check import check
from alignkit.console import captured, live_progress, say, terminal
from alignkit.data.formats import PreferencePair, _as_messages
from alignkit.data.prepared import check_kind
from alignkit.data.sources import load_mixture, read_records
from alignkit.errors import AlignkitError
from alignkit.models import load_tokenizer, resolve, resolve_device, resolve_dtype
from alignkit.plots import plot_curves
from alignkit.rewards.base import Prompt
from alignkit.rewards.model import RewardModel, last_token_scores, rm_ids
from alignkit.train.stage import make_optimizer, open_output_dir, plan_output_dir, split_eval

CURVES = [["loss", "eval_loss"], ["accuracy", "eval_accuracy"]]


@dataclass
class RmPair:
    chosen: list[int]
    rejected: list[int]


def pair_ids(pair: PreferencePair, tokenizer: Any, template: str, max_length: int) -> RmPair:
    return RmPair(
        rm_ids([*pair.prompt, *pair.chosen], tokenizer, template, max_length),
        rm_ids([*pair.prompt, *pair.rejected], tokenizer, template, max_length),
    )


def load_rm_model(recipe: Recipe, pad_id: int, vocab: int) -> Any:
    """A one-label sequence-classification model from the recipe's model, LoRA-wrapped
    (its score head trained in full) when model.adapter is lora."""
    from transformers import AutoModelForSequenceClassification

    if recipe.model.adapter == "qlora":
        raise AlignkitError(
            "alignkit rm trains full weights or LoRA; set model.adapter to none or lora."
        )
    path = resolve(recipe.model.name_or_path).path
    device = resolve_device(recipe.model.device)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=resolve_dtype(recipe.model.dtype, device)
    )
    if model.get_input_embeddings().weight.shape[0] < vocab:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    model.config.pad_token_id = pad_id
    if recipe.model.adapter == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = recipe.lora
        lora = LoraConfig(
            task_type="SEQ_CLS",
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules
            if cfg.target_modules != ["all-linear"]
            else "all-linear",
        )
        model = get_peft_model(model, lora)
    return model.to(device)


def pair_loss(model: Any, pairs: list[RmPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Bradley-Terry losses and whether chosen outscored rejected."""
    scores = last_token_scores(
        model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id
    )
    margin = scores[: len(pairs)] - scores[len(pairs) :]
    return -F.logsigmoid(margin), (margin > 0).float()


@torch.no_grad()
def evaluate_rm(model: Any, pairs: list[RmPair], pad_id: int, size: int) -> dict[str, float]:
    model.eval()
    losses, hits = [], []
    for s in range(0, len(pairs), size):
        loss, hit = pair_loss(model, pairs[s : s + size], pad_id)
        losses += loss.tolist()
        hits += hit.tolist()
    model.train()
    return {"eval_loss": statistics.fmean(losses), "eval_accuracy": statistics.fmean(hits)}


def rm_pairs(recipe: Recipe, tokenizer: Any, template: str) -> list[RmPair]:
    examples, reports = load_mixture(recipe.data.sources, recipe.data.strict, recipe.data.seed)
    check_kind(reports, ("pair",), "data.sources")
    return [pair_ids(p, tokenizer, template, recipe.data.max_length) for p in examples]


def train_rm(recipe: Recipe, console: Console | None = None) -> Path:
    """Train on pairs, evaluate held-out accuracy before and after, save in HF format."""
    check(recipe, "rm")
    console = console or terminal()
    plan = plan_output_dir(recipe, "rm")
    with captured() as log:
        tokenizer = load_tokenizer(recipe.model)
        template = resolve_template(recipe.model.chat_template, tokenizer)
        pairs = rm_pairs(recipe, tokenizer, template.source)
        train, held = split_eval(pairs, recipe.rm.eval_fraction, recipe.train.seed)
        cfg = recipe.train
        if len(train) < cfg.micro_batch_size:
            raise AlignkitError(f"Only {len(train)} training pairs; lower train.micro_batch_size.")
        torch.manual_seed(cfg.seed)
        pad = tokenizer.pad_token_id
        model = load_rm_model(recipe, pad, len(tokenizer))
        per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps
        steps = cfg.max_steps or max(1, len(train) // per_step) * cfg.epochs
        optimizer, scheduler = make_optimizer(model, cfg, steps)
        out = open_output_dir(plan)
        log.attach(out / rundir.LOG)
        say(f"rm: {len(train)} train pairs, {len(held)} held out -> {out}", console)
        records = rm_loop(model, train, held, optimizer, scheduler, steps, recipe, pad, console)
        save_rm(model, tokenizer, template.source, recipe, out, records)
    first = next((r for r in records if "eval_accuracy" in r), None)
    last = records[-1]
    figures = f"final loss {last['loss']:.4f}"
    if first is not None:
        figures += f", eval accuracy {first['eval_accuracy']:.3f} → {last['eval_accuracy']:.3f}"
    say(f"rm done: {steps} steps; {figures}; saved to {out}", console)
    return out


def rm_loop(
    model: Any,
    train: list[RmPair],
    held: list[RmPair],
    optimizer: Any,
    scheduler: Any,
    steps: int,
    recipe: Recipe,
    pad: int,
    console: Console,
) -> list[dict[str, float]]:
    cfg = recipe.train
    size = cfg.micro_batch_size
    records: list[dict[str, float]] = []
    if held:
        records.append({"step": 0, **evaluate_rm(model, held, pad, size)})
    per_epoch = len(train) // size
    model.train()
    with live_progress(console=console) as progress:
        task = progress.add_task("rm", total=steps)
        for step in range(steps):
            started = time.perf_counter()
            accum = cfg.gradient_accumulation_steps
            losses, hits = [], []
            for micro in range(step * accum, (step + 1) * accum):
                loss, hit = pair_loss(
                    model, micro_batch(train, micro, per_epoch, size, cfg.seed), pad
                )
                (loss.sum() / (size * accum)).backward()  # the mean over the step's pairs
                losses.append(loss.detach())
                hits.append(hit)
            losses, hits = torch.cat(losses), torch.cat(hits)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {
                "step": step + 1,
                "loss": float(losses.mean()),
                "accuracy": float(hits.mean()),
                "lr": lr,
                "step_seconds": time.perf_counter() - started,
            }
            if held and (
                step + 1 == steps or (cfg.eval_steps and (step + 1) % cfg.eval_steps == 0)
            ):
                record.update(evaluate_rm(model, held, pad, size))
            records.append(record)
            progress.update(task, completed=step + 1)
    return records


def micro_batch(
    train: list[RmPair], index: int, per_epoch: int, size: int, seed: int
) -> list[RmPair]:
    """Micro-batch `index` of the run: its epoch's seeded order, an epoch's tail dropped."""
    epoch, position = divmod(index, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(train), generator=generator)
    return [train[i] for i in order[position * size : (position + 1) * size].tolist()]


def save_rm(
    model: Any, tokenizer: Any, template: str, recipe: Recipe, out: Path, records: list[dict]
) -> None:
    """Merged weights, tokenizer with its chat template, config, metrics, curves, run info."""
    staged = out / ".tmp-final"
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(staged, safe_serialization=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(staged)
    save_recipe(recipe, staged)
    rundir.write_text(staged / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in records))
    plot_curves(records, CURVES, staged / rundir.CURVES)
    info = {
        "stage": "rm",
        "steps": records[-1]["step"],
        **{k: v for k, v in records[-1].items() if k.startswith("eval_")},
    }
    rundir.write_json(staged / rundir.RUN_INFO, info)
    rundir.publish(staged, out, last=rundir.RUN_INFO)


# ---------------------------------------------------------------- scoring a file


def scored_row(record: Any, where: str) -> tuple[Prompt, str]:
    """A row's prompt and completion text, or an error naming the row."""
    if not isinstance(record, dict) or "prompt" not in record or "completion" not in record:
        raise AlignkitError(f"{where}: a row to score needs `prompt` and `completion` fields.")
    completion = record["completion"]
    if isinstance(completion, list):
        completion = _as_messages(completion, "completion", "assistant")[-1]["content"]
    if not isinstance(completion, str):
        raise AlignkitError(f"{where}: `completion` must be a string or a list of messages.")
    return Prompt(_as_messages(record["prompt"], "prompt", "user"), source=where), completion


def score_file(model_dir: str, path: Path, recipe: Recipe) -> Path:
    """Write each row of `path` with its reward-model `score` to a new JSON Lines file."""
    from alignkit.config import DataSource

    out = Path(recipe.rm.score_file) if recipe.rm.score_file else path.with_suffix(".scored.jsonl")
    if out.exists():
        raise AlignkitError(f"'{out}' exists; remove it or pass --score-file another path.")
    rows = read_records(DataSource(path=str(path)))
    parsed = [scored_row(record, f"{path}: {where}") for where, record in rows]
    scorer = RewardModel(model_dir, max_length=recipe.data.max_length)
    scores = scorer([p for p, _ in parsed], [c for _, c in parsed])
    lines = [
        json.dumps({**record, "score": s}) + "\n"
        for (_, record), s in zip(rows, scores, strict=True)
    ]
    rundir.write_text(out, "".join(lines))
    return out
