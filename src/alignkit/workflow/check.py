"""`alignkit run --dry-run`: the plan, and every check that can run before any work.

Recipe rules come from `config.check`, data checks from `data.sources`, model checks
from `models`; this module only decides which apply to which stage.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from alignkit.config.check import check
from alignkit.errors import AlignkitError
from alignkit.workflow.plan import TRAINING, PlannedStage, Workflow, is_adapter
from alignkit.workflow.state import assign_fingerprints, decide, read_state, stage_config

DATA_KINDS = {"sft": ("sft",), "pref": ("pair", "feedback")}


def describe(workflow: Workflow, run_dir: Path) -> str:
    """The plan: each stage's input, output and resolved config."""
    assign_fingerprints(workflow)
    lines = [f"run {workflow.name} in {run_dir} (base model: {workflow.base_model})"]
    for stage in workflow.stages:
        action = decide(read_state(run_dir, stage), run_dir, stage, False)
        models = stage.settings.get("models", [])
        source = ", ".join(models) if stage.kind == "eval" else stage.input
        would = "would skip" if action == "skip" else f"would {action}"
        lines.append(
            f"\n== {stage.id} ({stage.kind}) <- {source or 'earlier stages'} -> "
            f"{run_dir / stage.id} [{would}]"
        )
        config = stage_config(stage)
        if config["config"]:
            lines.append(yaml.safe_dump(config["config"], sort_keys=False).rstrip())
        if stage.settings:
            lines.append(yaml.safe_dump(stage.settings, sort_keys=False).rstrip())
    return "\n".join(lines)


def check_data(stage: PlannedStage, hub: bool) -> list[str]:
    """Each data source of a training stage exists and holds the stage's kind of data."""
    from alignkit.data.sources import check_source

    data = stage.recipe.data
    if stage.kind == "online":
        from alignkit.data.prompts import load_prompts

        prompts, skipped = load_prompts(data.sources)
        return [
            f"{stage.id}: {len(prompts)} prompts"
            + (f", skipped {dict(skipped)}" if skipped else "")
        ]
    who = f"Stage '{stage.id}' ({stage.kind})"
    kinds = DATA_KINDS[stage.kind]
    return [
        f"{stage.id}: {check_source(source, kinds, hub, who)}"
        for source in data.sources + data.eval_sources
    ]


def check_base_model(workflow: Workflow, hub: bool) -> str:
    from alignkit.models import check_model

    targets = {
        tuple(s.recipe.lora.target_modules)
        for s in workflow.stages
        if is_adapter(s) and s.recipe.lora.target_modules != ["all-linear"]
    }
    return check_model(workflow.base_model, [list(t) for t in targets], hub)


def check_eval_data(stage: PlannedStage, hub: bool) -> list[str]:
    """Offline, every benchmark needs a shipped copy; online its absence is only a note."""
    from alignkit.eval.tasks import check_offline, parse_tasks

    benchmarks = parse_tasks(stage.recipe.eval.tasks)
    if stage.recipe.eval.offline:
        check_offline(benchmarks)
    elif not hub:
        try:
            check_offline(benchmarks)
        except AlignkitError as exc:
            return [f"{stage.id}: hub unreachable now; at run time: {exc}"]
    return []


def validate(workflow: Workflow) -> list[str]:
    """Checks a dry run makes beyond the schema: recipe rules, data, model, LoRA targets."""
    from alignkit.eval.tasks import hub_reachable

    hub = hub_reachable()
    notes = [check_base_model(workflow, hub)]
    for stage in workflow.stages:
        check(stage.recipe, stage.kind)
        if stage.kind in TRAINING:
            notes += check_data(stage, hub)
        if stage.kind == "eval":
            notes += check_eval_data(stage, hub)
    return notes


def launch_world() -> tuple[int, bool]:
    """(processes, whether this is the main one) as `accelerate launch` or `torchrun` set
    them in the environment; (1, True) when started plainly."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0") == "0"


def stage_rows(stage: PlannedStage) -> int | None:
    """Training rows of a stage whose data are local files (before tokenization drops
    any), less the held-out eval fraction; None when a source is on the hub."""
    from alignkit.data.sources import is_local, load_source

    data, cfg = stage.recipe.data, stage.recipe.train
    if not all(is_local(s) for s in data.sources):
        return None
    rows = sum(load_source(s)[1].used for s in data.sources)
    if not data.eval_sources and cfg.eval_fraction > 0:
        rows -= max(1, round(rows * cfg.eval_fraction))
    return rows


def batch_plan(stage: PlannedStage, world: int) -> str:
    """How a training stage splits its batches over `world` processes, and its steps."""
    from alignkit.train.loop import micro_batches_per_epoch, total_steps

    cfg = stage.recipe.train
    per_step = cfg.micro_batch_size * world * cfg.gradient_accumulation_steps
    line = (
        f"{stage.id}: {world} process{'es' if world > 1 else ''} x {cfg.micro_batch_size} rows "
        f"per device x {cfg.gradient_accumulation_steps} accumulated = global batch {per_step}"
    )
    if cfg.max_steps > 0:
        return f"{line}; {cfg.max_steps} steps (train.max_steps)"
    rows = stage_rows(stage)
    if rows is None:
        return f"{line}; steps: from the hub data's size at run time"
    if cfg.packing:
        return f"{line}; {rows} rows before packing: steps depend on the packed rows"
    if micro_batches_per_epoch(rows, cfg, world) == 0:
        return f"{line}; {rows} rows: fewer than one global micro-batch, the stage would stop"
    steps = total_steps(rows, cfg, world)
    return f"{line}; {rows} rows, at most {steps} steps ({cfg.epochs} epoch(s))"


def batch_plans(workflow: Workflow, world: int) -> list[str]:
    return [batch_plan(s, world) for s in workflow.stages if s.kind in TRAINING]
