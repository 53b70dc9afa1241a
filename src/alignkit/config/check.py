"""The rules a recipe must meet beyond its field types, gathered beside the schema.

`check(recipe, command)` runs the value ranges every command shares, then the rules
of one command (sft, pref, eval; other commands have none of their own) and raises an `AlignkitError` naming the key and what to do. Commands call
it before any work, and `alignkit run --dry-run` calls it for every stage, so a rule
is written once. The loss registry (names, which take unpaired feedback) belongs to
`losses.preference`; which combinations and values are allowed is decided here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

from alignkit.config.load import leaf_fields
from alignkit.config.schema import EvalConfig, PrefConfig, Recipe
from alignkit.errors import AlignkitError


def loss_plan(cfg: PrefConfig) -> tuple[list[str], list[float]]:
    """The loss names and weights to sum (RPO's NLL term appended when rpo_alpha > 0)."""
    from alignkit.losses.preference import ALL_LOSSES, FEEDBACK_LOSSES

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


def loss_value_problems(names: list[str], cfg: PrefConfig) -> list[str]:
    """What is wrong with the hyperparameters for these losses (empty when fine)."""
    problems = []
    if cfg.beta <= 0:
        problems.append(f"pref.beta must be above 0 (got {cfg.beta}).")
    if "robust" in names and not 0 <= cfg.label_smoothing < 0.5:
        problems.append("robust needs pref.label_smoothing in [0, 0.5).")
    if "exo_pair" in names and not 0 < cfg.label_smoothing < 1:
        problems.append("exo_pair needs pref.label_smoothing in (0, 1); the EXO paper uses 1e-3.")
    return problems


def check_pref(recipe: Recipe) -> None:
    """Losses, their values, and options that do not apply to preference training."""
    from alignkit.losses.preference import FEEDBACK_LOSSES

    names, _ = loss_plan(recipe.pref)
    problems = loss_value_problems(names, recipe.pref)
    if problems:
        raise AlignkitError(" ".join(problems))
    if recipe.train.packing:
        raise AlignkitError(
            "train.packing applies to SFT; preference pairs are padding-free already "
            "(train.padding_free). Remove --packing for alignkit pref."
        )
    if recipe.pref.precompute_ref and names[0] in FEEDBACK_LOSSES:
        raise AlignkitError(
            "pref.precompute_ref is not available for kto (the reference cache holds "
            "preference pairs only); remove --precompute-ref."
        )


def check_eval_values(cfg: EvalConfig) -> None:
    if cfg.limit is not None and cfg.limit < 1:
        raise AlignkitError(f"eval.limit must be at least 1; got {cfg.limit}.")
    if cfg.batch_size != "auto" and (not cfg.batch_size.isdigit() or int(cfg.batch_size) < 1):
        raise AlignkitError(
            f"eval.batch_size must be auto or a positive number; got '{cfg.batch_size}'."
        )


def check_eval(recipe: Recipe) -> None:
    """Known benchmarks, a readable few-shot spec, and sane limits."""
    from alignkit.eval.tasks import parse_fewshot, parse_tasks

    parse_fewshot(recipe.eval.num_fewshot, parse_tasks(recipe.eval.tasks))
    check_eval_values(recipe.eval)


# ---------------------------------------------------------------- value ranges


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or v >= low), f"at least {low:g}"


def _above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or v > low), f"above {low:g}"


