"""`alignkit run`: stages in order, skipping, invalidation, resume, validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import write_jsonl

import alignkit.train.loop as loop
from alignkit.errors import AlignkitError
from alignkit.rundir import read_metrics
from alignkit.workflow import load_workflow, run_workflow

SFT_ROWS = [
    {"instruction": f"Name colour {i}.", "input": "", "output": f"Colour {i} is blue."}
    for i in range(8)
]
PAIRS = [
    {
        "prompt": f"Question {i}: name a colour.",
        "chosen": f"Blue {i}.",
        "rejected": f"No idea at all {i}.",
    }
    for i in range(8)
]


def write_recipe(tmp_path, model_dir, with_eval: bool = False, **changes) -> str:
    sft = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    recipe = {
        "name": "tiny",
        "model": {"name_or_path": str(model_dir), "adapter": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"max_length": 64},
        "train": {"micro_batch_size": 2, "learning_rate": 1e-2, "max_steps": 4, "save_steps": 2},
        "stages": [
            {"stage": "sft", "data": {"sources": [str(sft)]}},
            {"stage": "merge", "id": "sft-merged"},
            {
                "stage": "pref",
                "data": {"sources": [str(pairs)], "eval_sources": [str(pairs)]},
                "train": {"eval_on_start": True},
                "pref": {"loss": ["apo_zero"], "beta": changes.get("beta", 0.1)},
            },
            {"stage": "merge", "id": "final"},
            *(
                [
                    {
                        "stage": "eval",
                        "models": ["base", "final"],
                        "eval": {
                            "tasks": ["arc_easy"],
                            "limit": 2,
                            "num_fewshot": "0",
                            "offline": True,
                        },
                    }
                ]
                if with_eval
                else []
            ),
            {"stage": "card", "name": "tiny-demo"},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run(path, run_dir, overrides=None, **kwargs):
    said: list[str] = []
    run_workflow(load_workflow(path, overrides), run_dir, say=said.append, **kwargs)
    return "\n".join(said)


def test_unchanged_stages_skip_and_a_change_reruns_from_there(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, with_eval=True)
    run_dir = tmp_path / "run"
    first = run(path, run_dir)
    for stage in ("sft", "sft-merged", "pref", "final", "eval", "card"):
        assert f"== {stage} (" in first and "running" in first
    assert (run_dir / "final" / "model.safetensors").is_file()
    card = (run_dir / "card" / "README.md").read_text()
    assert "| ARC-Easy (0-shot, acc_norm) †" in card and "tiny-demo" in card
    assert f"| benchmark | {tiny_model_dir.name} | final |" in card  # the eval stage's order
    summary = (run_dir / "summary.md").read_text()
    assert "| pref | pref | done |" in summary
    assert re.search(r"eval reward accuracy [\d.]+ (→ [\d.]+ )?± [\d.]+ \(\d+ pairs\)", summary)
    assert re.search(r"eval_rewards/accuracies [\d.]+ ± [\d.]+ \(\d+ pairs\)", card)
    assert "## Benchmarks" in summary and "sft/training_curves.png" in summary
    pref_weights = (run_dir / "pref" / "adapter_model.safetensors").read_bytes()

    second = run(path, run_dir)
    assert second.count("unchanged and complete, skipped") == 6 and "running" not in second
    assert (run_dir / "pref" / "adapter_model.safetensors").read_bytes() == pref_weights

    third = run(path, run_dir, ["pref.pref.beta=0.2"])
    assert "== sft (sft): unchanged and complete, skipped" in third
    assert "== sft-merged (merge): unchanged and complete, skipped" in third
    for stage in ("pref", "final", "eval", "card"):
        assert f"== {stage} ({'merge' if stage == 'final' else stage}): running" in third
    assert "earlier output moved to" in third
    assert len(list((run_dir / ".previous").iterdir())) == 4  # nothing written is lost
    config = yaml.safe_load((run_dir / "pref" / "config.yaml").read_text())
    assert config["pref"]["beta"] == 0.2

    fourth = run(path, run_dir, ["pref.pref.beta=0.2"], start="card")
    assert "== card: rerun asked for (--from)" in fourth and "== eval (eval)" not in fourth


def test_a_stage_rerun_alone_leaves_the_later_stages_stale(tmp_path, tiny_model_dir, monkeypatch):
    ran: list[str] = []

    def fake_stage(stage, run_dir, workflow, resume, say):
        ran.append(stage.id)
        (run_dir / stage.id).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr("alignkit.workflow.run.run_stage", fake_stage)
    path = write_recipe(tmp_path, tiny_model_dir)
    run(path, tmp_path / "run")
    assert ran == ["sft", "sft-merged", "pref", "final", "card"]
    ran.clear()
    run(path, tmp_path / "run", start="pref", until="pref")
    assert ran == ["pref"]
    ran.clear()
    with pytest.raises(AlignkitError, match="earlier stage 'final' is stale, not done"):
        run(path, tmp_path / "run", start="card")
    again = run(path, tmp_path / "run")  # pref's output changed: what was made from it is stale
    assert ran == ["final", "card"]
    assert "== pref (pref): unchanged and complete, skipped" in again
    assert "== final: stale: 'pref' ran again after it; earlier output moved to" in again
    ran.clear()
    run(path, tmp_path / "run")
    assert ran == []


def test_interrupted_pref_resumes_and_matches_an_uninterrupted_run(
    tmp_path, tiny_model_dir, monkeypatch
):
    path = write_recipe(tmp_path, tiny_model_dir)
    run(path, tmp_path / "full")
    original = loop.save_checkpoint
    calls = {"n": 0}

    def crash_in_pref(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # sft saved at steps 2 and 4; this is pref's first checkpoint
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(loop, "save_checkpoint", crash_in_pref)
    with pytest.raises(KeyboardInterrupt):
        run(path, tmp_path / "cut")
    monkeypatch.setattr(loop, "save_checkpoint", original)
    state = json.loads((tmp_path / "cut" / ".state" / "pref.json").read_text())
    assert state["status"] == "started"
    again = run(path, tmp_path / "cut")
    assert "== sft (sft): unchanged and complete, skipped" in again
    assert "== pref (pref): resuming from its checkpoint" in again
    full = read_metrics(tmp_path / "full" / "pref" / "metrics.jsonl")
    cut = read_metrics(tmp_path / "cut" / "pref" / "metrics.jsonl")
    assert [r["loss"] for r in cut if "loss" in r] == pytest.approx(
        [r["loss"] for r in full if "loss" in r], abs=1e-6
    )
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["stages"].append({"stage": "distill"}), "unknown stage 'distill'"),
        (lambda r: r["stages"][0].update(train={"learning_rat": 1}), "learning_rate"),
        (lambda r: r["stages"].insert(0, {"stage": "merge"}), "needs a LoRA adapter"),
        (lambda r: r["stages"][2].update(input="nowhere"), "no earlier stage produces"),
        (lambda r: r["stages"].pop(1), "Add a `stage: merge` before it"),
        (
            lambda r: r["stages"].insert(4, {"stage": "eval", "models": ["sft-merged", "later"]}),
            "no earlier stage produces",
        ),
        (lambda r: r["stages"][0].update(model={"name_or_path": "x"}), "its input"),
        (lambda r: r["stages"][1].update(models=["base"]), "does not take"),
        (lambda r: r["stages"].append({"stage": "push"}), "needs `repo_id: USER/NAME`"),
        (lambda r: r["stages"].append({"stage": "export", "type": "q4"}), "use one of f32"),
    ],
    ids=[
        "unknown-stage",
        "unknown-key",
        "merge-first",
        "bad-input",
        "pref-on-adapter",
        "eval-unknown-model",
        "stage-model-path",
        "misplaced-key",
        "push-without-repo",
        "export-bad-type",
    ],
)
def test_malformed_recipes_fail_before_any_training(
    tmp_path, tiny_model_dir, edit, message, monkeypatch
):
    path = write_recipe(tmp_path, tiny_model_dir)
    recipe = yaml.safe_load(Path(path).read_text())
    edit(recipe)
    with open(path, "w") as handle:
        yaml.safe_dump(recipe, handle)
    monkeypatch.setattr("alignkit.train.sft.train_sft", lambda *a: pytest.fail("trained"))
    with pytest.raises(AlignkitError, match=message):
        run(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_and_push_stages_ship_the_latest_model(tmp_path, tiny_model_dir, monkeypatch):
    stages = [{"stage": "export", "type": "q8_0"}, {"stage": "push", "repo_id": "me/tiny"}]
    recipe = {"name": "ship", "model": {"name_or_path": str(tiny_model_dir)}, "stages": stages}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    first = run(path, run_dir)
    assert (run_dir / "export" / "model-q8_0.gguf").read_bytes()[:4] == b"GGUF"
    assert "== push: no Hugging Face token configured (hf auth login), push skipped" in first
    assert "| push | push | done | " in (run_dir / "summary.md").read_text()

    pushed = []

    def upload(plan, private, revision):
        pushed.append((plan.repo_id, plan.model_dir, private, revision))
        return "https://huggingface.co/me/tiny/commit/1"

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr("alignkit.push.upload", upload)
    second = run(path, run_dir)
    assert "== export (export): unchanged and complete, skipped" in second
    assert pushed == [("me/tiny", tiny_model_dir, False, None)]
    assert "commit/1" in (run_dir / "summary.md").read_text()
    assert "skipped" in run(path, run_dir) and len(pushed) == 1  # pushed once


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main

    path = write_recipe(tmp_path, tiny_model_dir)
    assert main(["run", path, "--dry-run", "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "== pref (pref) <- sft-merged" in out and "beta: 0.1" in out
    assert "sft.jsonl: alpaca, 8 rows" in out and "recipe is valid" in out
    assert not (tmp_path / "run").exists()


def test_dry_run_checks_data_kind_and_lora_targets(tmp_path, tiny_model_dir):
    from alignkit.workflow import validate

    path = write_recipe(tmp_path, tiny_model_dir)
    recipe = yaml.safe_load(Path(path).read_text())
    recipe["stages"][2]["data"]["sources"] = [str(tmp_path / "sft.jsonl")]
    with open(path, "w") as handle:
        yaml.safe_dump(recipe, handle)
    with pytest.raises(AlignkitError, match="needs pair or feedback data"):
        validate(load_workflow(path))
    recipe["stages"][2]["data"]["sources"] = [str(tmp_path / "pairs.jsonl")]
    recipe["lora"]["target_modules"] = ["q_proj", "qkv_proj"]
    with open(path, "w") as handle:
        yaml.safe_dump(recipe, handle)
    with pytest.raises(AlignkitError, match="qkv_proj"):
        validate(load_workflow(path))
