"""The one interface every reward has: (prompts, completions) -> one float per completion.

A `Prompt` carries its chat messages and the fields of its data row that a reward may
need (IFEval constraint kwargs, a math answer), plus where it came from, so a reward
that cannot score a row names the file and row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit.errors import AlignkitError

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    """A prompt to complete: its messages (ending with a user turn), its row's other
    fields, and where it came from (`file: line N`)."""

    messages: list[Message]
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def text(self) -> str:
        """The last user message: what the completion answers."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


RewardFn = Callable[[list[Prompt], list[str]], Sequence[float]]


@dataclass(frozen=True)
class NamedReward:
    """A reward function with the name its metrics carry and its weight in the sum."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def checked_scores(name: str, values: Any, expected: int) -> list[float]:
    """`values` as a list of `expected` finite floats, or an error naming the reward."""
    try:
        scores = [float(v) for v in values]
    except (TypeError, ValueError):
        raise AlignkitError(
            f"Reward '{name}' must return a list of numbers (one per completion); it returned "
            f"{type(values).__name__} {str(values)[:80]!r}."
        ) from None
    if len(scores) != expected:
        raise AlignkitError(
            f"Reward '{name}' returned {len(scores)} values for {expected} completions; it "
            "must return exactly one number per completion, in order."
        )
    if not all(math.isfinite(s) for s in scores):
        raise AlignkitError(f"Reward '{name}' returned a NaN or infinite value: {scores}.")
    return scores


def score_all(
    rewards: list[NamedReward], prompts: list[Prompt], completions: list[str]
) -> dict[str, list[float]]:
    """Each reward's scores of the completions, by reward name."""
    return {
        r.name: checked_scores(r.name, r.fn(prompts, completions), len(completions))
        for r in rewards
    }


def weighted_sum(scores: dict[str, list[float]], rewards: list[NamedReward]) -> list[float]:
    """Per completion, the weighted sum of every reward's score."""
    columns = [[r.weight * s for s in scores[r.name]] for r in rewards]
    return [sum(values) for values in zip(*columns, strict=True)]
