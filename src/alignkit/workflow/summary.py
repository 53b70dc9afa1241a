"""summary.md for an `alignkit run`: each stage's wall time and key figures, the
benchmark table, whether each benchmark's change between the models is beyond twice
its standard error, and links to the plots, read from what the stages wrote."""

from __future__ import annotations

from pathlib import Path

from alignkit import rundir
from alignkit.eval.tables import change_table
from alignkit.workflow.plan import TRAINING, PlannedStage, Workflow, eval_results
from alignkit.workflow.state import read_state


def merged_dtype(out: Path) -> str:
    info = out / rundir.MERGE_INFO
    if not info.is_file():
        return ""
    return f"merged ({str(rundir.read_json(info).get('dtype', '?')).removeprefix('torch.')})"


def stage_figures(kind: str, out: Path) -> str:
    """The figures a reader wants first from one stage's output."""
    if kind in TRAINING:
        return rundir.training_figures(rundir.read_metrics(out / rundir.METRICS))
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


CHANGES_NOTE = (
    "Change in points from the first model, ± the combined standard error "
    "sqrt(se_a² + se_b²). Beyond 2 SE: larger than twice that, unlikely to be sampling "
    "noise alone (about 95%); within 2 SE: these items cannot tell the two models apart."
)


def changes(stage: PlannedStage, run_dir: Path, workflow: Workflow) -> list[str]:
    """An eval stage's section on what changed between its models, if it has two."""
    files = eval_results(stage, run_dir, workflow)
    if len(files) < 2 or not all(f.is_file() for f in files):
        return []
    table = change_table(rundir.load_results(files))
    return ["", f"## Changes between models ({stage.id})", "", table, "", CHANGES_NOTE]


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
            table = (out / rundir.TABLE).read_text(encoding="utf-8").split("\n", 2)[-1].strip()
            tables += ["", "## Benchmarks", "", table, *changes(stage, run_dir, workflow)]
            plots.append(f"![{stage.id} benchmarks]({stage.id}/{rundir.CHART})")
    lines += tables
    if plots:
        lines += ["", "## Plots", "", *plots]
    return rundir.write_text(run_dir / rundir.SUMMARY, "\n".join(lines) + "\n")
