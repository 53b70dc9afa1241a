"""`alignkit run`: a recipe's stages (sft, pref, merge, eval, card) in order, in one run dir.

A workflow recipe is a normal recipe (its sections are every stage's defaults) plus
`stages`, a list of mappings with `stage` (the kind), an optional `id`, an optional
`input` (the id of an earlier stage whose model this one takes; default the latest
model), section overrides, and per-kind keys: merge `dtype`, eval `models`, card
`name`. Each stage writes to `<run dir>/<id>` and records its fingerprint (resolved
config plus inputs) in `<run dir>/.state/<id>.json`: a finished stage with the same
fingerprint is skipped, an unfinished one resumes from its checkpoint, and a changed
one runs again (its old output moved to `.previous/`), as does everything after it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.atomic import write_json_atomic
from alignkit.config import (
    Recipe,
    _merge,
    apply_overrides,
    build,
    check_keys,
    parse_overrides,
    read_yaml,
    to_dict,
)
from alignkit.errors import AlignkitError

KINDS = ("sft", "pref", "merge", "eval", "card")
TRAINING = ("sft", "pref")
MODEL_MAKERS = ("sft", "pref", "merge")
STAGE_KEYS = {"stage", "id", "input", "dtype", "models", "name"}
KIND_KEYS = {"merge": {"dtype"}, "eval": {"models"}, "card": {"name"}}
SECTIONS = {  # the recipe sections a stage's fingerprint covers
    "sft": ("model", "lora", "data", "train"),
    "pref": ("model", "lora", "data", "train", "pref"),
    "merge": (),
    "eval": ("model", "eval"),
    "card": (),
}
RUNNER_KEYS = {"train": ("output_dir", "overwrite", "resume"), "eval": ("output_dir", "overwrite")}
BASE = "base"
STATE = ".state"
PREVIOUS = ".previous"


@dataclass
class Stage:
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
    stages: list[Stage]


# ---------------------------------------------------------------- loading and planning


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
    extra = set(item) & STAGE_KEYS - {"stage", "id", "input"} - KIND_KEYS.get(item["stage"], set())
    if extra:
        raise AlignkitError(
            f"{where}: stages[{index}] ({item['stage']}) does not take {sorted(extra)}."
        )
    if isinstance(item.get("model"), dict) and "name_or_path" in item["model"]:
        raise AlignkitError(
            f"{where}: stages[{index}] sets model.name_or_path; a stage's model is its input "
            "(`input: <stage id>`), the recipe's model.name_or_path is the base."
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
    check_keys(data, Recipe, where=where)
    ids = stage_ids(raw)
    common, per_stage = split_overrides(overrides or [], ids)
    stages = []
    for sid, item in zip(ids, raw, strict=True):
        sections = {k: v for k, v in item.items() if k not in STAGE_KEYS}
        check_keys(sections, Recipe, where=f"{where} stage '{sid}'")
        merged = apply_overrides(_merge(data, sections), common + per_stage[sid])
        recipe = build(Recipe, merged, where=f"{where} stage '{sid}'")
        settings = {k: item[k] for k in KIND_KEYS.get(item["stage"], ()) if k in item}
        stages.append(Stage(sid, item["stage"], recipe, item.get("input"), settings))
    base = build(Recipe, apply_overrides(data, common), where=where).model.name_or_path
    workflow = Workflow(name, Path(path), base, stages)
    link_inputs(workflow)
    return workflow


def is_adapter(stage: Stage) -> bool:
    return stage.kind in TRAINING and stage.recipe.model.adapter in ("lora", "qlora")


def link_inputs(workflow: Workflow) -> None:
    """Give each stage its input; an input no earlier stage produces is an error."""
    made: dict[str, Stage] = {}
    latest = BASE
    for stage in workflow.stages:
        wanted = stage.input or (None if stage.kind == "card" else latest)
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
        if stage.kind == "pref" and wanted != BASE and is_adapter(made[wanted]):
            raise AlignkitError(
                f"Stage '{stage.id}' (pref) would train on '{wanted}', a LoRA adapter. Add a "
                "`stage: merge` before it, so preference training starts from merged weights."
            )
        if stage.kind == "eval":
            models = stage.settings.get("models") or [BASE, latest]
            unknown = [m for m in models if m not in (BASE, "final") and m not in made]
            if unknown:
                raise AlignkitError(
                    f"Stage '{stage.id}' (eval) lists models {unknown} that no earlier stage "
                    f"produces (models so far: {', '.join([BASE, *made])})."
                )
            stage.settings["models"] = [latest if m == "final" else m for m in models]
        if stage.kind == "card" and not any(s.kind in TRAINING for s in made.values()):
            raise AlignkitError(f"Stage '{stage.id}' (card) needs a training stage before it.")
        stage.input = wanted
        if stage.kind in MODEL_MAKERS:
            made[stage.id] = stage
            latest = stage.id


# ---------------------------------------------------------------- fingerprints and state


def file_digest(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def stage_config(stage: Stage) -> dict[str, Any]:
    """What defines a stage's result: its kind, relevant sections and settings."""
    full = to_dict(stage.recipe)
    config = {section: full[section] for section in SECTIONS[stage.kind]}
    for section, keys in RUNNER_KEYS.items():
        for key in keys:
            config.get(section, {}).pop(key, None)
    if "model" in config:
        config["model"].pop("name_or_path", None)
    return {"kind": stage.kind, "config": config, "settings": stage.settings}


