"""Reward functions: verifiable checks, weighted sums, user functions and their errors."""

from __future__ import annotations

import pytest

from alignkit.config import OnlineConfig
from alignkit.errors import AlignkitError
from alignkit.rewards import build_rewards, import_reward, score_all, weighted_sum
from alignkit.rewards.base import NamedReward, Prompt, checked_scores
from alignkit.rewards.verifiable import final_number, gsm8k_reward, ifeval_reward, length_reward


def user(text, **fields):
    return Prompt([{"role": "user", "content": text}], fields, source="p.jsonl: line 3")


def test_ifeval_reward_is_the_fraction_of_instructions_followed():
    prompt = user(
        "Answer in lowercase, without commas.",
        instruction_id_list=["change_case:english_lowercase", "punctuation:no_comma"],
        kwargs=[{}, {}],
    )
    completions = ["all lower and no comma", "all lower, but a comma", "Upper, and a comma"]
    assert ifeval_reward([prompt] * 3, completions) == [1.0, 0.5, 0.0]


def test_ifeval_reward_uses_kwargs_and_names_rows_without_constraints():
    ends = user(
        "End with 'Is there anything else?'",
        instruction_id_list=["startend:end_checker"],
        kwargs=[{"end_phrase": "Is there anything else?"}],
    )
    assert ifeval_reward([ends, ends], ["Done. Is there anything else?", "Done."]) == [1.0, 0.0]
    with pytest.raises(AlignkitError, match=r"p.jsonl: line 3.*instruction_id_list"):
        ifeval_reward([user("no constraints")], ["x"])
    bad = user("x", instruction_id_list=["change_case:shouting"], kwargs=[{}])
    with pytest.raises(AlignkitError, match="unknown IFEval instruction 'change_case:shouting'"):
        ifeval_reward([bad], ["x"])


def test_gsm8k_reward_compares_final_numbers():
    prompt = user("How many?", answer="She sold 48 + 24 = 72 clips.\n#### 72")
    completions = ["48 + 24 = 72, so the answer is 72.", "#### 72.0", "It is 71", "no number"]
    assert gsm8k_reward([prompt] * 4, completions) == [1.0, 1.0, 0.0, 0.0]
    assert final_number("costs $1,234.50 in all") == 1234.5
    with pytest.raises(AlignkitError, match="answer"):
        gsm8k_reward([user("no answer field")], ["1"])


def test_length_reward_and_weighted_sum():
    assert length_reward([user("x")] * 2, ["a b c", "a b c d e"], target=3) == [0.0, -2 / 3]
    rewards = [
        NamedReward("a", lambda p, c: [1.0, 2.0]),
        NamedReward("b", lambda p, c: [3.0, 0.0], 0.5),
    ]
    scores = score_all(rewards, [user("x")] * 2, ["u", "v"])
    assert scores == {"a": [1.0, 2.0], "b": [3.0, 0.0]}
    assert weighted_sum(scores, rewards) == [2.5, 2.0]


def test_scores_of_the_wrong_shape_or_type_are_named():
    with pytest.raises(AlignkitError, match="'mine' returned 1 values for 2 completions"):
        checked_scores("mine", [1.0], 2)
    with pytest.raises(AlignkitError, match="'mine' must return a list of numbers"):
        checked_scores("mine", ["high", "low"], 2)
    with pytest.raises(AlignkitError, match="NaN"):
        checked_scores("mine", [float("nan")], 1)
    assert checked_scores("mine", (1, True), 2) == [1.0, 1.0]


def test_user_functions_by_dotted_path():
    assert import_reward("support:short_reward")([], ["abcd"]) == [-0.1]
    with pytest.raises(AlignkitError, match="cannot import module 'no_such_pkg.rewards'"):
        import_reward("no_such_pkg.rewards:fn")
    with pytest.raises(AlignkitError, match="has no function 'missing'"):
        import_reward("support:missing")
    with pytest.raises(AlignkitError, match="not a reward"):
        import_reward("ifeval2")


def test_build_rewards_names_weights_and_errors():
    built = build_rewards(OnlineConfig(rewards=["ifeval", "length", "support:short_reward"]))
    assert [(r.name, r.weight) for r in built] == [
        ("ifeval", 1.0),
        ("length", 1.0),
        ("short_reward", 1.0),
    ]
    with pytest.raises(AlignkitError, match="2 value"):
        build_rewards(OnlineConfig(rewards=["ifeval"], reward_weights=[1.0, 2.0]))
    with pytest.raises(AlignkitError, match="same reward twice"):
        build_rewards(OnlineConfig(rewards=["length", "length"]))
