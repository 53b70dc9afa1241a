"""What every training stage shares: its lifecycle around the loop.

A stage (SFT, preference) reads top to bottom: `prepare_stage` (accelerator, output
dir, seed, data, trainable model), its own batching and reference, `prepare_optimizer`
(optimizer and schedule; the model is prepared by Accelerate), its loss, then
`train_and_save` (loop, final weights, run info, curves).
"""

from __future__ import annotations

import os
import platform
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console

from alignkit import rundir
from alignkit.chat_templates import ChatTemplate, resolve_template
from alignkit.config import Recipe, TrainConfig, save_recipe
from alignkit.console import Log, note, say, terminal
from alignkit.data.prepared import TokenizedRows, prepare_sources
from alignkit.data.sources import SourceReport
from alignkit.errors import AlignkitError
from alignkit.models import NewTokens, load_model, load_tokenizer, local_paths, resolve_device
from alignkit.plots import plot_curves
from alignkit.train.attention import base_model, padding_free_problem
from alignkit.train.checkpoint import TrainState
from alignkit.train.logps import linear_head
from alignkit.train.loop import LoopParts, LossFn, check_rows, run_loop, total_steps

Rows = TypeVar("Rows", TokenizedRows, list)


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """What a training run reads from disk: an output dir must hold none of it."""
    data = recipe.data
    names = [recipe.model.name_or_path, recipe.pref.ref_model, recipe.model.chat_template]
    return local_paths(names + [s.path for s in data.sources + data.eval_sources])


@dataclass(frozen=True)
class OutputPlan:
    out: Path
    resume_from: Path | None
    set_aside: bool  # --overwrite on a non-empty dir: its old contents move to .previous/


def plan_output_dir(recipe: Recipe, command: str) -> OutputPlan:
    """The output dir (default runs/<command>) and the checkpoint to resume from, checked
    before any work; nothing is written yet.

    Refuses to write into a non-empty dir unless told to overwrite or resume.
    """
    cfg = recipe.train
    out = Path(cfg.output_dir).expanduser() if cfg.output_dir else rundir.default_dir(command)
    rundir.check_output_dir(out, recipe_inputs(recipe))
    found = rundir.checkpoints(out) if out.is_dir() else []
    if cfg.resume == "auto" and found:
        return OutputPlan(out, found[-1], set_aside=False)
    filled = out.is_dir() and any(out.iterdir())
    if filled and not cfg.overwrite and cfg.resume != "auto":
        raise AlignkitError(
            f"Output directory '{out}' is not empty. Pass --overwrite to write into it (its "
            "contents move to .previous/ beside it), --resume to continue its run, or choose "
            "another --output-dir."
        )
    if filled and cfg.overwrite:
        rundir.check_movable(out)
    return OutputPlan(out, None, set_aside=filled and cfg.overwrite)


def open_output_dir(plan: OutputPlan) -> Path:
    """Make the output dir, moving what an earlier run left there aside (never deleted,
    and no stale checkpoint is resumed later)."""
    if plan.set_aside:
        rundir.set_aside(plan.out)
    plan.out.mkdir(parents=True, exist_ok=True)
    return plan.out