def fingerprint(stage: Stage, inputs: list[str]) -> str:
    """Hash of the stage config, its inputs' fingerprints and local data files' contents."""
    data = stage.recipe.data
    files = {s.path: file_digest(s.path) for s in data.sources + data.eval_sources}
    payload = {**stage_config(stage), "inputs": inputs,
               "data_files": files if stage.kind in TRAINING else {}}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def assign_fingerprints(workflow: Workflow) -> None:
    prints = {BASE: hashlib.sha256(workflow.base_model.encode()).hexdigest()[:16]}
    for stage in workflow.stages:
        if stage.kind == "eval":
            inputs = [prints[m] for m in stage.settings["models"]]
        elif stage.kind == "card":
            inputs = [prints[s.id] for s in workflow.stages[: workflow.stages.index(stage)]]
        else:
            inputs = [prints[stage.input or BASE]]
        stage.fingerprint = fingerprint(stage, inputs)
        prints[stage.id] = stage.fingerprint


def read_state(run_dir: Path, stage: Stage) -> dict[str, Any]:
    path = run_dir / STATE / f"{stage.id}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(run_dir: Path, stage: Stage, **fields: Any) -> None:
    record = {"fingerprint": stage.fingerprint, **fields}
    write_json_atomic(record, run_dir / STATE / f"{stage.id}.json")


def decide(state: dict[str, Any], run_dir: Path, stage: Stage, forced: bool) -> str:
    """skip (done, unchanged), resume (started, unchanged), or run, given the stage's state."""
    same = state.get("fingerprint") == stage.fingerprint and not forced
    if same and state.get("status") == "done" and (run_dir / stage.id).is_dir():
        return "skip"
    if same and state.get("status") == "started" and stage.kind in TRAINING:
        return "resume"
    return "run"


