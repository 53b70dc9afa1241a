"""Pieces every training stage needs: output dir rules, accelerator, optimizer, schedule, saving."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from alignkit.chat_templates import ChatTemplate, resolve_template
from alignkit.config import Recipe, TrainConfig, dump_yaml, save_recipe
from alignkit.data.sources import load_mixture
from alignkit.data.tokenize import tokenize_examples
from alignkit.errors import AlignkitError
from alignkit.models import load_model, load_tokenizer
from alignkit.plots import plot_curves
from alignkit.train.loop import TrainState, checkpoints, read_metrics

RUN_INFO = "run_info.json"


def prepare_output_dir(cfg: TrainConfig, stage: str) -> tuple[Path, Path | None]:
    """The output dir (default runs/<stage>) and the checkpoint to resume from.

    Refuses to write into a non-empty dir unless told to overwrite or resume.
    """
    out = Path(cfg.output_dir or f"runs/{stage}")
    found = checkpoints(out) if out.is_dir() else []
    if cfg.resume == "auto" and found:
        return out, found[-1]
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite and cfg.resume != "auto":
        raise AlignkitError(
            f"Output directory '{out}' is not empty. Pass --overwrite to write into it, "
            "--resume to continue its run, or choose another --output-dir."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def make_accelerator(cfg: TrainConfig, device: torch.device) -> Any:
    from accelerate import Accelerator

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if device.type != "cuda" and precision != "no":
        raise AlignkitError(f"train.mixed_precision={precision} needs a GPU; use no (fp32) on CPU.")
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def split_eval(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def make_optimizer(model: Any, cfg: TrainConfig, steps: int) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * steps)
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return optimizer, get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=steps
    )


def save_outputs(
    out: Path, model: Any, state_dict: dict, tokenizer: Any, template: ChatTemplate, recipe: Recipe
) -> None:
    """Final weights (adapter or full safetensors), tokenizer with the template used, config."""
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.chat_template = template.source
    tokenizer.save_pretrained(out)
    save_recipe(recipe, out)


@dataclass
class StageData:
    tokenizer: Any
    template: ChatTemplate
    kind: str
    train_rows: list[Any]
    eval_rows: list[Any]


def load_stage_data(
    recipe: Recipe, kinds: tuple[str, ...], console: Console, verbose: bool
) -> StageData:
    """Tokenizer, template and tokenized train/eval rows of one of `kinds`, reported."""
    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(recipe.model.chat_template, tokenizer)
    examples, reports = load_mixture(recipe.data.sources, recipe.data.strict, recipe.data.seed)
    kind = reports[0].kind
    if kind not in kinds:
        raise AlignkitError(
            f"This stage trains on {' or '.join(kinds)} data; {reports[0].path} holds {kind} "
            "data. Check data.sources (alignkit data inspect shows what a file holds)."
        )
    tokenized, report = tokenize_examples(examples, tokenizer, template, recipe.data)
    eval_report = None
    if recipe.data.eval_sources:  # separate eval data replaces the held-out fraction
        held_out, _ = load_mixture(recipe.data.eval_sources, recipe.data.strict, recipe.data.seed)
        eval_rows, eval_report = tokenize_examples(held_out, tokenizer, template, recipe.data)
        train_rows = tokenized
    else:
        train_rows, eval_rows = split_eval(tokenized, recipe.train.eval_fraction, recipe.train.seed)
    if verbose:
        console.print(dump_yaml(recipe), highlight=False)
        for r in reports:
            skipped = f", skipped {dict(r.skipped)}" if r.skipped else ""
            console.print(f"data {r.path}: {r.format}, {r.rows} rows, {r.used} used{skipped}")
        if eval_report is not None:
            console.print(f"eval data: {eval_report.summary()}")
        console.print(
            f"tokenized: {report.summary()}; {len(train_rows)} train rows, {len(eval_rows)} eval"
        )
    return StageData(tokenizer, template, kind, train_rows, eval_rows)


def load_trainable(recipe: Recipe) -> Any:
    model = load_model(recipe.model, recipe.lora, trainable=True)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def run_info(stage: str, state: TrainState, data: StageData, accelerator: Any) -> dict[str, Any]:
    """What the model card reports about a run: stage, sizes, time and hardware."""
    import platform

    import transformers

    from alignkit import __version__

    device = accelerator.device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "stage": stage,
        "train_rows": len(data.train_rows),
        "eval_rows": len(data.eval_rows),
        "data_kind": data.kind,
        "steps": state.step,
        "epochs_started": state.epoch + 1,
        "trained_tokens": state.trained_tokens,
        "train_seconds": round(state.train_seconds, 1),
        "processes": accelerator.num_processes,
        "device": device.type,
        "hardware": hardware or platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "alignkit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
    }


def finish(
    accelerator: Any,
    model: Any,
    data: StageData,
    recipe: Recipe,
    out: Path,
    panels: list[list[str]],
    console: Console,
    stage: str,
    state: TrainState,
) -> None:
    """Save weights, tokenizer, recipe and run info, and plot the curves (main process)."""
    state_dict = accelerator.get_state_dict(model)  # on every rank: gathers FSDP / ZeRO-3 shards
    if accelerator.is_main_process:
        save_outputs(out, accelerator.unwrap_model(model), state_dict, data.tokenizer,
                     data.template, recipe)  # fmt: skip
        info = run_info(stage, state, data, accelerator)
        (out / RUN_INFO).write_text(json.dumps(info, indent=2))
        plot_curves(read_metrics(out / "metrics.jsonl"), panels, out / "training_curves.png")
        console.print(f"saved to {out}")
    accelerator.wait_for_everyone()
