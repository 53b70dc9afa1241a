"""Preference optimization: setup, reference, train, save. `alignkit pref` is a thin shell.

Pairs (DPO and its relatives) or unpaired feedback (KTO) are scored as summed
completion log-probs under the policy and the reference; a loss from
`losses.preference` turns those into per-pair losses and rewards.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from alignkit.config import PrefConfig, Recipe
from alignkit.data.batching import SequenceBatch, feedback_batch, pair_batch
from alignkit.data.tokenize import TokenizedPair
from alignkit.errors import AlignkitError
from alignkit.losses.preference import (
    ALL_LOSSES,
    FEEDBACK_LOSSES,
    LossParams,
    PairLogps,
    combined_loss,
    kto_loss,
    kto_reference_point,
    needs_reference,
    pair_metrics,
    param_problems,
)
from alignkit.models import load_model, resolve, resolve_device
from alignkit.train.loop import LoopParts, read_metrics, run_loop, total_steps
from alignkit.train.reference import (
    Scorer,
    cached_reference,
    compute_reference,
    model_fingerprint,
    reference_scorer,
)
from alignkit.train.setup import (
    StageData,
    finish,
    load_stage_data,
    load_trainable,
    make_accelerator,
    make_optimizer,
    prepare_output_dir,
)
from alignkit.train.step import sequence_logps

LossSums = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
CURVES = [
    ["loss", "eval_loss"],
    ["rewards/accuracies", "eval_rewards/accuracies"],
    ["rewards/margins", "eval_rewards/margins"],
]


def loss_plan(cfg: PrefConfig) -> tuple[list[str], list[float]]:
    """The loss names and weights to sum (RPO's NLL term appended when rpo_alpha > 0)."""
    names, weights = list(cfg.loss), list(cfg.loss_weights) or [1.0] * len(cfg.loss)
    unknown = [n for n in names if n not in ALL_LOSSES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], ALL_LOSSES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise AlignkitError(
            f"pref.loss: unknown loss '{unknown[0]}'.{hint} Known: {', '.join(ALL_LOSSES)}."
        )
    if len(weights) != len(names):
        raise AlignkitError(
            f"pref.loss_weights has {len(weights)} value(s) for {len(names)} loss(es) "
            f"({', '.join(names)}); give one weight per loss or none."
        )
    if any(n in FEEDBACK_LOSSES for n in names) and len(names) > 1:
        raise AlignkitError(
            "kto trains on unpaired feedback and cannot be combined with other losses."
        )
    if cfg.rpo_alpha > 0:
        names, weights = [*names, "sft"], [*weights, cfg.rpo_alpha]
    return names, weights


def loss_params(cfg: PrefConfig) -> LossParams:
    return LossParams(cfg.beta, cfg.label_smoothing, cfg.discopop_tau, cfg.simpo_gamma,
                      cfg.cpo_alpha, cfg.desirable_weight, cfg.undesirable_weight)  # fmt: skip


def check_pref(cfg: PrefConfig) -> tuple[list[str], list[float], LossParams]:
    """Validated loss plan and parameters, or an error listing every problem."""
    names, weights = loss_plan(cfg)
    params = loss_params(cfg)
    problems = param_problems(names, params)
    if problems:
        raise AlignkitError(" ".join(problems))
    return names, weights, params


# ---------------------------------------------------------------- per-batch loss sums


def pair_loss_sums(
    model: Any,
    batch: SequenceBatch,
    score_ref: Scorer | None,
    names: list[str],
    weights: list[float],
    params: LossParams,
    chunk: int = 0,
) -> LossSums:
    """Summed per-pair losses, the pair count, and summed per-pair metrics."""
    sums, counts = sequence_logps(model, batch, chunk)
    n = batch.units
    ref = score_ref(batch).to(sums.dtype) if score_ref is not None else None
    lp = PairLogps(sums[:n], sums[n:], counts[:n], counts[n:],
                   None if ref is None else ref[:n], None if ref is None else ref[n:])  # fmt: skip
    losses, chosen_r, rejected_r = combined_loss(lp, names, weights, params)
    metrics = {k: v.sum() for k, v in pair_metrics(lp, chosen_r, rejected_r).items()}
    return losses.sum(), torch.tensor(n), metrics


def feedback_loss_sums(
    model: Any, batch: SequenceBatch, score_ref: Scorer, params: LossParams, chunk: int = 0
) -> LossSums:
    """KTO: summed losses over completions; slots n.. are the mismatched KL sequences."""
    sums, _ = sequence_logps(model, batch, chunk)
    ref = score_ref(batch).to(sums.dtype)
    n = batch.units
    kl = kto_reference_point(sums[n:].detach(), ref[n:])
    losses, rewards = kto_loss(sums[:n], ref[:n], batch.desirable, kl, params)
    metrics = {"kl": kl * n, "rewards/mean": rewards.sum(), "logps/mean": sums[:n].detach().sum()}
    return losses.sum(), torch.tensor(n), metrics


# ---------------------------------------------------------------- setup


def disable_dropout(model: Any) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_reference(recipe: Recipe) -> Any:
    """A frozen full model: `pref.ref_model`, else a second copy of the starting model."""
    name = recipe.pref.ref_model or recipe.model.name_or_path
    model = load_model(replace(recipe.model, name_or_path=name, adapter="none"))
    model.eval().requires_grad_(False)
    return model


def pair_layout(recipe: Recipe) -> str:
    """The `pair_batch` layout the options ask for."""
    if not recipe.train.padding_free:
        return "padded"
    return "shared" if recipe.pref.share_prompt else "flat"


def pair_batcher(recipe: Recipe, pad_id: int) -> Callable[[list[TokenizedPair]], SequenceBatch]:
    return partial(pair_batch, pad_id=pad_id, layout=pair_layout(recipe))


def scoring_method(recipe: Recipe) -> str:
    """What besides weights and ids decides the exact reference values (the cache key)."""
    cfg = recipe.train
    return f"{pair_layout(recipe)} batch={cfg.micro_batch_size} chunk={cfg.logps_chunk}"


def check_model_input(recipe: Recipe) -> None:
    if recipe.train.packing:
        raise AlignkitError(
            "train.packing applies to SFT; preference pairs are padding-free already "
            "(train.padding_free). Remove --packing for alignkit pref."
        )
    if resolve(recipe.model.name_or_path).adapter:
        raise AlignkitError(
            f"model.name_or_path '{recipe.model.name_or_path}' is a LoRA adapter dir. Merge it "
            "into its base first (alignkit merge ADAPTER_DIR --out DIR) and train on DIR."
        )


def attach_reference(
    data: StageData, recipe: Recipe, score: Scorer, model_fp: str, device: torch.device,
    console: Console, verbose: bool,
) -> None:  # fmt: skip
    """Give every train and eval pair its cached (or freshly computed) reference log-probs."""
    make = pair_batcher(recipe, data.tokenizer.pad_token_id)
    for split in ("train_rows", "eval_rows"):
        rows = getattr(data, split)
        if not rows:
            continue
        compute = partial(compute_reference, rows, score, make, recipe.train.micro_batch_size,
                          device, verbose)  # fmt: skip
        with_ref, path, hit = cached_reference(rows, model_fp, scoring_method(recipe), compute)
        setattr(data, split, with_ref)
        if verbose:
            console.print(
                f"reference log-probs ({split[:-5]}): {'reused' if hit else 'wrote'} {path}"
            )


def eval_change(records: list[dict[str, float]], keys: list[str]) -> dict[str, tuple[float, float]]:
    """(first, last) value of each eval metric logged in the run."""
    logged = [r for r in records if any(k in r for k in keys)]
    if not logged:
        return {}
    return {k: (logged[0][k], logged[-1][k]) for k in keys if k in logged[0] and k in logged[-1]}


def train_pref(recipe: Recipe, console: Console | None = None) -> Path:
    console = console or Console()
    cfg, pcfg = recipe.train, recipe.pref
    names, weights, params = check_pref(pcfg)
    check_model_input(recipe)
    accelerator = make_accelerator(cfg, resolve_device(recipe.model.device))
    out, resume_from = prepare_output_dir(cfg, "pref")
    accelerator.wait_for_everyone()  # every rank has checked the dir before rank 0 writes to it
    torch.manual_seed(cfg.seed)
    feedback, referenced = names[0] in FEEDBACK_LOSSES, needs_reference(names)
    verbose = accelerator.is_main_process
    data = load_stage_data(recipe, ("feedback",) if feedback else ("pair",), console, verbose)
    model = load_trainable(recipe)
    lora = recipe.model.adapter != "none"
    ref_model = None
    if referenced and (not lora or pcfg.ref_model):
        ref_model = load_reference(recipe)
    if pcfg.disable_dropout:
        disable_dropout(model)
    chunk = cfg.logps_chunk
    score = reference_scorer(model, model, ref_model, chunk) if referenced else None
    if pcfg.precompute_ref and score is not None:
        if feedback:
            raise AlignkitError(
                "pref.precompute_ref is not available for kto (its KL pairs change per batch)."
            )
        with accelerator.main_process_first():  # rank 0 writes the cache, the others read it
            attach_reference(data, recipe, score, model_fingerprint(ref_model or model),
                             accelerator.device, console, verbose)  # fmt: skip
        ref_model = None  # every row now carries its reference log-probs: free the copy
    if feedback:
        make_batch = partial(feedback_batch, pad_id=data.tokenizer.pad_token_id,
                             max_length=recipe.data.max_length, flat=cfg.padding_free)  # fmt: skip
    else:
        make_batch = pair_batcher(recipe, data.tokenizer.pad_token_id)
    steps = total_steps(len(data.train_rows), cfg, accelerator.num_processes)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if score is not None:  # score through the prepared model (DDP / FSDP need its forward)
        score = reference_scorer(model, accelerator.unwrap_model(model), ref_model, chunk)
    if feedback:
        loss_sums = partial(feedback_loss_sums, score_ref=score, params=params, chunk=chunk)
    else:
        loss_sums = partial(pair_loss_sums, score_ref=score, names=names, weights=weights,
                            params=params, chunk=chunk)  # fmt: skip
    parts = LoopParts(accelerator, model, optimizer, scheduler, data.train_rows, make_batch,
                      loss_sums, data.eval_rows, make_batch, cfg, out)  # fmt: skip
    if resume_from is not None and verbose:
        console.print(f"resuming from {resume_from}")
    state = run_loop(parts, resume_from)
    finish(accelerator, model, data, recipe, out, CURVES, console, "pref", state)
    if verbose:
        keys = ["eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"]
        for key, (first, last) in eval_change(read_metrics(out / "metrics.jsonl"), keys).items():
            console.print(f"{key}: {first:.4f} (first eval) -> {last:.4f} (last eval)")
    return out
