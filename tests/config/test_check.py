"""The rules beyond types: one `check(recipe, command)` gathers them for every caller."""

from __future__ import annotations

import pytest

from alignkit.config import PrefConfig, load_recipe
from alignkit.config.check import check, loss_plan, loss_value_problems
from alignkit.errors import AlignkitError


def test_parameter_problems_are_named():
    assert loss_value_problems(["exo_pair"], PrefConfig(label_smoothing=0.0))
    assert loss_value_problems(["robust"], PrefConfig(label_smoothing=0.5))
    assert loss_value_problems(["sigmoid"], PrefConfig(beta=0.0))
    assert not loss_value_problems(["sigmoid", "robust"], PrefConfig(label_smoothing=0.1))


def test_loss_plan_appends_rpo_and_defaults_weights():
    assert loss_plan(PrefConfig(loss=["sigmoid", "bco_pair"])) == (
        ["sigmoid", "bco_pair"],
        [1.0, 1.0],
    )
    assert loss_plan(PrefConfig(loss=["apo_zero"], rpo_alpha=0.5)) == (
        ["apo_zero", "sft"],
        [1.0, 0.5],
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([("pref.loss", "sigmoidd")], "Did you mean 'sigmoid'"),
        ([("pref.loss", "sigmoid,ipo"), ("pref.loss_weights", "1")], "one weight per loss"),
        ([("pref.loss", "kto,sigmoid")], "cannot be combined"),
        ([("pref.beta", "0")], "pref.beta must be above 0"),
        ([("train.packing", "true")], "train.packing applies to SFT"),
        ([("pref.loss", "kto"), ("pref.precompute_ref", "true")], "not available for kto"),
    ],
)
def test_pref_rules(overrides, message):
    with pytest.raises(AlignkitError, match=message):
        check(load_recipe(None, overrides), "pref")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([("eval.tasks", "ifeval,nope")], "Unknown eval task"),
        ([("eval.num_fewshot", "gsm8k=x")], "eval.num_fewshot"),
        ([("eval.limit", "0")], "eval.limit must be at least 1"),
        ([("eval.batch_size", "big")], "eval.batch_size must be auto or a positive number"),
    ],
)
def test_eval_rules(overrides, message):
    with pytest.raises(AlignkitError, match=message):
        check(load_recipe(None, overrides), "eval")


def test_a_command_checks_only_its_own_rules():
    packed = load_recipe(None, [("train.packing", "true")])
    check(packed, "sft")  # packing is an SFT option
    with pytest.raises(AlignkitError):
        check(packed, "pref")
