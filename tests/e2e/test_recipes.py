"""Every shipped recipe (recipes/**, seeds included) parses against the schema and passes
the checks of `alignkit run --dry-run`: local data exists and holds the right kind, stage
inputs exist, losses and eval tasks are valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignkit.config import load_recipe
from alignkit.config.check import check
from alignkit.rundir import read_metrics
from alignkit.train.pref import train_pref
from alignkit.workflow import load_workflow, validate
from alignkit.workflow.check import batch_plans
from alignkit.workflow.plan import TRAINING

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(ROOT.joinpath("recipes").rglob("*.yaml"))


def test_recipe_count():
    assert len(RECIPES) == 12  # update when recipes are added, so none is silently skipped
    assert len([p for p in RECIPES if p.parent.name == "seeds"]) == 7


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths are relative to the project root
    if "stages" in yaml.safe_load(path.read_text()):
        workflow = load_workflow(path)
        notes = validate(workflow)
        assert notes and all(s.fingerprint == "" for s in workflow.stages)
        plans = batch_plans(workflow, world=8)  # what --dry-run prints under 8 processes
        assert len(plans) == len([s for s in workflow.stages if s.kind in TRAINING])
        assert all("8 processes x" in line and "steps" in line for line in plans)
        return
    loaded = load_recipe(path)
    for source in loaded.data.sources + loaded.data.eval_sources:
        assert ROOT.joinpath(source.path).is_file(), source.path
    check(loaded, "online" if "online" in yaml.safe_load(path.read_text()) else "pref")


@pytest.mark.slow
def test_apo_recipe_runs_on_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's data paths are relative to the project root
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))  # this run's own reference
    overrides = [
        ("train.output_dir", str(tmp_path / "out")),
        ("train.max_steps", "1"),
        ("train.gradient_accumulation_steps", "1"),
        ("train.micro_batch_size", "2"),
    ]
    recipe = load_recipe(ROOT / "recipes" / "smollm2-apo-cpu.yaml", overrides)
    recipe.data.eval_sources[0].split = "train[64:66]"
    records = read_metrics(train_pref(recipe) / "metrics.jsonl")
    assert records[0]["step"] == 0 and records[0]["eval_rewards/margins"] == 0
    assert records[-1]["step"] == 1 and "eval_rewards/accuracies" in records[-1]