def _within(low: float, high: float, high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    if high_open:
        return (lambda v: low <= v < high), f"in [{low:g}, {high:g})"
    return (lambda v: low <= v <= high), f"in [{low:g}, {high:g}]"


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# dotted key -> (test, what the value must be); the one table of numeric ranges
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lora.r": _at_least(1),
    "lora.alpha": _above(0),
    "lora.dropout": _within(0, 1, high_open=True),
    "data.max_length": _at_least(2),
    "data.max_prompt_length": _at_least(1),
    "data.seed": _within(0, 2**32 - 1),
    "data.num_proc": _at_least(1),
    "train.epochs": _at_least(0),
    "train.max_steps": _at_least(0),
    "train.micro_batch_size": _at_least(1),
    "train.gradient_accumulation_steps": _at_least(1),
    "train.learning_rate": _above(0),
    "train.warmup_ratio": _within(0, 1),
    "train.warmup_steps": _at_least(0),
    "train.weight_decay": _at_least(0),
    "train.max_grad_norm": _at_least(0),
    "train.seed": _within(0, 2**32 - 1),
    "train.logps_chunk": _at_least(0),
    "train.logging_steps": _at_least(1),
    "train.eval_fraction": _within(0, 1, high_open=True),
    "train.eval_steps": _at_least(0),
    "train.save_steps": _at_least(0),
    "train.save_total_limit": _at_least(0),
    "pref.label_smoothing": _within(0, 1),
    "pref.rpo_alpha": _at_least(0),
    "pref.discopop_tau": _above(0),
    "pref.cpo_alpha": _at_least(0),
    "pref.desirable_weight": _at_least(0),
    "pref.undesirable_weight": _at_least(0),
    "generation.max_new_tokens": _at_least(1),
    "generation.temperature": _at_least(0),
    "generation.top_p": _within(0, 1),
    "generation.top_k": _at_least(0),
    "generation.repetition_penalty": _above(0),
    "generation.seed": _within(0, 2**64 - 1),
    "eval.max_gen_toks": _at_least(1),
    "online.num_generations": _at_least(2),
    "online.max_completion_length": _at_least(1),
    "online.temperature": _above(0),
    "online.top_p": _within(0, 1),
    "online.top_k": _at_least(0),
    "online.length_target": _at_least(1),
    "online.beta": _at_least(0),
    "online.epsilon": _at_least(0),
    "online.epsilon_high": _at_least(0),
    "rm.eval_fraction": _within(0, 1, high_open=True),
}


def value_of(recipe: Recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def check_ranges(recipe: Recipe) -> None:
    """Every numeric option within its range, and settings that cannot train at all."""
    for key, (ok, what) in RANGES.items():
        value = value_of(recipe, key)
        if not ok(value):
            raise AlignkitError(f"{key} must be {what}; got {value}. {field_note(key)}")
    for i, source in enumerate(recipe.data.sources + recipe.data.eval_sources):
        if source.weight <= 0:
            raise AlignkitError(
                f"data source {i + 1} ('{source.path}'): weight must be above 0; got "
                f"{source.weight}. Remove the source instead of giving it weight 0."
            )
    if recipe.train.max_steps == 0 and recipe.train.epochs == 0:
        raise AlignkitError(
            "train.epochs is 0 and train.max_steps is 0: nothing would be trained. "
            "Set train.epochs to 1 or more, or train.max_steps."
        )
    if not DEVICE.match(recipe.model.device):
        raise AlignkitError(
            f"model.device must be auto, cpu, mps, cuda or cuda:N; got '{recipe.model.device}'."
        )


def field_note(key: str) -> str:
    """The field's help, to say what the option is for."""
    return f"({key}: {leaf_fields(Recipe)[key][1].metadata.get('help', '')})"


def check_lengths(recipe: Recipe) -> None:
    from alignkit.data.tokenize import check_prompt_limit

    check_prompt_limit(recipe.data)


COMMON = (check_ranges, check_lengths)


def check_online(recipe: Recipe) -> None:
    """Online DPO trains on pairs: its pref.loss must be a pair loss with sane values."""
    from alignkit.losses.preference import FEEDBACK_LOSSES

    if recipe.online.algorithm != "online_dpo":
        return
    names, _ = loss_plan(recipe.pref)
    if names[0] in FEEDBACK_LOSSES:
        raise AlignkitError(
            "online_dpo trains on best-vs-worst pairs; pref.loss kto needs unpaired feedback. "
            "Use a pair loss such as sigmoid or apo_zero."
        )
    problems = loss_value_problems(names, recipe.pref)
    if problems:
        raise AlignkitError(" ".join(problems))


RULES: dict[str, tuple[Callable[[Recipe], None], ...]] = {
    "pref": (check_pref,),
    "online": (check_online,),
    "eval": (check_eval,),
}


def check(recipe: Recipe, command: str) -> None:
    """Raise on the first rule the recipe breaks: the ranges every command shares, then
    the rules of `command`."""
    for rule in (*COMMON, *RULES.get(command, ())):
        rule(recipe)
