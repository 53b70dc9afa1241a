"""Rewards checked by rule: IFEval instructions, a GSM8K-style final number, length.

The instruction checks are lm-eval's IFEval checkers (the ones `alignkit eval` scores
with), applied to prompts whose rows carry `instruction_id_list` and `kwargs` as in
IFEval's data.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.rewards.base import Prompt

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


@cache
def ifeval_module() -> Any:
    """lm-eval's IFEval scorer, with the shipped sentence splitter (no download)."""
    from alignkit.eval.offline_nltk import use_shipped_punkt

    use_shipped_punkt()
    try:
        from lm_eval.tasks.ifeval import utils
    except ImportError:
        raise AlignkitError(
            "The ifeval reward uses lm-eval's instruction checkers; install the eval extra "
            "(pip install 'alignkit[eval]')."
        ) from None
    return utils


def constraints(prompt: Prompt) -> tuple[list[str], list[dict[str, Any]]]:
    """The prompt row's instruction ids and their kwargs, or an error naming the row."""
    ids, kwargs = prompt.fields.get("instruction_id_list"), prompt.fields.get("kwargs")
    if not isinstance(ids, list) or not ids or not isinstance(kwargs, list):
        raise AlignkitError(
            f"{prompt.source or 'a prompt'}: the ifeval reward needs `instruction_id_list` (a "
            "non-empty list) and `kwargs` (one mapping per instruction) in the row, as in "
            "IFEval's data. Use prompts with constraints or another reward."
        )
    if len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise AlignkitError(
            f"{prompt.source or 'a prompt'}: `kwargs` must hold one mapping per entry of "
            f"`instruction_id_list` ({len(ids)}); got {kwargs!r}."
        )
    return ids, kwargs


def instructions_followed(prompt: Prompt, completion: str) -> list[bool]:
    """Whether the completion follows each of the prompt's instructions (strict check)."""
    utils = ifeval_module()
    ids, kwargs = constraints(prompt)
    unknown = [i for i in ids if i not in utils.instructions_registry.INSTRUCTION_DICT]
    if unknown:
        raise AlignkitError(
            f"{prompt.source or 'a prompt'}: unknown IFEval instruction '{unknown[0]}'. Known: "
            f"{', '.join(sorted(utils.instructions_registry.INSTRUCTION_DICT))}."
        )
    row = utils.InputExample(key=0, instruction_id_list=ids, prompt=prompt.text, kwargs=kwargs)
    return utils.test_instruction_following_strict(row, completion).follow_instruction_list


def ifeval_reward(prompts: list[Prompt], completions: list[str]) -> list[float]:
    """The fraction of the prompt's instructions each completion follows (0 to 1)."""
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        followed = instructions_followed(prompt, completion)
        scores.append(sum(followed) / len(followed))
    return scores


def as_number(text: str) -> float | None:
    """A number written with optional $ and thousands commas, as a float."""
    try:
        return float(text.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """A GSM8K-style answer: what follows `####` if present, else the last number."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = NUMBER.findall(text)
        return as_number(found[0]) if found else None
    found = NUMBER.findall(text)
    return as_number(found[-1]) if found else None


def reference_answer(prompt: Prompt) -> float:
    value = prompt.fields.get("answer")
    number = final_number(str(value)) if value is not None else None
    if number is None:
        raise AlignkitError(
            f"{prompt.source or 'a prompt'}: the gsm8k reward needs an `answer` field holding a "
            f"number (or GSM8K's '... #### 42'); got {value!r}."
        )
    return number


def gsm8k_reward(prompts: list[Prompt], completions: list[str]) -> list[float]:
    """1 when the completion's final number equals the row's answer, else 0."""
    return [
        float(final_number(c) == reference_answer(p))
        for p, c in zip(prompts, completions, strict=True)
    ]


def length_reward(prompts: list[Prompt], completions: list[str], target: int) -> list[float]:
    """0 up to `target` words, then minus the excess as a fraction of `target`."""
    return [-max(0, len(c.split()) - target) / target for c in completions]
