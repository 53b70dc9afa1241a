"""The training loop on Accelerate, shared by every stage.

A stage supplies its rows, a `make_batch(rows)` and a `loss_sums(model, batch)` that
returns (summed loss, normaliser count, metric sums). A batch says what the loss is
averaged over (`units`: trained tokens for SFT, pairs for preference losses). One
optimizer step accumulates several micro-batches; the step's loss is the global sum
over every micro-batch and process divided by the global unit count, so it is a mean
over all of them, not a mean of per-micro-batch means. Data order is a seeded
permutation per epoch, so a checkpoint records its position as (epoch, micro-batch)
and resumes exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from alignkit import rundir
from alignkit.config import TrainConfig
from alignkit.console import live_progress
from alignkit.errors import AlignkitError
from alignkit.train.checkpoint import TrainState, load_checkpoint, save_checkpoint

LossFn = Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def micro_batches_per_epoch(n_rows: int, cfg: TrainConfig, world: int) -> int:
    """Whole global micro-batches in an epoch (an incomplete last one is dropped)."""
    return n_rows // (cfg.micro_batch_size * world)


def total_steps(n_rows: int, cfg: TrainConfig, world: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(
        micro_batches_per_epoch(n_rows, cfg, world) / cfg.gradient_accumulation_steps
    )
    return per_epoch * cfg.epochs


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()


def rank_rows(
    order: list[int], micro_batch: int, cfg: TrainConfig, rank: int, world: int
) -> list[int]:
    """This process's share of one global micro-batch."""
    start = (micro_batch * world + rank) * cfg.micro_batch_size
    return order[start : start + cfg.micro_batch_size]


def check_rows(n_rows: int, cfg: TrainConfig, world: int) -> int:
    """Micro-batches per epoch; an error when the data cannot fill one."""
    per_epoch = micro_batches_per_epoch(n_rows, cfg, world)
    if per_epoch == 0:
        raise AlignkitError(
            f"Only {n_rows} training rows: fewer than one micro-batch of {cfg.micro_batch_size} "
            f"x {world} processes. Lower train.micro_batch_size or add data."
        )
    return per_epoch


def next_positions(
    state: TrainState, n_rows: int, cfg: TrainConfig, world: int
) -> list[tuple[int, int]]:
    """(epoch, micro-batch) pairs of the next optimizer step; an epoch's tail ends a step early."""
    per_epoch = check_rows(n_rows, cfg, world)
    epoch, micro = state.epoch, state.micro_batch
    if micro >= per_epoch:
        epoch, micro = epoch + 1, 0
    stop = min(per_epoch, micro + cfg.gradient_accumulation_steps)
    return [(epoch, m) for m in range(micro, stop)]


# ---------------------------------------------------------------- logging


class MetricsLog:
    """metrics.jsonl on the main process, plus TensorBoard or W&B when asked.

    A fresh run starts an empty file; a run resumed from the checkpoint of `resumed_step`
    keeps the records up to it (the steps after it are logged again). TensorBoard and W&B
    get a new event file or run and show such steps twice.
    """

    def __init__(self, path: Path, report_to: str, active: bool, resumed_step: int | None):
        self.path, self.active, self.writer, self.wandb = path, active, None, None
        if not active:
            return
        if resumed_step is None:
            rundir.write_text(path, "")
        else:
            rundir.keep_metrics_until(path, resumed_step)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / rundir.TENSORBOARD))
        elif report_to == "wandb":
            import wandb

            self.wandb = wandb.init(project="alignkit", dir=str(path.parent))

    def log(self, record: dict[str, float]) -> None:
        if not self.active:
            return
        rundir.append_metrics(self.path, record)
        step = int(record["step"])
        if self.writer:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


# ---------------------------------------------------------------- the loop


