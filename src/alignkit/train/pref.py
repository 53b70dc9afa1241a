"""Preference optimization: setup, reference, train, save. `alignkit pref` is a thin shell.

Pairs (DPO and its relatives) or unpaired feedback (KTO) are scored as summed
completion log-probs under the policy and the reference; a loss from
`losses.preference` turns those into per-pair losses and rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from alignkit.config import PrefConfig, Recipe
from alignkit.config.check import check, loss_plan
from alignkit.console import captured
from alignkit.data.batching import SequenceBatch, feedback_batch, pair_batch, with_kl_completions
from alignkit.data.tokenize import TokenizedPair
from alignkit.errors import AlignkitError
from alignkit.losses.preference import (
    FEEDBACK_LOSSES,
    LossParams,
    PairLogps,
    combined_loss,
    kto_loss,
    kto_reference_point,
    needs_reference,
    pair_metrics,
)
from alignkit.models import load_model, resolve
from alignkit.train.checkpoint import distributed_kind, is_sharded
from alignkit.train.logps import sequence_logps
from alignkit.train.reference import (
    Scorer,
    cached_reference,
    compute_reference,
    model_fingerprint,
    prepare_reference_model,
    reference_scorer,
)
from alignkit.train.stage import (
    StageData,
    StageRun,
    keep_exact_layout,
    new_tokens,
    prepare_optimizer,
    prepare_stage,
    train_and_save,
)

LossSums = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
CURVES = [
    ["loss", "eval_loss"],
    ["rewards/accuracies", "eval_rewards/accuracies"],
    ["rewards/margins", "eval_rewards/margins"],
]


def loss_params(cfg: PrefConfig) -> LossParams:
    return LossParams(
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        discopop_tau=cfg.discopop_tau,
        simpo_gamma=cfg.simpo_gamma,
        cpo_alpha=cfg.cpo_alpha,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
    )


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
    lp = PairLogps(
        chosen=sums[:n],
        rejected=sums[n:],
        chosen_tokens=counts[:n],
        rejected_tokens=counts[n:],
        ref_chosen=None if ref is None else ref[:n],
        ref_rejected=None if ref is None else ref[n:],
    )
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


def load_reference(recipe: Recipe, data: StageData) -> Any:
    """A frozen full model: `pref.ref_model`, else a second copy of the starting model
    (its embeddings grown like the policy's for the template's added tokens)."""
    name = recipe.pref.ref_model or recipe.model.name_or_path
    cfg = replace(recipe.model, name_or_path=name, adapter="none")
    model = load_model(cfg, new_tokens=replace(new_tokens(data), ids=()))
    model.eval().requires_grad_(False)
    return model


def pair_layout(recipe: Recipe) -> str:
    """The `pair_batch` layout the options ask for."""
    if not recipe.train.padding_free:
        return "padded"
    return "shared" if recipe.pref.share_prompt else "flat"


def pair_batcher(recipe: Recipe, pad_id: int) -> Callable[[list[TokenizedPair]], SequenceBatch]:
    return partial(pair_batch, pad_id=pad_id, layout=pair_layout(recipe))


def scoring_method(recipe: Recipe, acc: Any) -> str:
    """What besides weights and ids decides the exact reference values (the cache key):
    the batch layout, the autocast precision actually applied (DeepSpeed names a precision
    it does not autocast in), and a sharding engine that casts weights itself."""
    cfg = recipe.train
    method = f"{pair_layout(recipe)} batch={cfg.micro_batch_size} chunk={cfg.logps_chunk}"
    if getattr(acc, "native_amp", False) and acc.mixed_precision != "no":
        method += f" autocast={acc.mixed_precision}"
    if is_sharded(acc):  # FSDP or DeepSpeed casts the weights itself
        method += f" engine={distributed_kind(acc)} precision={acc.mixed_precision}"
    return method


def check_model_input(recipe: Recipe) -> None:
    if resolve(recipe.model.name_or_path).adapter:
        raise AlignkitError(
            f"model.name_or_path '{recipe.model.name_or_path}' is a LoRA adapter dir. Merge it "
            "into its base first (alignkit merge ADAPTER_DIR --out DIR) and train on DIR."
        )


def attach_reference(run: StageRun, score: Scorer, model_fp: str) -> None:
    """Give every train and eval pair its cached (or freshly computed) reference log-probs."""
    recipe, data = run.recipe, run.data
    make = pair_batcher(recipe, data.tokenizer.pad_token_id)
    for split in ("train_rows", "eval_rows"):
        rows = getattr(data, split)
        if not rows:
            continue
        acc = run.accelerator
        compute = partial(
            compute_reference,
            rows,
            score,
            make,
            recipe.train.micro_batch_size,
            acc.device,
            run.verbose,
            acc,
        )
        method = scoring_method(recipe, acc)
        with_ref, path, hit = cached_reference(rows, model_fp, method, compute, acc)
        setattr(data, split, with_ref)
        run.note(f"reference log-probs ({split[:-5]}): {'reused' if hit else 'wrote'} {path}")


def prepare_reference(run: StageRun) -> Any | None:
    """The frozen reference model a full-weight run needs, or None (LoRA: adapter off;
    precomputed: every row carries its reference log-probs and the copy is freed)."""
    recipe = run.recipe
    lora = recipe.model.adapter != "none"
    ref_model = None
    if not lora or recipe.pref.ref_model:
        ref_model = load_reference(recipe, run.data)
        keep_exact_layout(run, ref_model)
        recipe = run.recipe
    # fingerprinted whole, before sharding
    model_fp = model_fingerprint(ref_model or run.model) if recipe.pref.precompute_ref else ""
    if ref_model is not None:
        ref_model = prepare_reference_model(run.accelerator, ref_model)
    if recipe.pref.precompute_ref:  # the pairs split over the processes, one cache file
        score = reference_scorer(run.model, run.model, ref_model, recipe.train.logps_chunk)
        attach_reference(run, autocast_like_policy(run.accelerator, score), model_fp)
        return None
    return ref_model


def autocast_like_policy(acc: Any, score: Scorer) -> Scorer:
    """`score` under the stage's autocast, as the prepared policy runs: the reference is
    then what a live one would be (bf16 rounding kept out of fp32 ties, and back)."""

    def scored(batch: SequenceBatch) -> torch.Tensor:
        with acc.autocast():
            return score(batch)

    return scored


def pref_loss_sums(run: StageRun, names: list[str], weights: list[float], ref_model: Any) -> Any:
    """The per-batch loss of this run, scoring the reference through the prepared model
    (DDP / FSDP need its forward)."""
    chunk, params = run.recipe.train.logps_chunk, loss_params(run.recipe.pref)
    score = None
    if needs_reference(names):
        unwrapped = run.accelerator.unwrap_model(run.model)
        score = reference_scorer(run.model, unwrapped, ref_model, chunk)
    if names[0] in FEEDBACK_LOSSES:
        return partial(feedback_loss_sums, score_ref=score, params=params, chunk=chunk)
    return partial(
        pair_loss_sums, score_ref=score, names=names, weights=weights, params=params, chunk=chunk
    )


def pair_kl_completions(data: StageData) -> None:
    """KTO: every train row takes its KL completion from another train row, every eval row
    from another eval row (from a train row, when there is a single eval row)."""
    train, held = data.train_rows, data.eval_rows
    data.train_rows, data.eval_rows = (
        with_kl_completions(train, held),
        with_kl_completions(held, train),
    )


def pref_batcher(run: StageRun, feedback: bool) -> Callable[[list[Any]], SequenceBatch]:
    pad_id = run.data.tokenizer.pad_token_id
    if feedback:
        recipe = run.recipe
        return partial(
            feedback_batch,
            pad_id=pad_id,
            max_length=recipe.data.max_length,
            flat=recipe.train.padding_free,
        )
    return pair_batcher(run.recipe, pad_id)


def train_pref(recipe: Recipe, console: Console | None = None) -> Path:
    """Train; other libraries' output goes to the output dir's log.txt, not the terminal."""
    check(recipe, "pref")
    check_model_input(recipe)
    names, weights = loss_plan(recipe.pref)
    feedback = names[0] in FEEDBACK_LOSSES
    with captured() as log:
        run = prepare_stage(recipe, "pref", ("feedback",) if feedback else ("pair",), console, log)
        if feedback:
            pair_kl_completions(run.data)
        if recipe.pref.disable_dropout:
            disable_dropout(run.model)
        ref_model = prepare_reference(run) if needs_reference(names) else None
        make_batch = pref_batcher(run, feedback)
        optimizer, scheduler = prepare_optimizer(run, len(run.data.train_rows))
        # after prepare_optimizer: the reference is scored through the prepared model
        loss_sums = pref_loss_sums(run, names, weights, ref_model)
        train_and_save(
            run,
            rows=run.data.train_rows,
            make_batch=make_batch,
            loss_sums=loss_sums,
            make_eval_batch=make_batch,
            optimizer=optimizer,
            scheduler=scheduler,
            curves=CURVES,
        )
    return run.out
