"""The SFT recipe: setup, train, save. `alignkit sft` is a thin shell over `train_sft`."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from alignkit.chat_templates import resolve_template
from alignkit.config import Recipe, dump_yaml
from alignkit.data.batching import Batch, pack_rows, packed_batch, pad_batch
from alignkit.data.sources import load_mixture
from alignkit.data.tokenize import tokenize_examples
from alignkit.errors import AlignkitError
from alignkit.losses.sft import sft_loss_sum
from alignkit.models import load_model, load_tokenizer, resolve_device
from alignkit.plots import plot_curves
from alignkit.train.loop import LoopParts, read_metrics, run_loop, total_steps
from alignkit.train.setup import (
    make_accelerator,
    make_optimizer,
    prepare_output_dir,
    save_outputs,
    split_eval,
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
    out, resume_from = prepare_output_dir(cfg)
    accelerator.wait_for_everyone()  # every rank has checked the dir before rank 0 writes to it
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(recipe.model.chat_template, tokenizer)
    examples, reports = load_mixture(recipe.data.sources, recipe.data.strict, recipe.data.seed)
    if reports[0].kind != "sft":
        raise AlignkitError(
            f"SFT needs conversations; {reports[0].path} holds {reports[0].kind} data."
        )
    tokenized, report = tokenize_examples(examples, tokenizer, template, recipe.data)
    eval_report = None
    if recipe.data.eval_sources:  # separate eval data replaces the held-out fraction
        held_out, _ = load_mixture(recipe.data.eval_sources, recipe.data.strict, recipe.data.seed)
        eval_rows, eval_report = tokenize_examples(held_out, tokenizer, template, recipe.data)
        train_rows = tokenized
    else:
        train_rows, eval_rows = split_eval(tokenized, cfg.eval_fraction, cfg.seed)
    pad = partial(pad_batch, pad_id=tokenizer.pad_token_id)
    make_batch = pad
    if cfg.packing:
        train_rows = pack_rows(train_rows, recipe.data.max_length)
        make_batch = partial(packed_batch, pad_id=tokenizer.pad_token_id)
    if accelerator.is_main_process:
        if eval_report is not None:
            console.print(f"eval data: {eval_report.summary()}")
        console.print(dump_yaml(recipe), highlight=False)
        for r in reports:
            skipped = f", skipped {dict(r.skipped)}" if r.skipped else ""
            console.print(f"data {r.path}: {r.format}, {r.rows} rows, {r.used} used{skipped}")
        console.print(
            f"tokenized: {report.summary()}; {len(train_rows)} train rows, {len(eval_rows)} eval"
        )
    model = load_model(recipe.model, recipe.lora, trainable=True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = total_steps(len(train_rows), cfg, accelerator.num_processes)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = LoopParts(accelerator, model, optimizer, scheduler, train_rows, make_batch, sft_loss_sums,
                      eval_rows, pad, cfg, out)  # fmt: skip
    if resume_from is not None and accelerator.is_main_process:
        console.print(f"resuming from {resume_from}")
    run_loop(parts, resume_from)
    state_dict = accelerator.get_state_dict(model)  # on every rank: gathers FSDP / ZeRO-3 shards
    if accelerator.is_main_process:
        save_outputs(out, accelerator.unwrap_model(model), state_dict, tokenizer, template, recipe)
        plot_curves(
            read_metrics(out / "metrics.jsonl"),
            [["loss", "eval_loss"], ["lr"]],
            out / "training_curves.png",
        )
        console.print(f"saved to {out}")
    accelerator.wait_for_everyone()
    return out
