"""Pieces every training stage needs: output dir rules, accelerator, optimizer, schedule, saving."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from alignkit.chat_templates import ChatTemplate
from alignkit.config import Recipe, TrainConfig, save_recipe
from alignkit.errors import AlignkitError
from alignkit.train.loop import checkpoints


def prepare_output_dir(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """The output dir and the checkpoint to resume from, refusing to clobber earlier work."""
    out = Path(cfg.output_dir)
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
