"""`alignkit run`: carry out a planned workflow's stages in order, in one run dir.

Each stage writes to `<run dir>/<id>` between a `started` and a `done` state record;
`workflow.state` decides whether it is skipped, resumed or run again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from alignkit import rundir
from alignkit.console import captured, say
from alignkit.errors import AlignkitError
from alignkit.workflow.plan import (
    BASE,
    MODEL_MAKERS,
    TRAINING,
    PlannedStage,
    Workflow,
    eval_results,
    eval_specs,
    model_path,
)
from alignkit.workflow.state import (
    assign_fingerprints,
    decide,
    mark_stale,
    read_state,
    set_aside,
    stage_config,
    write_state,
)
from alignkit.workflow.summary import write_summary

# what the closing lines point a reader to: (label, stage kinds, file name)
SHOWN = (
    ("card", ("card",), rundir.CARD),
    ("benchmark table", ("eval",), rundir.TABLE),
    ("benchmark chart", ("eval",), rundir.CHART),
    ("training curves", TRAINING, rundir.CURVES),
)


def default_run_dir(workflow: Workflow) -> Path:
    return rundir.default_dir(workflow.name)


def run_training(stage: PlannedStage, run_dir: Path, workflow: Workflow, resume: bool) -> None:
    recipe = stage.recipe
    recipe.model.name_or_path = model_path(run_dir, workflow, stage.input or BASE)
    recipe.train.output_dir, recipe.train.overwrite = str(run_dir / stage.id), True
    recipe.train.resume = "auto" if resume else "no"
    if stage.kind == "sft":
        from alignkit.train.sft import train_sft

        train_sft(recipe)
    elif stage.kind == "online":
        from alignkit.train.online import train_online

        train_online(recipe)
    else:
        from alignkit.train.pref import train_pref

        train_pref(recipe)


def run_stage(
    stage: PlannedStage,
    run_dir: Path,
    workflow: Workflow,
    resume: bool,
    say: Callable[[str], None] = say,
) -> str | None:
    """Carry out one stage into run_dir/<id>; the result line to say, where the stage's
    own function says none (training and eval stages say theirs)."""
    out = run_dir / stage.id
    if stage.kind in TRAINING:
        run_training(stage, run_dir, workflow, resume)
    elif stage.kind == "merge":
        from alignkit.merge import merge_adapter

        merge_adapter(str(run_dir / stage.input), out, stage.settings.get("dtype", "auto"), True)
        return f"merged model written to {out}"
    elif stage.kind == "eval":
        from alignkit.eval.run import evaluate_models

        stage.recipe.eval.output_dir, stage.recipe.eval.overwrite = str(out), True
        evaluate_models(eval_specs(stage, run_dir, workflow), stage.recipe)
    elif stage.kind == "card":
        return f"model card written to {write_card_stage(stage, run_dir, workflow)}"
    else:
        return run_ship_stage(stage, run_dir, workflow, say)
    return None


def run_ship_stage(
    stage: PlannedStage, run_dir: Path, workflow: Workflow, say: Callable[[str], None]
) -> str:
    """Export the input model as GGUF, or push it (skipped, in one line, with no Hub token;
    the card of the latest card stage before it goes up with it). Returns the result line."""
    model = model_path(run_dir, workflow, stage.input or BASE)
    out = run_dir / stage.id
    if stage.kind == "export":
        from alignkit.export import export_gguf

        kind = stage.settings.get("type", "f16")
        path = export_gguf(model, out / rundir.gguf_name(kind), kind, overwrite=True)
        return f"GGUF written to {path}"
    from huggingface_hub import get_token

    from alignkit.push import push

    if get_token() is None:
        return f"== {stage.id}: no Hugging Face token configured (hf auth login), push skipped"
    before = workflow.stages[: workflow.stages.index(stage)]
    cards = [run_dir / s.id / rundir.CARD for s in before if s.kind == "card"]
    repo, private = stage.settings["repo_id"], bool(stage.settings.get("private", False))
    url = push(model, repo, private, card=cards[-1] if cards else None, say=say)
    rundir.write_json(out / rundir.PUSH_INFO, {"repo_id": repo, "private": private, "url": url})
    return f"pushed to {url}"


def write_card_stage(stage: PlannedStage, run_dir: Path, workflow: Workflow) -> Path:
    """The card of the latest model, with every earlier eval stage's results in its order."""
    from alignkit.card import write_card

    before = workflow.stages[: workflow.stages.index(stage)]
    runs = [run_dir / s.id for s in before if s.kind in MODEL_MAKERS]
    results = [
        path for s in before if s.kind == "eval" for path in eval_results(s, run_dir, workflow)
    ]
    out = run_dir / stage.id / rundir.CARD
    return write_card(runs, results, out, stage.settings.get("name") or workflow.name, True)