def allow_precision(precision: str) -> None:
    """Let this stage's Accelerator autocast in `precision` though an earlier stage of the
    same process used another (Accelerate keeps its first precision for the process and
    raises otherwise; the process group, held apart, is kept)."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()  # private, as Accelerate's own tests reset it


def make_accelerator(cfg: TrainConfig, device: torch.device) -> Any:
    from accelerate import Accelerator

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if device.type != "cuda" and precision == "fp16":
        raise AlignkitError(
            "train.mixed_precision=fp16 needs a GPU; on CPU use bf16 (autocast, fastest where "
            "the CPU has AVX512-BF16 or AMX) or no (fp32)."
        )
    allow_precision(precision)
    # the schedule is built for optimizer steps and stepped once per step by the loop
    return Accelerator(
        mixed_precision=precision,
        cpu=device.type == "cpu",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
    )


def split_eval(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """A seeded `fraction` of the rows held out for eval (at least one when above 0)."""
    if fraction <= 0:
        return rows, pick(rows, [])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    held = set(order[:n_eval])
    return pick(rows, [i for i in range(len(rows)) if i not in held]), pick(rows, sorted(held))


def pick(rows: Rows, positions: list[int]) -> Rows:
    """The rows at `positions`: a view of prepared (Arrow) rows, or a list."""
    if isinstance(rows, TokenizedRows):
        return rows.subset(positions)
    return [rows[i] for i in positions]


def make_optimizer(model: Any, cfg: TrainConfig, steps: int) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * steps)
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return optimizer, get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=steps
    )


@dataclass
class StageData:
    tokenizer: Any
    template: ChatTemplate
    kind: str
    train_rows: Sequence[Any]  # TokenizedRows until a stage adds to the items
    eval_rows: Sequence[Any]
    summary: str = ""  # what tokenization did, in a line
    notes: list[str] = field(default_factory=list)  # each source's rows, for the log


def source_notes(reports: list[SourceReport], label: str) -> list[str]:
    return [
        f"{label} {r.path}: {r.format}, {r.rows} rows, {r.used} used"
        + (f", skipped {dict(r.skipped)}" if r.skipped else "")
        for r in reports
    ]


def load_stage_data(recipe: Recipe, kinds: tuple[str, ...]) -> StageData:
    """Tokenizer, template and tokenized train/eval rows of one of `kinds`, with what
    reading and tokenizing them did."""
    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(recipe.model.chat_template, tokenizer)
    train = prepare_sources(recipe.data.sources, kinds, tokenizer, template, recipe.data)
    notes = source_notes(train.sources, "data")
    if recipe.data.eval_sources:  # separate eval data replaces the held-out fraction
        held_out = prepare_sources(
            recipe.data.eval_sources, kinds, tokenizer, template, recipe.data, "data.eval_sources"
        )
        notes += source_notes(held_out.sources, "eval data")
        notes.append(f"eval data: {held_out.report.summary()}")
        train_rows, eval_rows = train.rows, held_out.rows
    else:
        train_rows, eval_rows = split_eval(
            train.rows, recipe.train.eval_fraction, recipe.train.seed
        )
    skipped = sum(sum(r.skipped.values()) for r in train.sources)
    return StageData(
        tokenizer=tokenizer,
        template=template,
        kind=train.sources[0].kind,
        train_rows=train_rows,
        eval_rows=eval_rows,
        summary=train.report.summary() + (f", {skipped} rows skipped" if skipped else ""),
        notes=notes,
    )


def stage_header(recipe: Recipe, command: str, data: StageData, out: Path) -> str:
    """The line a training stage opens with: model, adapter, rows, where it writes."""
    model = Path(recipe.model.name_or_path).name or recipe.model.name_or_path
    adapter = "full weights" if recipe.model.adapter == "none" else recipe.model.adapter
    return (
        f"{command}: {model} ({adapter}), {len(data.train_rows)} train rows, "
        f"{len(data.eval_rows)} eval rows ({data.summary}) -> {out}"
    )


def new_tokens(data: StageData) -> NewTokens:
    """The template's added tokens: their ids, and the vocabulary they make."""
    added = data.template.added_tokens
    if not added:
        return NewTokens()
    ids = data.tokenizer.convert_tokens_to_ids(list(added))
    return NewTokens(ids=tuple(ids), vocab=len(data.tokenizer))


def load_trainable(recipe: Recipe, data: StageData, say: Callable[[str], None]) -> Any:
    model = load_model(recipe.model, recipe.lora, True, new_tokens(data), say)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@dataclass(kw_only=True)
