"""summary.md for an `alignkit run`: each stage's wall time and key figures, the
benchmark table and links to the plots, read from what the stages wrote."""

from __future__ import annotations

from pathlib import Path

from alignkit import rundir
from alignkit.workflow.plan import TRAINING, Workflow
from alignkit.workflow.state import read_state

PREF_FIGURES = (
    ("eval_rewards/accuracies", "eval reward accuracy"),
    ("eval_rewards/margins", "eval margin"),
)


def before_after(records: list[dict[str, float]], key: str) -> str | None:
    values = rundir.metric_values(records, key)
    if len(values) < 2:
        return None
    return f"{values[0]:.3f} → {values[-1]:.3f}"


def training_figures(kind: str, out: Path) -> str:
    records = rundir.read_metrics(out / rundir.METRICS)
    parts = []
    if (loss := rundir.last_value(records, "loss")) is not None:
        parts.append(f"final loss {loss:.4f}")
    if kind == "sft" and (eval_loss := rundir.last_value(records, "eval_loss")) is not None:
        parts.append(f"eval loss {eval_loss:.4f}")
    for key, name in PREF_FIGURES if kind == "pref" else ():
        if change := before_after(records, key):
            parts.append(f"{name} {change}")
    return ", ".join(parts) or "no metrics"


def merged_dtype(out: Path) -> str:
    info = out / rundir.MERGE_INFO
    if not info.is_file():
        return ""
    return f"merged ({str(rundir.read_json(info).get('dtype', '?')).removeprefix('torch.')})"


def stage_figures(kind: str, out: Path) -> str:
    """The figures a reader wants first from one stage's output."""
    if kind in TRAINING:
        return training_figures(kind, out)
    if kind == "merge":
        return merged_dtype(out)
    if kind == "eval":
        return f"[{rundir.TABLE}]({out.name}/{rundir.TABLE}), [{rundir.CHART}]({out.name}/{rundir.CHART})"
    if kind == "export":
        return ", ".join(f"[{p.name}]({out.name}/{p.name})" for p in sorted(out.glob("*.gguf")))
    if kind == "push":
        info = out / rundir.PUSH_INFO
        return rundir.read_json(info)["url"] if info.is_file() else "skipped (no Hub token)"
    return f"[{rundir.CARD}]({out.name}/{rundir.CARD})"


def wall_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_summary(workflow: Workflow, run_dir: Path) -> Path:
    """Write run_dir/summary.md from the stages' saved outputs and state."""
    lines = [
        f"# {workflow.name}: run summary",
        "",
        f"Base model: `{workflow.base_model}`",
        "",
        "| stage | kind | status | wall time | figures |",
        "|---|---|---|---:|---|",
    ]
    plots, tables = [], []
    for stage in workflow.stages:
        state = read_state(run_dir, stage)
        out = run_dir / stage.id
        figures = stage_figures(stage.kind, out) if state.get("status") == "done" else ""
        status, wall = state.get("status", "not run"), wall_time(state.get("seconds"))
        lines.append(f"| {stage.id} | {stage.kind} | {status} | {wall} | {figures} |")
        if stage.kind in TRAINING and (out / rundir.CURVES).is_file():
            plots.append(f"![{stage.id} training curves]({stage.id}/{rundir.CURVES})")
        if (out / rundir.TABLE).is_file():
            tables.append(
                (out / rundir.TABLE).read_text(encoding="utf-8").split("\n", 2)[-1].strip()
            )
            plots.append(f"![{stage.id} benchmarks]({stage.id}/{rundir.CHART})")
    for table in tables:
        lines += ["", "## Benchmarks", "", table]
    if plots:
        lines += ["", "## Plots", "", *plots]
    return rundir.write_text(run_dir / rundir.SUMMARY, "\n".join(lines) + "\n")
