"""The SFT recipe: setup, train, save. `alignkit sft` is a thin shell over `train_sft`."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from alignkit.config import Recipe
from alignkit.data.batching import Batch, pack_rows, packed_batch, pad_batch
from alignkit.losses.sft import sft_loss_sum
from alignkit.models import resolve_device
from alignkit.train.loop import LoopParts, run_loop, total_steps
from alignkit.train.setup import (
    finish,
    load_stage_data,
    load_trainable,
    make_accelerator,
    make_optimizer,
    prepare_output_dir,
)


def sft_loss_sums(
    model: Any, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )
    loss_sum, count = sft_loss_sum(out.logits, batch.labels)
    return loss_sum, count, {}


def train_sft(recipe: Recipe, console: Console | None = None) -> Path:
    console = console or Console()
    cfg = recipe.train
    accelerator = make_accelerator(cfg, resolve_device(recipe.model.device))
    out, resume_from = prepare_output_dir(cfg, "sft")
    accelerator.wait_for_everyone()  # every rank has checked the dir before rank 0 writes to it
    torch.manual_seed(cfg.seed)
    data = load_stage_data(recipe, ("sft",), console, accelerator.is_main_process)
    pad = partial(pad_batch, pad_id=data.tokenizer.pad_token_id)
    rows, make_batch = data.train_rows, pad
    if cfg.packing:
        rows = pack_rows(rows, recipe.data.max_length)
        make_batch = partial(packed_batch, pad_id=data.tokenizer.pad_token_id)
    model = load_trainable(recipe)
    optimizer, scheduler = make_optimizer(
        model, cfg, total_steps(len(rows), cfg, accelerator.num_processes)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = LoopParts(accelerator, model, optimizer, scheduler, rows, make_batch, sft_loss_sums,
                      data.eval_rows, pad, cfg, out)  # fmt: skip
    if resume_from is not None and accelerator.is_main_process:
        console.print(f"resuming from {resume_from}")
    state = run_loop(parts, resume_from)
    finish(
        accelerator,
        model,
        data,
        recipe,
        out,
        [["loss", "eval_loss"], ["lr"]],
        console,
        "sft",
        state,
    )
    return out
