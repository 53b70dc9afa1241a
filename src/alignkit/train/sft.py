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
from alignkit.config.check import check
from alignkit.console import captured
from alignkit.data.batching import Batch, flat_batch, pack_rows, pad_batch
from alignkit.train.logps import token_logps
from alignkit.train.stage import prepare_optimizer, prepare_stage, train_and_save

CURVES = [["loss", "eval_loss"], ["lr"]]


def sft_loss_sums(
    model: Any, batch: Batch, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Summed negative log-likelihood of the trained tokens, and their count."""
    logps = token_logps(model, batch, chunk)
    return -logps.sum(), torch.tensor(len(logps)), {}


def sft_batcher(cfg: TrainConfig, pad_id: int) -> Callable[[list[Any]], Batch]:
    """Rows -> batch: flattened (padding-free) or padded; packed rows are bins of examples,
    always flattened."""
    if cfg.packing:
        return lambda bins: flat_batch([e for row in bins for e in row])
    return flat_batch if cfg.padding_free else partial(pad_batch, pad_id=pad_id)


def train_sft(recipe: Recipe, console: Console | None = None) -> Path:
    """Train; other libraries' output goes to the output dir's log.txt, not the terminal."""
    check(recipe, "sft")
    with captured() as log:
        run = prepare_stage(recipe, "sft", ("sft",), console, log)
        cfg, pad_id = run.recipe.train, run.data.tokenizer.pad_token_id
        rows = run.data.train_rows
        if cfg.packing:
            rows = pack_rows(rows, run.recipe.data.max_length)
        optimizer, scheduler = prepare_optimizer(run, len(rows))
        train_and_save(
            run,
            rows=rows,
            make_batch=sft_batcher(cfg, pad_id),
            loss_sums=partial(sft_loss_sums, chunk=cfg.logps_chunk),
            make_eval_batch=sft_batcher(replace(cfg, packing=False), pad_id),
            optimizer=optimizer,
            scheduler=scheduler,
            curves=CURVES,
        )
    return run.out