@dataclass(kw_only=True)
class LoopParts:
    """What a stage hands the loop."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    rows: list[Any]
    make_batch: Callable[[list[Any]], Any]
    loss_sums: LossFn
    eval_rows: list[Any]
    make_eval_batch: Callable[[list[Any]], Any]
    cfg: TrainConfig
    output_dir: Path
    console: Any = None  # where the progress display goes; default the terminal


def _step_sums(parts: LoopParts, batches: list[Any]) -> tuple[float, dict[str, float], int, int]:
    """Forward and backward over one step's micro-batches, through Accelerate's accumulation.

    The Accelerator syncs gradients on the step's last micro-batch only (an epoch's short
    tail included), so DDP and FSDP reduce once and DeepSpeed's engine steps once.
    `accelerator.backward` (or DeepSpeed's engine) divides by the configured accumulation
    count and DDP / FSDP / ZeRO average over processes; the loss handed to it is scaled
    back so the step's gradient is that of sum / global count. Returns the loss, the
    metric means, and the global trained and input token counts.
    """
    acc, model = parts.accelerator, parts.model
    keys = ("units", "trained_tokens", "input_tokens")
    local = [sum(getattr(b, key) for b in batches) for key in keys]
    totals = acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device), "sum")
    count, trained_tokens, input_tokens = totals.tolist()
    scale = acc.num_processes / max(count, 1)
    # Accelerate syncs when its micro-batch counter reaches a multiple of the accumulation
    # count: start it so that happens on this step's last micro-batch
    acc.step = acc.gradient_accumulation_steps - len(batches)
    loss_total, metric_totals = torch.zeros((), device=acc.device), {}
    for batch in batches:
        with acc.accumulate(model), acc.autocast():
            loss_sum, _, metrics = parts.loss_sums(model, batch.to(acc.device))
            backward_exact(acc, loss_sum * scale)
        loss_total += loss_sum.detach()
        for key, value in metrics.items():
            metric_totals[key] = metric_totals.get(key, 0.0) + value.detach()
    if not acc.sync_gradients:
        raise AlignkitError(
            f"Internal error: a step of {len(batches)} micro-batches ended without syncing "
            f"gradients (accumulation count {acc.gradient_accumulation_steps})."
        )
    means = summed_means(acc, {"loss": loss_total, **metric_totals}, torch.tensor(count))
    return means.pop("loss"), means, int(trained_tokens), int(input_tokens)


def backward_exact(acc: Any, loss: torch.Tensor) -> None:
    """Backward giving the gradient of `loss` itself: `accelerator.backward` (or DeepSpeed's
    engine) divides by the Accelerator's accumulation count, so the loss is scaled back."""
    acc.backward(loss * acc.gradient_accumulation_steps)


def summed_means(
    acc: Any, totals: dict[str, torch.Tensor], count: torch.Tensor
) -> dict[str, float]:
    """Sum each total over processes (one all-reduce) and divide by the global count."""
    stacked = acc.reduce(torch.stack([v.float() for v in totals.values()]), "sum")
    means = stacked.cpu().double() / count.cpu().double().clamp(min=1)
    return dict(zip(totals, means.tolist(), strict=True))


def eval_chunks(rows: list[Any], size: int, rank: int, world: int) -> list[list[Any]]:
    """This process's eval micro-batches: rows rank, rank + world, ... in chunks of `size`.

    Every process gets as many chunks as rank 0 (the most rows), so all run the same
    forwards (FSDP / ZeRO-3 gather weights in each) and reduce the same metric keys; a
    process out of rows gets empty chunks.
    """
    shard = rows[rank::world]
    chunks = math.ceil(len(rows[::world]) / size)
    return [shard[i * size : (i + 1) * size] for i in range(chunks)]


@torch.no_grad()
def evaluate(parts: LoopParts) -> dict[str, float]:
    """eval_loss and eval_<metric>: means over the held-out rows' units (all processes:
    trained tokens, or pairs), and eval_units, their count."""
    acc, model = parts.accelerator, parts.model
    model.eval()
    totals: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=acc.device)}
    count_total = torch.zeros((), device=acc.device)
    size = parts.cfg.micro_batch_size
    for chunk in eval_chunks(parts.eval_rows, size, acc.process_index, acc.num_processes):
        # an empty chunk scores a stand-in row (the metric keys, the forward) that adds 0
        batch = parts.make_eval_batch(chunk or parts.eval_rows[:1]).to(acc.device)
        with acc.autocast():
            loss_sum, count, metrics = parts.loss_sums(model, batch)
        for key, value in {"loss": loss_sum, **metrics}.items():
            value = value.detach().float()
            totals[key] = totals.get(key, 0.0) + (value if chunk else torch.zeros_like(value))
        count_total += count.float() if chunk else 0.0
    model.train()
    units = acc.reduce(count_total, "sum").cpu()
    means = summed_means(acc, totals, units)
    return {**{f"eval_{k}": v for k, v in means.items()}, "eval_units": int(units)}