class StageRun:
    """One training stage between setup and save."""

    command: str
    recipe: Recipe
    accelerator: Any
    plan: OutputPlan
    data: StageData
    model: Any
    console: Console
    log: Log | None = None  # the stage's log.txt, opened with the output dir
    layout_note: str | None = None  # why padding-free rows were switched off, if they were

    @property
    def verbose(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        """A line on the stage's console and in its log (main process)."""
        if self.verbose:
            say(text, self.console)

    def note(self, text: str) -> None:
        """A detail for the log (main process)."""
        if self.verbose:
            note(text, self.console)

    @property
    def out(self) -> Path:
        return self.plan.out

    @property
    def resume_from(self) -> Path | None:
        return self.plan.resume_from


def start_stage(
    command: str,
    recipe: Recipe,
    accelerator: Any,
    plan: OutputPlan,
    data: StageData,
    header: str,
    console: Console | None,
    log: Log | None,
) -> StageRun:
    """The stage's run with its header said, its data notes logged and its trainable model
    loaded (padding-free rows switched off where they would change the model)."""
    run = StageRun(
        command=command,
        recipe=recipe,
        accelerator=accelerator,
        plan=plan,
        data=data,
        model=None,
        console=console or terminal(),
        log=log,
    )
    run.say(header)
    for line in data.notes:
        run.note(line)
    run.model = load_trainable(recipe, data, run.say)
    keep_exact_layout(run, run.model)
    return run


def prepare_stage(
    recipe: Recipe,
    command: str,
    kinds: tuple[str, ...],
    console: Console | None = None,
    log: Log | None = None,
) -> StageRun:
    """Accelerator, output dir, seed, tokenized data and the trainable model."""
    accelerator = make_accelerator(recipe.train, resolve_device(recipe.model.device))
    plan = plan_output_dir(recipe, command)
    accelerator.wait_for_everyone()  # every rank has checked the dir before rank 0 writes to it
    torch.manual_seed(recipe.train.seed)
    with accelerator.local_main_process_first():  # it tokenizes; the others read its cache
        data = load_stage_data(recipe, kinds)
    header = stage_header(recipe, command, data, plan.out)
    run = start_stage(command, recipe, accelerator, plan, data, header, console, log)
    if recipe.train.logps_chunk and linear_head(run.model) is None:
        run.say(
            "train.logps_chunk has no effect: the output layer is not a plain linear map "
            "(wrapped for trainable tokens or LoRA, or its logits soft-capped or scaled), "
            "so full logits are computed"
        )
    return run


def exact_layout(cfg: TrainConfig, model: Any) -> tuple[TrainConfig, str | None]:
    """The train settings that compute this model's own log-probs: padding-free rows and
    packing switched off where block attention would not reproduce its attention, with
    the line that says so."""
    problem = padding_free_problem(model) if cfg.padding_free or cfg.packing else None
    if problem is None:
        return cfg, None
    family = base_model(model).config.model_type
    dropped = "padding-free rows and packing" if cfg.packing else "padding-free rows"
    line = f"{dropped} off for this {family} model ({problem}): training on padded rows"
    return replace(cfg, padding_free=False, packing=False), line


def keep_exact_layout(run: StageRun, model: Any) -> None:
    """Switch the run to padded rows where `model` (policy or reference) needs them."""
    cfg, line = exact_layout(run.recipe.train, model)
    if line is None:
        return
    run.recipe, run.layout_note = replace(run.recipe, train=cfg), line
    run.say(line)


def prepare_optimizer(run: StageRun, n_rows: int) -> tuple[Any, Any]:
    """Optimizer and schedule for `n_rows` training rows; the model is prepared with them."""
    cfg, acc = run.recipe.train, run.accelerator
    optimizer, scheduler = make_optimizer(
        run.model, cfg, total_steps(n_rows, cfg, acc.num_processes)
    )
    deepspeed = getattr(acc.state, "deepspeed_plugin", None)
    if deepspeed is not None:  # no dataloader is prepared: DeepSpeed reads the sizes here
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
        deepspeed.deepspeed_config["train_batch_size"] = (
            cfg.micro_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        )
    # prepared together, so save_state / load_state hold all three (sharded where they are)
    run.model, optimizer, scheduler = acc.prepare(run.model, optimizer, scheduler)
    return optimizer, scheduler


def train_and_save(
    run: StageRun,
    *,
    rows: list[Any],
    make_batch: Callable[[list[Any]], Any],
    loss_sums: LossFn,
    make_eval_batch: Callable[[list[Any]], Any],
    optimizer: Any,
    scheduler: Any,
    curves: list[list[str]],
) -> TrainState:
    """The loop, then the final weights, run info and curves. The output dir is made here,
    once every check has passed (a bad setting never leaves a dir that blocks the re-run)."""
    acc = run.accelerator
    check_rows(len(rows), run.recipe.train, acc.num_processes)
    if acc.is_main_process:
        open_output_dir(run.plan)
        if run.log is not None:
            run.log.attach(run.out / rundir.LOG)
    acc.wait_for_everyone()
    parts = LoopParts(
        accelerator=run.accelerator,
        model=run.model,
        optimizer=optimizer,
        scheduler=scheduler,
        rows=rows,
        make_batch=make_batch,
        loss_sums=loss_sums,
        eval_rows=run.data.eval_rows,
        make_eval_batch=make_eval_batch,
        cfg=run.recipe.train,
        output_dir=run.out,
        console=run.console,
    )
    if run.resume_from is not None:
        run.say(f"resuming from {run.resume_from}")
    state = run_loop(parts, run.resume_from)
    finish(run, state, curves)
    return state


def run_info(run: StageRun, state: TrainState) -> dict[str, Any]:
    """What the model card reports about a run: stage, sizes, time and hardware."""
    import transformers

    from alignkit import __version__

    device = run.accelerator.device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "stage": run.command,
        "train_rows": len(run.data.train_rows),
        "eval_rows": len(run.data.eval_rows),
        "data_kind": run.data.kind,
        "steps": state.step,
        "epochs_started": state.epoch + 1,
        "trained_tokens": state.trained_tokens,
        "train_seconds": round(state.train_seconds, 1),
        "processes": run.accelerator.num_processes,
        "padding_free": run.recipe.train.padding_free,
        **({"padding_free_off": run.layout_note} if run.layout_note else {}),
        "device": device.type,
        "hardware": hardware or platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "alignkit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def without_tied_copies(model: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict gathered from shards (FSDP, ZeRO-3) holds a tied weight twice, as two
    tensors: keep its source only, as `save_pretrained` does for one process's model."""
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in state_dict.items() if not (k in ties and ties[k] in state_dict)}


