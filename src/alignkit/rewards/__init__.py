"""Reward functions for on-policy training, built from `online.rewards` specs.

Every reward has one interface, `(prompts: list[Prompt], completions: list[str]) ->
one float per completion` (`rewards.base`). Specs: `ifeval`, `gsm8k`, `length`,
`model:DIR`, or a user function `package.module:function`.
"""

from __future__ import annotations

import importlib
from functools import partial

from alignkit.config import OnlineConfig
from alignkit.errors import AlignkitError
from alignkit.rewards.base import NamedReward, Prompt, RewardFn, score_all, weighted_sum
from alignkit.rewards.verifiable import gsm8k_reward, ifeval_reward, length_reward

BUILTIN = ("ifeval", "gsm8k", "length")
MODEL_PREFIX = "model:"

__all__ = [
    "NamedReward",
    "Prompt",
    "RewardFn",
    "build_rewards",
    "import_reward",
    "score_all",
    "weighted_sum",
]


def import_reward(spec: str) -> RewardFn:
    """The function named `package.module:function`, with an error saying what to fix."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AlignkitError(
            f"online.rewards: '{spec}' is not a reward. Use one of {', '.join(BUILTIN)}, "
            "model:DIR, or a function as package.module:function."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AlignkitError(
            f"online.rewards: cannot import module '{module_name}' for reward '{spec}' ({exc}). "
            "Install it or put its folder on PYTHONPATH."
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AlignkitError(
            f"online.rewards: module '{module_name}' has no function '{attr}' (reward '{spec}'). "
            "It must define fn(prompts, completions) -> list of floats."
        )
    return fn


def make_reward(spec: str, cfg: OnlineConfig, device: str) -> tuple[str, RewardFn]:
    """A reward spec's metric name and function."""
    if spec == "ifeval":
        return spec, ifeval_reward
    if spec == "gsm8k":
        return spec, gsm8k_reward
    if spec == "length":
        return spec, partial(length_reward, target=cfg.length_target)
    if spec.startswith(MODEL_PREFIX):
        from alignkit.rewards.model import RewardModel

        return "model", RewardModel(spec[len(MODEL_PREFIX) :], device=device)
    return spec.rpartition(":")[2], import_reward(spec)


def build_rewards(cfg: OnlineConfig, device: str = "cpu") -> list[NamedReward]:
    """The configured rewards with their weights (1 each when none are given)."""
    if not cfg.rewards:
        raise AlignkitError("online.rewards is empty; name at least one reward function.")
    weights = list(cfg.reward_weights) or [1.0] * len(cfg.rewards)
    if len(weights) != len(cfg.rewards):
        raise AlignkitError(
            f"online.reward_weights has {len(weights)} value(s) for {len(cfg.rewards)} "
            "reward(s); give one weight per reward or none."
        )
    made = [make_reward(spec, cfg, device) for spec in cfg.rewards]
    names = [name for name, _ in made]
    if len(set(names)) != len(names):
        raise AlignkitError(f"online.rewards names the same reward twice: {', '.join(names)}.")
    return [NamedReward(n, fn, w) for (n, fn), w in zip(made, weights, strict=True)]