def select(stages: list[PlannedStage], start: str | None, until: str | None) -> tuple[int, int]:
    ids = [s.id for s in stages]
    for value in (start, until):
        if value is not None and value not in ids:
            raise AlignkitError(f"No stage '{value}' in this recipe; stages: {', '.join(ids)}.")
    first = ids.index(start) if start else 0
    last = ids.index(until) if until else len(ids) - 1
    return first, last


def execute(
    stage: PlannedStage,
    run_dir: Path,
    workflow: Workflow,
    resume: bool,
    carried: float,
    say: Callable[[str], None] = say,
) -> str | None:
    """Run one stage between its `started` and `done` records; `carried` = seconds spent
    by earlier, interrupted attempts. Returns the stage's result line, if it said none."""
    write_state(run_dir, stage, status="started", config=stage_config(stage), seconds=carried)
    started = time.perf_counter()
    result = run_stage(stage, run_dir, workflow, resume, say)
    seconds = round(time.perf_counter() - started + carried, 1)
    write_state(run_dir, stage, status="done", config=stage_config(stage), seconds=seconds)
    return result


def rerun_reason(
    start: str | None, first_of_selection: bool, rerun_from: str | None, state: dict
) -> str:
    if start and first_of_selection:
        return "rerun asked for (--from)"
    if rerun_from:
        return "an earlier stage reran"
    if state.get("status") == "stale":
        return f"stale: {state.get('cause')}"
    return "settings or inputs changed"


def check_done(earlier: list[PlannedStage], run_dir: Path, start: str | None) -> None:
    """--from: the stages before it have finished (their outputs are taken as they are)."""
    for stage in earlier:
        if (status := read_state(run_dir, stage).get("status")) != "done":
            raise AlignkitError(
                f"--from {start}: earlier stage '{stage.id}' is {status or 'not run'}, not "
                f"done. Run it first (--from {stage.id}, or no --from)."
            )


def run_workflow(
    workflow: Workflow,
    run_dir: Path,
    start: str | None = None,
    until: str | None = None,
    say: Callable[[str], None] = say,
) -> Path:
    """Run (or skip, or resume) the stages; write summary.md; return the run dir. Other
    libraries' output goes to the run dir's log.txt (and each stage's own), not the terminal."""
    assign_fingerprints(workflow)
    first, last = select(workflow.stages, start, until)
    rundir.write_text(run_dir / rundir.RECIPE, workflow.path.read_text(encoding="utf-8"))
    check_done(workflow.stages[:first], run_dir, start)
    with captured(run_dir / rundir.LOG):
        run_stages(workflow, run_dir, first=first, last=last, start=start, say=say)
        say_outputs(workflow, run_dir, write_summary(workflow, run_dir), say)
    return run_dir


def run_stages(
    workflow: Workflow,
    run_dir: Path,
    *,
    first: int,
    last: int,
    start: str | None,
    say: Callable[[str], None],
) -> None:
    """Stages first..last in order: each skipped, resumed or run (with those after it)."""
    rerun_from = None
    for index, stage in enumerate(workflow.stages[first : last + 1], start=first):
        forced = rerun_from is not None or (start is not None and index == first)
        state = read_state(run_dir, stage)
        action = decide(state, run_dir, stage, forced)
        if action == "skip":
            say(f"== {stage.id} ({stage.kind}): unchanged and complete, skipped")
            continue
        reason = rerun_reason(start, index == first, rerun_from, state)
        if rerun_from is None:  # what comes after --until was made from the old output
            mark_stale(run_dir, workflow.stages[last + 1 :], f"'{stage.id}' ran again after it")
        rerun_from = rerun_from or stage.id
        if action == "run" and (moved := set_aside(run_dir, stage)):
            say(f"== {stage.id}: {reason}; earlier output moved to {moved}")
        resume = action == "resume"
        doing = "resuming from its checkpoint" if resume else "running"
        say(f"== {stage.id} ({stage.kind}): {doing}")
        carried = state.get("seconds", 0.0) if resume else 0.0
        if result := execute(stage, run_dir, workflow, resume, carried, say):
            say(result)


def say_outputs(
    workflow: Workflow, run_dir: Path, summary: Path, say: Callable[[str], None]
) -> None:
    """Where the summary, card, tables and plots of the run are."""
    say(f"\nsummary: {summary}")
    for label, kinds, name in SHOWN:
        found = [
            str(run_dir / st.id / name)
            for st in workflow.stages
            if st.kind in kinds and (run_dir / st.id / name).is_file()
        ]
        if found:
            say(f"{label}: {', '.join(found)}")
