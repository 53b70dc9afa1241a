"""summary.md for an `alignkit run`: each stage's wall time and key figures, the
benchmark table and links to the plots, read from what the stages wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.eval.report import CHART, TABLE


def last_value(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def before_after(records: list[dict[str, Any]], key: str) -> str | None:
    values = [r[key] for r in records if key in r]
    if len(values) < 2:
        return None
    return f"{values[0]:.3f} → {values[-1]:.3f}"


def stage_figures(kind: str, out: Path) -> str:
    """The figures a reader wants first from one stage's output."""
    from alignkit.train.loop import read_metrics

    if kind in ("sft", "pref"):
        metrics = out / "metrics.jsonl"
        records = read_metrics(metrics) if metrics.is_file() else []
        parts = []
        if (loss := last_value(records, "loss")) is not None:
            parts.append(f"final loss {loss:.4f}")
        if kind == "sft" and (eval_loss := last_value(records, "eval_loss")) is not None:
            parts.append(f"eval loss {eval_loss:.4f}")
        for key, name in (("eval_rewards/accuracies", "eval reward accuracy"),
                          ("eval_rewards/margins", "eval margin")):  # fmt: skip
            if kind == "pref" and (change := before_after(records, key)):
                parts.append(f"{name} {change}")
        return ", ".join(parts) or "no metrics"
    if kind == "merge":
        info = out / "merge_info.json"
        return (
            f"merged ({str(json.loads(info.read_text()).get('dtype', '?')).removeprefix('torch.')})"
            if info.is_file()
            else ""
        )
    if kind == "eval":
        return f"[{TABLE}]({out.name}/{TABLE}), [{CHART}]({out.name}/{CHART})"
    return f"[README.md]({out.name}/README.md)"


def write_summary(workflow: Any, run_dir: Path) -> Path:
    """Write run_dir/summary.md from the stages' saved outputs and state."""
    from alignkit.workflow import read_state

    lines = [f"# {workflow.name}: run summary", "", f"Base model: `{workflow.base_model}`", "",
             "| stage | kind | status | wall time | figures |", "|---|---|---|---:|---|"]  # fmt: skip
    plots, tables = [], []
    for stage in workflow.stages:
        state = read_state(run_dir, stage)
        out = run_dir / stage.id
        seconds = state.get("seconds")
        wall = "–" if seconds is None else (
            f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min")  # fmt: skip
        figures = stage_figures(stage.kind, out) if state.get("status") == "done" else ""
        lines.append(
            f"| {stage.id} | {stage.kind} | {state.get('status', 'not run')} | {wall} | {figures} |"
        )
        if stage.kind in ("sft", "pref") and (out / "training_curves.png").is_file():
            plots.append(f"![{stage.id} training curves]({stage.id}/training_curves.png)")
        if (out / TABLE).is_file():
            tables.append((out / TABLE).read_text(encoding="utf-8").split("\n", 2)[-1].strip())
            plots.append(f"![{stage.id} benchmarks]({stage.id}/{CHART})")
    for table in tables:
        lines += ["", "## Benchmarks", "", table]
    if plots:
        lines += ["", "## Plots", "", *plots]
    path = run_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
