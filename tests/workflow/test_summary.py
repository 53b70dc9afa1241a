"""summary.md: per benchmark, whether the change from the first model is beyond twice
the combined standard error."""

from __future__ import annotations

import yaml

from alignkit import rundir
from alignkit.eval.report import write_comparison
from alignkit.workflow import load_workflow
from alignkit.workflow.plan import eval_results
from alignkit.workflow.summary import write_summary


def figure(value: float, stderr: float) -> dict:
    return {"label": "x", "metric": "acc", "value": value, "stderr": stderr, "items": 100}


def test_summary_says_which_changes_are_beyond_two_standard_errors(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "model": {"name_or_path": "org/base-model", "adapter": "lora"},
                "stages": [
                    {"stage": "sft", "data": {"sources": ["d.jsonl"]}},
                    {"stage": "merge", "id": "final"},
                    {"stage": "eval", "models": ["base", "final"]},
                ],
            }
        )
    )
    workflow, run_dir = load_workflow(recipe), tmp_path / "run"
    # ARC: 30.0 -> 50.0 (+20), combined SE sqrt(2^2 + 2^2) = 2.8: beyond 2 SE (5.7)
    # GSM8K: 30.0 -> 40.0 (+10), combined SE sqrt(10^2 + 10^2) = 14.1: within 2 SE (28.3)
    figures = {"base-model": (0.3, 0.3), "final": (0.5, 0.4)}
    results = []
    for path in eval_results(workflow.stages[-1], run_dir, workflow):
        arc, gsm = figures[path.parent.name]
        summary = {"arc": {**figure(arc, 0.02), "label": "ARC"}}
        summary["gsm8k"] = {**figure(gsm, 0.1), "label": "GSM8K"}
        results.append({"model": path.parent.name, "limit": None, "summary": summary})
        rundir.write_json(path, results[-1])
    write_comparison(results, run_dir / "eval")
    text = write_summary(workflow, run_dir).read_text()
    assert "| benchmark | base-model → final |" in text
    assert "| ARC | +20.0 ± 2.8: **beyond 2 SE** |" in text
    assert "| GSM8K | +10.0 ± 14.1: within 2 SE |" in text
    assert "| ARC | 30.0 ± 2.0 | **50.0** ± 2.0 |" in text  # the benchmark table
