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
