"""A workflow recipe's stages: parsed, resolved and linked before any work.

A workflow recipe is a normal recipe (its sections are every stage's defaults) plus
`stages`, a list of mappings with `stage` (the kind), an optional `id`, an optional
`input` (the id of an earlier stage whose model this one takes; default the latest
model), section overrides, and per-kind keys: merge `dtype`, eval `models`, card
`name`, push `repo_id` and `private`, export `type`. Each stage's recipe is the public
layering of `config.resolve_recipe`: the defaults, the shared sections, the stage's own
sections, then the overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import Recipe, check_keys, parse_overrides, read_yaml, resolve_recipe
from alignkit.errors import AlignkitError

KINDS = ("sft", "pref", "online", "merge", "eval", "card", "push", "export")
TRAINING = ("sft", "pref", "online")
MODEL_MAKERS = ("sft", "pref", "online", "merge")
STAGE_KEYS = {"stage", "id", "input", "dtype", "models", "name", "repo_id", "private", "type"}
KIND_KEYS = {
    "merge": {"dtype"},
    "eval": {"models"},
    "card": {"name"},
    "push": {"repo_id", "private"},
    "export": {"type"},
}
BASE = "base"


@dataclass
class PlannedStage:
    """One planned stage: its resolved recipe, where its model comes from, its settings."""

    id: str
    kind: str
    recipe: Recipe
    input: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


@dataclass
class Workflow:
    name: str
    path: Path
    base_model: str
    stages: list[PlannedStage]


def stage_ids(raw: list[dict[str, Any]]) -> list[str]:
    """Explicit ids, else the kind (numbered from the second stage of a kind on)."""
    ids: list[str] = []
    for item in raw:
        given = item.get("id")
        if given is None:
            same = sum(1 for other in raw[: len(ids)] if other.get("stage") == item.get("stage"))
            given = item["stage"] if same == 0 else f"{item['stage']}-{same + 1}"
        if str(given) in ids or str(given) == BASE:
            raise AlignkitError(
                f"Stage id '{given}' is used twice (or is reserved); give unique ids."
            )
        ids.append(str(given))
    return ids


def check_stage_item(item: Any, index: int, where: str) -> None:
    if not isinstance(item, dict) or "stage" not in item:
        raise AlignkitError(f"{where}: stages[{index}] must be a mapping with a `stage` kind.")
    if item["stage"] not in KINDS:
        raise AlignkitError(
            f"{where}: stages[{index}] has unknown stage '{item['stage']}'; use one of "
            f"{', '.join(KINDS)}."
        )
    sections = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(item) - STAGE_KEYS - sections, key=str)
    if unknown:
        known = sorted(STAGE_KEYS | sections)
        close = difflib.get_close_matches(str(unknown[0]), known, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise AlignkitError(
            f"{where}: stages[{index}] has unknown key '{unknown[0]}'.{hint} A stage takes "
            f"{', '.join(sorted(STAGE_KEYS))} and recipe sections ({', '.join(sorted(sections))})."
        )
    extra = set(item) & STAGE_KEYS - {"stage", "id", "input"} - KIND_KEYS.get(item["stage"], set())
    if extra:
        raise AlignkitError(
            f"{where}: stages[{index}] ({item['stage']}) does not take {sorted(extra)}."
        )
    check_ship_settings(item, index, where)
    if isinstance(item.get("model"), dict) and "name_or_path" in item["model"]:
        raise AlignkitError(
            f"{where}: stages[{index}] sets model.name_or_path; a stage's model is its input "
            "(`input: <stage id>`), the recipe's model.name_or_path is the base."
        )


def check_ship_settings(item: dict[str, Any], index: int, where: str) -> None:
    """A push stage names its repository; an export stage's type is one GGUF can take."""
    from alignkit.export import GGUF_TYPES

    if item["stage"] == "push" and not isinstance(item.get("repo_id"), str):
        raise AlignkitError(
            f"{where}: stages[{index}] (push) needs `repo_id: USER/NAME`, the Hub repository."
        )
    if item["stage"] == "export" and item.get("type", "f16") not in GGUF_TYPES:
        raise AlignkitError(
            f"{where}: stages[{index}] (export) has type '{item['type']}'; use one of "
            f"{', '.join(GGUF_TYPES)}."
        )


def split_overrides(tokens: list[str], ids: list[str]) -> tuple[list, dict[str, list]]:
    """`key=value` overrides for every stage, and `<stage id>.key=value` ones per stage."""
    common, per_stage = [], {i: [] for i in ids}
    for key, value in parse_overrides(tokens):
        head, _, rest = key.partition(".")
        if head in per_stage and rest:
            per_stage[head].append((rest, value))
        else:
            common.append((key, value))
    return common, per_stage


