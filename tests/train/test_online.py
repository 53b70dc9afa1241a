"""`alignkit online` end to end on a tiny model: the reward rises, resume is exact,
online DPO and the KL term run, metrics carry TRL's names."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from safetensors.torch import load_file
from support import write_jsonl

from alignkit.config import load_recipe
from alignkit.rundir import read_metrics
from alignkit.train.online import train_online

PROMPTS = [{"prompt": f"Write something about item {i}."} for i in range(8)]


def recipe(tmp_path, model_dir, **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    overrides = {
        "model.name_or_path": str(model_dir),
        "data.sources": str(data),
        "train.output_dir": str(tmp_path / "out"),
        "train.micro_batch_size": 2,
        "train.learning_rate": 3e-2,
        "train.scheduler": "constant",
        "train.max_steps": 4,
        "online.rewards": "support:short_reward",
        "online.num_generations": 8,
        "online.max_completion_length": 8,
        "online.loss_type": "grpo",
        **settings,
    }
    return load_recipe(None, [(k, str(v)) for k, v in overrides.items()])


def test_grpo_raises_a_verifiable_reward(tmp_path, peaky_model_dir):
    """The built-in length rule "at most 2 words" (0 when met, minus the excess per word
    of the target otherwise): 8 sampled tokens hold several words at first; GRPO learns
    to produce fewer."""
    settings = {"train.max_steps": 20, "online.rewards": "length", "online.length_target": 2}
    out = train_online(recipe(tmp_path, peaky_model_dir, **settings))
    rewards = [r["reward"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(rewards) == 20
    first, last = statistics.fmean(rewards[:5]), statistics.fmean(rewards[-5:])
    assert last > first + 0.5, rewards
    assert (out / "training_curves.png").is_file() and (out / "run_info.json").is_file()


def test_metrics_have_trl_names(tmp_path, peaky_model_dir):
    out = train_online(recipe(tmp_path, peaky_model_dir, **{"train.max_steps": 1}))
    record = read_metrics(out / "metrics.jsonl")[0]
    for key in (
        "loss",
        "reward",
        "reward_std",
        "rewards/short_reward/mean",
        "rewards/short_reward/std",
        "frac_reward_zero_std",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
    ):
        assert key in record, key
    assert record["completions/max_length"] <= 8
    assert record["clip_ratio/region_mean"] == 0  # one update per sample: the ratio is 1


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, peaky_model_dir):
    """Two steps, then a resume to four: the same samples, rewards and final weights as
    four steps at once (sampling is seeded by step, the rest comes from the checkpoint)."""
    full = train_online(recipe(tmp_path / "a", peaky_model_dir))
    first = recipe(tmp_path / "b", peaky_model_dir, **{"train.max_steps": 2})
    train_online(first)
    rest = recipe(tmp_path / "b", peaky_model_dir, **{"train.resume": "auto"})
    resumed = train_online(rest)
    keys = ("reward", "loss", "completions/mean_length")
    expected = [[r[k] for k in keys] for r in read_metrics(full / "metrics.jsonl")]
    got = [[r[k] for k in keys] for r in read_metrics(resumed / "metrics.jsonl")]
    assert got == expected
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_online_dpo_and_grpo_with_kl_under_lora(tmp_path, peaky_model_dir):
    dpo = train_online(
        recipe(
            tmp_path / "dpo",
            peaky_model_dir,
            **{"online.algorithm": "online_dpo", "model.adapter": "lora", "train.max_steps": 2},
        )
    )
    records = read_metrics(dpo / "metrics.jsonl")
    assert all(r["pairs"] + r["ties"] == 2 for r in records)  # two prompts per step
    # step 1: the adapter is a no-op, so policy = reference and DPO's loss is log 2
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    kl = train_online(
        recipe(
            tmp_path / "kl",
            peaky_model_dir,
            **{"online.beta": 0.1, "model.adapter": "lora", "train.max_steps": 3},
        )
    )
    records = read_metrics(kl / "metrics.jsonl")
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapter starts as a no-op
    assert records[-1]["kl"] > 0


def test_held_out_prompts_are_scored_before_and_after(tmp_path, peaky_model_dir):
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Say {w}."} for w in "abc"])
    out = train_online(
        recipe(tmp_path, peaky_model_dir, **{"data.eval_sources": str(held), "train.max_steps": 2})
    )
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "eval_reward" in r] == [0, 2]
    assert all(r["eval_reward_se"] >= 0 for r in records if "eval_reward" in r)
    assert "eval_rewards/short_reward/mean" in records[0]


def test_full_weights_kl_uses_a_frozen_copy_and_the_cli_runs(tmp_path, peaky_model_dir):
    from alignkit.cli import main

    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "cli"
    argv = ["online", "--model", str(peaky_model_dir), "--output-dir", str(out), "--beta", "0.1"]
    settings = {
        "data.sources": str(data),
        "train.max_steps": 3,
        "train.micro_batch_size": 2,
        "train.learning_rate": 3e-2,
        "online.num_generations": 4,
        "online.max_completion_length": 6,
        "online.rewards": "support:short_reward",
    }
    assert main(argv + [f"{k}={v}" for k, v in settings.items()]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the copy equals the start
    assert records[-1]["kl"] > 0


def test_online_dpo_with_every_reward_tied_makes_no_update(tmp_path, peaky_model_dir):
    settings = {
        "online.algorithm": "online_dpo",
        "online.rewards": "length",
        "online.length_target": 1000,  # every completion scores 0
        "train.max_steps": 1,
    }
    out = train_online(recipe(tmp_path, peaky_model_dir, **settings))
    record = read_metrics(out / "metrics.jsonl")[0]
    assert (record["pairs"], record["ties"]) == (0, 2) and "loss" not in record
    start, end = (
        load_file(peaky_model_dir / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    for name in start:
        torch.testing.assert_close(start[name], end[name], rtol=0, atol=0)


def test_epochs_count_whole_steps_and_too_few_prompts_are_named(tmp_path, peaky_model_dir):
    from alignkit.errors import AlignkitError
    from alignkit.train.online_setup import online_steps

    r = recipe(tmp_path, peaky_model_dir, **{"train.max_steps": 0, "train.epochs": 2})
    assert online_steps(r, 9) == 8  # 4 whole steps of 2 prompts per epoch, the 9th dropped
    with pytest.raises(AlignkitError, match="Only 1 prompts: fewer than one step of 2"):
        online_steps(r, 1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"online.num_generations": 1}, "online.num_generations must be at least 2"),
        ({"online.temperature": 0}, "online.temperature must be above 0"),
        ({"online.algorithm": "online_dpo", "pref.loss": "kto"}, "online_dpo trains on"),
        ({"online.use_vllm": True}, "vLLM is not available"),
        ({"train.eval_fraction": 0.1}, "data.eval_sources"),
    ],
)
def test_settings_that_cannot_run_are_refused_before_any_work(tmp_path, settings, message):
    from alignkit.errors import AlignkitError

    r = recipe(tmp_path, tmp_path / "no-model-needed", **settings)
    with pytest.raises(AlignkitError, match=message):
        train_online(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("algorithm", ["grpo", "online_dpo"])
def test_accumulation_leaves_the_update_unchanged(tmp_path, peaky_model_dir, algorithm):
    """Two prompts per step as one micro-batch of 2 or as 2 accumulated micro-batches of 1:
    the same samples and normaliser, so the same gradient (its norm, logged before
    clipping) and weights after a step. The Accelerator divides by its accumulation count;
    the update must not (Adam's first step hides a scale, the gradient norm does not)."""
    runs = {
        name: train_online(
            recipe(
                tmp_path / name,
                peaky_model_dir,
                **{
                    "online.algorithm": algorithm,
                    "online.loss_type": "dr_grpo",
                    "train.max_steps": 1,
                    "train.micro_batch_size": micro,
                    "train.gradient_accumulation_steps": accum,
                    "train.max_grad_norm": 1e6,  # logs the norm, clips nothing
                },
            )
        )
        for name, micro, accum in (("one", 2, 1), ("two", 1, 2))
    }
    norms = [read_metrics(runs[n] / "metrics.jsonl")[0]["grad_norm"] for n in ("one", "two")]
    assert norms[0] > 0 and math.isclose(norms[1], norms[0], rel_tol=1e-4), norms
    one, two = (load_file(runs[n] / "model.safetensors") for n in ("one", "two"))
    base = load_file(peaky_model_dir / "model.safetensors")
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-4
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
