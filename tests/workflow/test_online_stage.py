"""The `online` stage of `alignkit run`: planned, validated, run, merged and carded."""

from __future__ import annotations

import pytest
import yaml
from support import write_jsonl

from alignkit.errors import AlignkitError
from alignkit.rundir import read_metrics
from alignkit.workflow import load_workflow, run_workflow, validate


def write_recipe(tmp_path, model_dir, stages):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {i}."} for i in range(4)])
    recipe = {
        "name": "tiny-online",
        "model": {"name_or_path": str(model_dir), "adapter": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"sources": [str(prompts)], "max_length": 64},
        "train": {"micro_batch_size": 2, "learning_rate": 1e-2, "max_steps": 2},
        "online": {"num_generations": 2, "max_completion_length": 4, "rewards": ["length"]},
        "stages": stages,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_online_stage_runs_then_merges_and_cards(tmp_path, peaky_model_dir):
    stages = [{"stage": "online"}, {"stage": "merge", "id": "final"}, {"stage": "card"}]
    path = write_recipe(tmp_path, peaky_model_dir, stages)
    workflow = load_workflow(path)
    notes = validate(workflow)
    assert "online: 4 prompts" in notes
    said: list[str] = []
    run_workflow(workflow, tmp_path / "run", say=said.append)
    records = read_metrics(tmp_path / "run" / "online" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and "rewards/length/mean" in records[0]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    card = (tmp_path / "run" / "card" / "README.md").read_text()
    assert "on-policy GRPO (k=2; reward length)" in card


def test_online_after_an_adapter_needs_a_merge(tmp_path, peaky_model_dir):
    path = write_recipe(tmp_path, peaky_model_dir, [{"stage": "online"}, {"stage": "online"}])
    with pytest.raises(AlignkitError, match=r"\(online\) would train on 'online', a LoRA adapter"):
        load_workflow(path)