def run_loop(parts: LoopParts, resume_from: Path | None = None) -> TrainState:
    """Train to the configured number of steps, logging, evaluating and checkpointing."""
    acc, cfg = parts.accelerator, parts.cfg
    steps = total_steps(len(parts.rows), cfg, acc.num_processes)
    if acc.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise AlignkitError(
            f"Accelerate accumulates {acc.gradient_accumulation_steps} micro-batches per "
            f"step, train.gradient_accumulation_steps is {cfg.gradient_accumulation_steps}. "
            "Set accumulation in the recipe only: drop gradient_accumulation_steps from the "
            "accelerate launch config or command line (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) "
            "and from a DeepSpeed config file (or set it to auto there)."
        )
    state = TrainState(processes=acc.num_processes)
    if resume_from is not None:
        state = load_checkpoint(acc, parts.model, resume_from)
    log = MetricsLog(
        parts.output_dir / rundir.METRICS,
        cfg.report_to,
        acc.is_main_process,
        state.step if resume_from is not None else None,
    )
    trainable = [p for p in parts.model.parameters() if p.requires_grad]
    if cfg.eval_on_start and parts.eval_rows and state.step == 0:
        log.log({"step": 0, **evaluate(parts)})
    parts.model.train()
    with _progress(acc.is_main_process, parts.console) as progress:
        task = progress.add_task(
            "train", total=steps, completed=state.step, loss=float("nan"), tps=0.0
        )
        while state.step < steps:
            started = time.perf_counter()
            positions = next_positions(state, len(parts.rows), cfg, acc.num_processes)
            orders = {e: epoch_order(len(parts.rows), cfg.seed, e) for e, _ in positions}
            batches = [
                parts.make_batch(
                    [
                        parts.rows[i]
                        for i in rank_rows(orders[e], m, cfg, acc.process_index, acc.num_processes)
                    ]
                )
                for e, m in positions
            ]
            loss, metrics, count, input_tokens = _step_sums(parts, batches)
            grad_norm = (
                acc.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            )
            lr = parts.scheduler.get_last_lr()[0]
            parts.optimizer.step()
            parts.scheduler.step()
            parts.optimizer.zero_grad(set_to_none=True)
            state.epoch, state.micro_batch = positions[-1][0], positions[-1][1] + 1
            state.step += 1
            state.trained_tokens += count
            elapsed = time.perf_counter() - started
            state.train_seconds += elapsed
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": loss,
                "lr": lr,
                "trained_tokens": state.trained_tokens,
                "tokens_per_s": input_tokens / elapsed,
                **metrics,
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            last = state.step == steps
            if parts.eval_rows and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or last):
                record.update(evaluate(parts))
            if state.step % cfg.logging_steps == 0 or last or "eval_loss" in record:
                log.log(record)
            progress.update(task, completed=state.step, loss=loss, tps=input_tokens / elapsed)
            if (cfg.save_steps and state.step % cfg.save_steps == 0) or last:
                save_checkpoint(acc, parts.output_dir, state, cfg.save_total_limit)
    log.close()
    return state


def _progress(active: bool, console: Any) -> Progress:
    return live_progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        active=active,
    )