def set_aside(run_dir: Path, stage: Stage) -> Path | None:
    """Move a stage's earlier output out of the way (kept under .previous/)."""
    out = run_dir / stage.id
    if not out.exists():
        return None
    stem = run_dir / PREVIOUS / f"{stage.id}-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = stem, 1
    while target.exists():  # two set-asides within one second
        n += 1
        target = stem.with_name(f"{stem.name}-{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    out.rename(target)
    return target


# ---------------------------------------------------------------- running


def model_path(run_dir: Path, workflow: Workflow, ref: str) -> str:
    return workflow.base_model if ref == BASE else str(run_dir / ref)


def eval_specs(stage: Stage, run_dir: Path, workflow: Workflow) -> list[str]:
    """The model specs an eval stage evaluates, in its order."""
    return [model_path(run_dir, workflow, m) for m in stage.settings["models"]]


def run_stage(stage: Stage, run_dir: Path, workflow: Workflow, resume: bool) -> None:
    """Carry out one stage into run_dir/<id>."""
    out = run_dir / stage.id
    recipe = stage.recipe
    if stage.kind in TRAINING:
        recipe.model.name_or_path = model_path(run_dir, workflow, stage.input or BASE)
        recipe.train.output_dir, recipe.train.overwrite = str(out), True
        recipe.train.resume = "auto" if resume else "no"
        if stage.kind == "sft":
            from alignkit.train.sft import train_sft

            train_sft(recipe)
        else:
            from alignkit.train.pref import train_pref

            train_pref(recipe)
    elif stage.kind == "merge":
        from alignkit.merge import merge_adapter

        merge_adapter(str(run_dir / stage.input), out, stage.settings.get("dtype", "auto"), True)
    elif stage.kind == "eval":
        from alignkit.eval.run import evaluate_models

        recipe.eval.output_dir, recipe.eval.overwrite = str(out), True
        evaluate_models(eval_specs(stage, run_dir, workflow), recipe)
    else:
        write_card_stage(stage, run_dir, workflow)


def write_card_stage(stage: Stage, run_dir: Path, workflow: Workflow) -> None:
    """The card of the latest model, with every earlier eval stage's results in its order."""
    from alignkit.card import write_card
    from alignkit.eval.run import RESULTS, unique_labels

    before = workflow.stages[: workflow.stages.index(stage)]
    runs = [run_dir / s.id for s in before if s.kind in MODEL_MAKERS]
    results = [
        run_dir / s.id / label / RESULTS
        for s in before
        if s.kind == "eval"
        for label in unique_labels(eval_specs(s, run_dir, workflow))
    ]
    out = run_dir / stage.id
    out.mkdir(parents=True, exist_ok=True)
    write_card(runs, results, out / "README.md", stage.settings.get("name") or workflow.name, True)


def select(stages: list[Stage], start: str | None, until: str | None) -> tuple[int, int]:
    ids = [s.id for s in stages]
    for value in (start, until):
        if value is not None and value not in ids:
            raise AlignkitError(f"No stage '{value}' in this recipe; stages: {', '.join(ids)}.")
    first = ids.index(start) if start else 0
    last = ids.index(until) if until else len(ids) - 1
    return first, last


def execute(stage: Stage, run_dir: Path, workflow: Workflow, resume: bool, carried: float) -> None:
    """Run one stage between its `started` and `done` records; `carried` = seconds spent
    by earlier, interrupted attempts."""
    write_state(run_dir, stage, status="started", config=stage_config(stage), seconds=carried)
    started = time.perf_counter()
    run_stage(stage, run_dir, workflow, resume)
    seconds = round(time.perf_counter() - started + carried, 1)
    write_state(run_dir, stage, status="done", config=stage_config(stage), seconds=seconds)


def run_workflow(workflow: Workflow, run_dir: Path, start: str | None = None,
                 until: str | None = None, say: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Run (or skip, or resume) the stages; write summary.md; return the run dir."""
    from alignkit.summary import write_summary

    assign_fingerprints(workflow)
    first, last = select(workflow.stages, start, until)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(
        workflow.path.read_text(encoding="utf-8"), encoding="utf-8"
    )
    rerun_from = None
    for index, stage in enumerate(workflow.stages[: last + 1]):
        if index < first:
            if read_state(run_dir, stage).get("status") != "done":
                raise AlignkitError(f"--from {start}: earlier stage '{stage.id}' has not finished.")
            continue
        forced = rerun_from is not None or (start is not None and index == first)
        state = read_state(run_dir, stage)
        action = decide(state, run_dir, stage, forced)
        if action == "skip":
            say(f"== {stage.id} ({stage.kind}): unchanged and complete, skipped")
            continue
        reason = ("rerun asked for (--from)" if start and index == first
                  else "an earlier stage reran" if rerun_from
                  else "settings or inputs changed")  # fmt: skip
        rerun_from = rerun_from or stage.id
        if action == "run":
            moved = set_aside(run_dir, stage)
            if moved:
                say(f"== {stage.id}: {reason}; earlier output moved to {moved}")
        resume = action == "resume"
        say(
            f"== {stage.id} ({stage.kind}): {'resuming from its checkpoint' if resume else 'running'}"
        )
        execute(stage, run_dir, workflow, resume, state.get("seconds", 0.0) if resume else 0.0)
    summary = write_summary(workflow, run_dir)
    say(f"\nsummary: {summary}")
    for label, kinds, name in (("card", ("card",), "README.md"),
                               ("benchmark table", ("eval",), "comparison.md"),
                               ("benchmark chart", ("eval",), "comparison.png"),
                               ("training curves", TRAINING, "training_curves.png")):  # fmt: skip
        found = [str(run_dir / st.id / name) for st in workflow.stages
                 if st.kind in kinds and (run_dir / st.id / name).is_file()]  # fmt: skip
        if found:
            say(f"{label}: {', '.join(found)}")
    return run_dir


# ---------------------------------------------------------------- dry run


def describe(workflow: Workflow, run_dir: Path) -> str:
    """The plan: each stage's input, output and resolved config."""
    assign_fingerprints(workflow)
    lines = [f"run {workflow.name} in {run_dir} (base model: {workflow.base_model})"]
    for stage in workflow.stages:
        action = decide(read_state(run_dir, stage), run_dir, stage, False)
        source = (
            ", ".join(stage.settings.get("models", [])) if stage.kind == "eval" else stage.input
        )
        lines.append(f"\n== {stage.id} ({stage.kind}) <- {source or 'earlier stages'} -> "
                     f"{run_dir / stage.id} [{'would skip' if action == 'skip' else 'would ' + action}]")  # fmt: skip
        config = stage_config(stage)
        if config["config"]:
            lines.append(yaml.safe_dump(config["config"], sort_keys=False).rstrip())
        if stage.settings:
            lines.append(yaml.safe_dump(stage.settings, sort_keys=False).rstrip())
    return "\n".join(lines)


def check_data(stage: Stage, hub: bool) -> list[str]:
    """Each data source of a training stage exists and holds the stage's kind of data."""
    from alignkit.data.sources import LOCAL_SUFFIXES, load_source

    wanted = ("sft",) if stage.kind == "sft" else ("pair", "feedback")
    notes = []
    for source in stage.recipe.data.sources + stage.recipe.data.eval_sources:
        local = Path(source.path).expanduser()
        if local.is_file() or local.suffix in (*LOCAL_SUFFIXES, ".gz"):
            _, report = load_source(source)
            name, kind, what = report.format, report.kind, f"{report.used} rows"
        elif hub:
            fmt = hub_format(source)
            name, kind, what = fmt.name, fmt.kind, "hub dataset"
        else:
            notes.append(f"{stage.id}: {source.path}: hub dataset, not checked (hub unreachable)")
            continue
        if kind not in wanted:
            raise AlignkitError(
                f"Stage '{stage.id}' ({stage.kind}) needs {' or '.join(wanted)} data; "
                f"'{source.path}' holds {kind} data ({name})."
            )
        notes.append(f"{stage.id}: {source.path}: {name}, {what}")
    return notes


def hub_format(source: Any) -> Any:
    """The format of a hub dataset, detected from its first rows (streamed, not downloaded)."""
    from datasets import load_dataset

    from alignkit.data.sources import pick_format

    split = source.split.split("[", 1)[0]
    try:
        stream = load_dataset(source.path, source.name, split=split, streaming=True)
        rows = [(f"row {i}", dict(r)) for i, r in zip(range(1, 4), stream, strict=False)]
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported the same way
        raise AlignkitError(f"Dataset '{source.path}' ({split}) could not be read: {exc}") from None
    return pick_format(source, rows)


def check_model(workflow: Workflow, hub: bool) -> list[str]:
    """The base model can be found, and explicit LoRA targets exist in it."""
    from alignkit.models import check_lora_targets, resolve

    name = workflow.base_model
    local = (
        Path(name).exists()
        or name.endswith(".gguf")
        or name in ("default", "smollm2-135m-instruct")
    )
    if not local and not hub:
        return [f"model {name}: hub id, not checked (hub unreachable)"]
    resolved = resolve(name)
    targets = {tuple(s.recipe.lora.target_modules) for s in workflow.stages
               if is_adapter(s) and s.recipe.lora.target_modules != ["all-linear"]}  # fmt: skip
    if targets:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        for target in targets:
            check_lora_targets(skeleton, list(target))
    return [f"model {name}: found" + (", LoRA targets exist" if targets else "")]


def validate(workflow: Workflow) -> list[str]:
    """Checks a dry run makes beyond the schema: data, formats, model, LoRA targets."""
    from alignkit.eval.tasks import check_offline, hub_reachable, parse_fewshot, parse_tasks

    hub = hub_reachable()
    notes = check_model(workflow, hub)
    for stage in workflow.stages:
        if stage.kind in TRAINING:
            notes += check_data(stage, hub)
        if stage.kind == "pref":
            from alignkit.train.pref import check_pref

            check_pref(stage.recipe.pref)
        if stage.kind == "eval":
            benchmarks = parse_tasks(stage.recipe.eval.tasks)
            parse_fewshot(stage.recipe.eval.num_fewshot, benchmarks)
            if stage.recipe.eval.offline:
                check_offline(benchmarks)
            elif not hub:
                try:
                    check_offline(benchmarks)
                except AlignkitError as exc:
                    notes.append(f"{stage.id}: hub unreachable now; at run time: {exc}")
    return notes
