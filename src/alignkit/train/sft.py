"""The SFT recipe: setup, train, save. `alignkit sft` is a thin shell over `train_sft`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from alignkit.config import Recipe, TrainConfig
from alignkit.data.batching import Batch, flat_batch, pack_rows, packed_batch, pad_batch
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
from alignkit.train.step import token_logps


def sft_loss_sums(
    model: Any, batch: Batch, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Summed negative log-likelihood of the trained tokens, and their count."""
    logps = token_logps(model, batch, chunk)
    return -logps.sum(), torch.tensor(len(logps)), {}


def sft_batcher(cfg: TrainConfig, pad_id: int) -> Callable[[list[Any]], Batch]:
    """Rows -> batch: flattened (padding-free) or padded; packed rows are bins of examples."""
    if cfg.padding_free:
        if cfg.packing:
            return lambda bins: flat_batch([e for row in bins for e in row])
        return flat_batch
    return (
        partial(packed_batch, pad_id=pad_id) if cfg.packing else partial(pad_batch, pad_id=pad_id)
    )


def train_sft(recipe: Recipe, console: Console | None = None) -> Path:
    console = console or Console()
    cfg = recipe.train
    accelerator = make_accelerator(cfg, resolve_device(recipe.model.device))
    out, resume_from = prepare_output_dir(cfg, "sft")
    accelerator.wait_for_everyone()  # every rank has checked the dir before rank 0 writes to it
    torch.manual_seed(cfg.seed)
    data = load_stage_data(recipe, ("sft",), console, accelerator.is_main_process)
    pad_id = data.tokenizer.pad_token_id
    rows = pack_rows(data.train_rows, recipe.data.max_length) if cfg.packing else data.train_rows
    make_batch = sft_batcher(cfg, pad_id)
    eval_batch = sft_batcher(replace(cfg, packing=False), pad_id)
    model = load_trainable(recipe)
    optimizer, scheduler = make_optimizer(
        model, cfg, total_steps(len(rows), cfg, accelerator.num_processes)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_sums = partial(sft_loss_sums, chunk=cfg.logps_chunk)
    parts = LoopParts(accelerator, model, optimizer, scheduler, rows, make_batch, loss_sums,
                      data.eval_rows, eval_batch, cfg, out)  # fmt: skip
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