def save_outputs(run: StageRun, state_dict: dict[str, Any], directory: Path) -> None:
    """Final weights (adapter or full safetensors), tokenizer with the template used, config."""
    model = run.accelerator.unwrap_model(run.model)
    state_dict = without_tied_copies(model, state_dict)
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    run.data.tokenizer.chat_template = run.data.template.source
    run.data.tokenizer.save_pretrained(directory)
    save_recipe(run.recipe, directory)


def finish(run: StageRun, state: TrainState, curves: list[list[str]]) -> None:
    """Save weights, tokenizer, recipe and run info, and plot the curves (main process).

    The final files are written into a temporary dir inside the output dir and moved in
    one by one, `run_info.json` last: a crash or a full disk never leaves a half-written
    file, and a run dir without `run_info.json` is an unfinished run (`--resume` ends it).
    """
    acc, out = run.accelerator, run.out
    state_dict = acc.get_state_dict(run.model)  # on every rank: gathers FSDP / ZeRO-3 shards
    if acc.is_main_process:
        staged = out / ".tmp-final"  # inside: renames stay on out's file system
        shutil.rmtree(staged, ignore_errors=True)
        try:
            with rundir.disk_full_named(staged / rundir.RUN_INFO):
                save_outputs(run, state_dict, staged)
                rundir.write_json(staged / rundir.RUN_INFO, run_info(run, state))
                metrics = rundir.read_metrics(out / rundir.METRICS)
                plot_curves(metrics, curves, staged / rundir.CURVES)
            rundir.publish(staged, out, last=rundir.RUN_INFO)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        run.say(
            f"{run.command} done: {state.step} steps in {state.train_seconds:.0f} s, "
            f"{rundir.training_figures(metrics)}; saved to {out}"
        )
    acc.wait_for_everyone()
