"""What a workflow run dir remembers of each stage, and what to do with it next.

Each stage records its fingerprint (resolved config plus inputs) in
`<run dir>/.state/<id>.json`: a finished stage with the same fingerprint is skipped, an
unfinished one resumes from its checkpoint, and a changed one runs again (its old
output moved to `.previous/`), as does everything after it; stages past an `--until`
are marked stale instead, and run again next time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit import rundir
from alignkit.config import to_dict
from alignkit.workflow.digest import model_digest, path_digest, short_hash
from alignkit.workflow.plan import BASE, TRAINING, PlannedStage, Workflow

SECTIONS = {  # the recipe sections a stage's fingerprint covers
    "sft": ("model", "lora", "data", "train"),
    "pref": ("model", "lora", "data", "train", "pref"),
    "online": ("model", "lora", "data", "train", "online", "pref"),
    "merge": (),
    "eval": ("model", "eval"),
    "card": (),
    "push": (),
    "export": (),
}
RUNNER_KEYS = {"train": ("output_dir", "overwrite", "resume"), "eval": ("output_dir", "overwrite")}


def stage_config(stage: PlannedStage) -> dict[str, Any]:
    """What defines a stage's result: its kind, relevant sections and settings."""
    full = to_dict(stage.recipe)
    config = {section: full[section] for section in SECTIONS[stage.kind]}
    for section, keys in RUNNER_KEYS.items():
        for key in keys:
            config.get(section, {}).pop(key, None)
    if "model" in config:
        config["model"].pop("name_or_path", None)
    return {"kind": stage.kind, "config": config, "settings": stage.settings}


def local_inputs(stage: PlannedStage) -> dict[str, str | None]:
    """Digests of what the stage reads from disk besides its input models: data files and
    folders, a .jinja chat template, a reference model (None: not local, a hub id)."""
    recipe, found = stage.recipe, {}
    if stage.kind in TRAINING:
        for source in recipe.data.sources + recipe.data.eval_sources:
            found[f"data {source.path}"] = path_digest(source.path)
    if stage.kind == "pref" and recipe.pref.ref_model:
        found["ref_model"] = model_digest(recipe.pref.ref_model)
    template = recipe.model.chat_template
    if "model" in SECTIONS[stage.kind] and template and template.endswith(".jinja"):
        found["chat_template"] = path_digest(template)
    return found


def fingerprint(stage: PlannedStage, inputs: list[str]) -> str:
    """Hash of the stage config, its inputs' fingerprints and its local files' digests."""
    payload = {**stage_config(stage), "inputs": inputs, "local": local_inputs(stage)}
    return short_hash(json.dumps(payload, sort_keys=True, default=str))


def assign_fingerprints(workflow: Workflow) -> None:
    prints = {BASE: short_hash(model_digest(workflow.base_model))}
    for index, stage in enumerate(workflow.stages):
        if stage.kind == "eval":
            inputs = [prints[m] for m in stage.settings["models"]]
        elif stage.kind == "card":
            inputs = [prints[s.id] for s in workflow.stages[:index]]
        else:
            inputs = [prints[stage.input or BASE]]
        stage.fingerprint = fingerprint(stage, inputs)
        prints[stage.id] = stage.fingerprint


def read_state(run_dir: Path, stage: PlannedStage) -> dict[str, Any]:
    path = rundir.state_file(run_dir, stage.id)
    return rundir.read_json(path) if path.is_file() else {}


def write_state(run_dir: Path, stage: PlannedStage, **fields: Any) -> None:
    record = {"fingerprint": stage.fingerprint, **fields}
    rundir.write_json(rundir.state_file(run_dir, stage.id), record)


def mark_stale(run_dir: Path, stages: list[PlannedStage], cause: str) -> None:
    """Stages after an `--until` that were made from a stage now running again: whatever
    their fingerprints say, the next run runs them again."""
    for stage in stages:
        if read_state(run_dir, stage):
            write_state(run_dir, stage, status="stale", cause=cause)


def decide(state: dict[str, Any], run_dir: Path, stage: PlannedStage, forced: bool) -> str:
    """skip (done, unchanged), resume (started, unchanged), or run, given the stage's state."""
    same = state.get("fingerprint") == stage.fingerprint and not forced
    if same and state.get("status") == "done" and (run_dir / stage.id).is_dir():
        return "skip"
    if same and state.get("status") == "started" and stage.kind in TRAINING:
        return "resume"
    return "run"


def set_aside(run_dir: Path, stage: PlannedStage) -> Path | None:
    """Move a stage's earlier output out of the way (kept under .previous/)."""
    return rundir.set_aside(run_dir / stage.id)
