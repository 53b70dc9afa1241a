"""The rules a recipe must meet beyond its field types, gathered beside the schema.

`check(recipe, command)` runs the rules of one command (sft, pref, eval; other commands
have none) and raises an `AlignkitError` naming the key and what to do. Commands call
it before any work, and `alignkit run --dry-run` calls it for every stage, so a rule
is written once. The loss registry (names, which take unpaired feedback) belongs to
`losses.preference`; which combinations and values are allowed is decided here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

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
            "pref.precompute_ref is not available for kto (its KL pairs change per batch)."
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


RULES: dict[str, tuple[Callable[[Recipe], None], ...]] = {
    "pref": (check_pref,),
    "eval": (check_eval,),
}


def check(recipe: Recipe, command: str) -> None:
    """Raise on the first rule of `command` the recipe breaks."""
    for rule in RULES.get(command, ()):
        rule(recipe)