def plan_stage(
    sid: str, item: dict[str, Any], shared: dict[str, Any], overrides: list, where: str
) -> PlannedStage:
    """One stage: its recipe resolved from the shared and its own sections, its settings."""
    sections = {k: v for k, v in item.items() if k not in STAGE_KEYS}
    at = f" in '{where}', stage '{sid}'"
    recipe = resolve_recipe([shared, sections], overrides, where=at)
    settings = {k: item[k] for k in KIND_KEYS.get(item["stage"], ()) if k in item}
    return PlannedStage(sid, item["stage"], recipe, item.get("input"), settings)


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> Workflow:
    """Parse and resolve a workflow recipe; every schema error is raised before any work."""
    where = str(path)
    data = read_yaml(path)
    raw = data.pop("stages", None)
    name = str(data.pop("name", Path(path).stem))
    data.pop("description", None)
    if not isinstance(raw, list) or not raw:
        raise AlignkitError(f"{where}: a workflow recipe needs a non-empty `stages` list.")
    for i, item in enumerate(raw):
        check_stage_item(item, i, where)
    check_keys(data, Recipe, where=f" in '{where}'")
    ids = stage_ids(raw)
    common, per_stage = split_overrides(overrides or [], ids)
    base = resolve_recipe([data], common, where=f" in '{where}'").model.name_or_path
    stages = [
        plan_stage(sid, item, data, common + per_stage[sid], where)
        for sid, item in zip(ids, raw, strict=True)
    ]
    workflow = Workflow(name, Path(path), base, stages)
    link_inputs(workflow)
    return workflow


def is_adapter(stage: PlannedStage) -> bool:
    return stage.kind in TRAINING and stage.recipe.model.adapter in ("lora", "qlora")


def check_input(stage: PlannedStage, wanted: str, made: dict[str, PlannedStage]) -> None:
    """The stage's input exists and is the kind of model the stage takes."""
    if stage.input and stage.input != BASE and stage.input not in made:
        raise AlignkitError(
            f"Stage '{stage.id}' takes input '{stage.input}', which no earlier stage "
            f"produces (models so far: {', '.join([BASE, *made])})."
        )
    if stage.kind == "merge" and (wanted == BASE or not is_adapter(made[wanted])):
        raise AlignkitError(
            f"Stage '{stage.id}' (merge) needs a LoRA adapter as input; "
            f"'{wanted}' is {'the base model' if wanted == BASE else 'full weights'}. "
            "Put it after an sft or pref stage with model.adapter: lora."
        )
    if stage.kind in ("pref", "online") and wanted != BASE and is_adapter(made[wanted]):
        raise AlignkitError(
            f"Stage '{stage.id}' ({stage.kind}) would train on '{wanted}', a LoRA adapter. Add a "
            "`stage: merge` before it, so preference training starts from merged weights."
        )
    if stage.kind == "card" and not any(s.kind in TRAINING for s in made.values()):
        raise AlignkitError(f"Stage '{stage.id}' (card) needs a training stage before it.")


def eval_models(stage: PlannedStage, latest: str, made: dict[str, PlannedStage]) -> list[str]:
    """The stage ids an eval stage evaluates (`final` = the latest model)."""
    models = stage.settings.get("models") or [BASE, latest]
    unknown = [m for m in models if m not in (BASE, "final") and m not in made]
    if unknown:
        raise AlignkitError(
            f"Stage '{stage.id}' (eval) lists models {unknown} that no earlier stage "
            f"produces (models so far: {', '.join([BASE, *made])})."
        )
    return [latest if m == "final" else m for m in models]


def link_inputs(workflow: Workflow) -> None:
    """Give each stage its input; an input no earlier stage produces is an error."""
    made: dict[str, PlannedStage] = {}
    latest = BASE
    for stage in workflow.stages:
        wanted = stage.input or (None if stage.kind == "card" else latest)
        check_input(stage, wanted, made)
        if stage.kind == "eval":
            stage.settings["models"] = eval_models(stage, latest, made)
        stage.input = wanted
        if stage.kind in MODEL_MAKERS:
            made[stage.id] = stage
            latest = stage.id


# ---------------------------------------------------------------- in a run dir


def model_path(run_dir: Path, workflow: Workflow, ref: str) -> str:
    """The model a stage id (or `base`) names: the base model, or that stage's output."""
    return workflow.base_model if ref == BASE else str(run_dir / ref)


def eval_specs(stage: PlannedStage, run_dir: Path, workflow: Workflow) -> list[str]:
    """The model specs an eval stage evaluates, in its order."""
    return [model_path(run_dir, workflow, m) for m in stage.settings["models"]]


def eval_results(stage: PlannedStage, run_dir: Path, workflow: Workflow) -> list[Path]:
    """An eval stage's results files, one per model, in its order."""
    from alignkit.eval.run import unique_labels
    from alignkit.rundir import RESULTS

    labels = unique_labels(eval_specs(stage, run_dir, workflow))
    return [run_dir / stage.id / label / RESULTS for label in labels]
