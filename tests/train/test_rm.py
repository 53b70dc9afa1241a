"""`alignkit rm`: a Bradley-Terry reward model overfits a few pairs, saves in the HF
sequence-classification format, and scores files and online completions."""

from __future__ import annotations

import json

import pytest
from support import write_jsonl

from alignkit.cli import main
from alignkit.config import OnlineConfig, load_recipe
from alignkit.errors import AlignkitError
from alignkit.rewards import build_rewards
from alignkit.rewards.base import Prompt
from alignkit.train.rm import train_rm

PAIRS = [
    {
        "prompt": f"Question {i}: name a colour.",
        "chosen": f"Blue {i}.",
        "rejected": f"No idea at all {i}.",
    }
    for i in range(10)
]


def recipe(tmp_path, model_dir, **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    overrides = {
        "model.name_or_path": str(model_dir),
        "data.sources": str(data),
        "data.max_length": 64,
        "train.output_dir": str(tmp_path / "rm"),
        "train.micro_batch_size": 4,
        "train.learning_rate": 1e-2,
        "train.scheduler": "constant",
        "train.max_steps": 25,
        "train.gradient_accumulation_steps": 1,
        "rm.eval_fraction": 0.2,
        **settings,
    }
    return load_recipe(None, [(k, str(v)) for k, v in overrides.items()])


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_reward_model_overfits_and_scores_like_it_trained(tmp_path, tiny_model_dir, adapter):
    out = train_rm(recipe(tmp_path, tiny_model_dir, **{"model.adapter": adapter}))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval_accuracy" in records[0]
    assert records[-1]["accuracy"] == 1.0 and records[-1]["loss"] < 0.1
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"
    ]
    reward = build_rewards(OnlineConfig(rewards=[f"model:{out}"]))[0]
    prompt = Prompt([{"role": "user", "content": PAIRS[0]["prompt"]}])
    chosen, rejected = reward.fn([prompt, prompt], [PAIRS[0]["chosen"], PAIRS[0]["rejected"]])
    assert chosen > rejected


def test_rm_score_writes_a_scored_copy_and_refuses_to_overwrite(tmp_path, tiny_model_dir, capsys):
    out = train_rm(recipe(tmp_path, tiny_model_dir, **{"train.max_steps": 2}))
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS[:3]]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert main(["rm", "score", str(out), str(data)]) == 0
    scored = [json.loads(x) for x in (tmp_path / "rows.scored.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in scored] == [r["prompt"] for r in rows]
    assert all(isinstance(r["score"], float) for r in scored)
    assert main(["rm", "score", str(out), str(data)]) == 2
    assert "exists" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(AlignkitError, match=r"bad.jsonl: line 1: .*completion"):
        from alignkit.train.rm import score_file

        score_file(str(out), bad, load_recipe(None, []))


def test_accumulated_micro_batches_train_like_one_batch(tmp_path, tiny_model_dir):
    one = train_rm(recipe(tmp_path / "one", tiny_model_dir, **{"train.max_steps": 2}))
    two = recipe(tmp_path / "two", tiny_model_dir, **{"train.max_steps": 2})
    two.train.micro_batch_size, two.train.gradient_accumulation_steps = 2, 2
    two = train_rm(two)
    losses = [
        [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]
        for out in (one, two)
    ]
    # step 2's loss is computed with step 1's weights, so it checks the update too (the
    # weights themselves differ in float rounding that Adam magnifies where g ~ 0)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_sft_data_is_refused_naming_the_file_and_option(tmp_path, tiny_model_dir):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    r = recipe(tmp_path, tiny_model_dir, **{"data.sources": str(sft)})
    with pytest.raises(
        AlignkitError, match=r"pair data; .*sft\.jsonl holds sft data\. Check data\.sources"
    ):
        train_rm(r)
    assert not (tmp_path / "rm").exists()  # refused before anything was written
