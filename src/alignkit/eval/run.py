"""`alignkit eval`: lm-evaluation-harness on our loaded models, one results.json per model.

lm-eval is the engine: its tasks, prompts, filters and metrics. alignkit loads the
model (anything `models.load_model` takes), picks the data source (hub or shipped),
sets each benchmark's usual few-shot count, spreads `--limit` over MMLU's subjects, times each
benchmark and writes the results, a comparison table and a bar chart.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from alignkit import rundir
from alignkit.config import EvalConfig, Recipe, to_dict
from alignkit.config.check import check
from alignkit.console import captured, live_progress, say
from alignkit.errors import AlignkitError
from alignkit.eval.report import write_comparison
from alignkit.eval.tables import figure
from alignkit.eval.tasks import (
    Benchmark,
    check_offline,
    eval_split_sizes,
    hub_reachable,
    lm_tasks,
    parse_fewshot,
    parse_tasks,
    sample_indices,
    write_offline_tasks,
)
from alignkit.models import DEFAULT_MODEL_NAMES, load_model, load_tokenizer, local_paths

CPU_BATCH = 8
BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class Plan:
    """What one `alignkit eval` invocation runs, decided before any model loads."""

    benchmarks: list[Benchmark]
    shots: dict[str, int]
    chat: dict[str, bool]
    samples: dict[str, dict[str, list[int]]]
    totals: dict[str, int]  # each benchmark's items in all (what a full run scores)
    offline: bool
    out: Path


def model_label(spec: str) -> str:
    """A short column name for a model spec."""
    if spec in DEFAULT_MODEL_NAMES:
        return "SmolLM2-135M-Instruct"
    path = Path(spec)
    if path.exists():
        return path.resolve().name
    return spec.rstrip("/").rsplit("/", 1)[-1]


def unique_labels(specs: list[str]) -> list[str]:
    labels = [model_label(s) for s in specs]
    return [
        f"{label}-{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)
    ]


def plan_eval(cfg: EvalConfig, offline: bool | None = None) -> Plan:
    """Validate the settings and decide tasks, shots, chat formatting and items."""
    benchmarks = parse_tasks(cfg.tasks)
    if offline is None:
        offline = cfg.offline or not hub_reachable()
    if offline:
        check_offline(benchmarks)
    chat = {
        b.name: b.chat_template if cfg.apply_chat_template is None else cfg.apply_chat_template
        for b in benchmarks
    }
    sizes = {b.name: eval_split_sizes(b) for b in benchmarks}
    out = Path(cfg.output_dir).expanduser() if cfg.output_dir else rundir.default_dir("eval")
    return Plan(
        benchmarks=benchmarks,
        shots=parse_fewshot(cfg.num_fewshot, benchmarks),
        chat=chat,
        samples={name: sample_indices(cfg.limit, split) for name, split in sizes.items()},
        totals={name: sum(split.values()) for name, split in sizes.items()},
        offline=offline,
        out=out,
    )


def batch_size(spec: str, device: str) -> int | str:
    """lm-eval batch size (checked by `config.check`); `auto` probes GPU memory, which on
    a CPU would exhaust RAM."""
    if spec == "auto":
        return "auto" if device.startswith("cuda") else CPU_BATCH
    return int(spec)


def load_eval_model(spec: str, recipe: Recipe) -> Any:
    """lm-eval's HF wrapper around our loaded model (an adapter is merged in memory)."""
    from alignkit.chat_templates import generation_template

    model_cfg = replace(recipe.model, name_or_path=spec)
    tokenizer = load_tokenizer(model_cfg)
    if model_cfg.chat_template or getattr(tokenizer, "chat_template", None):
        template = generation_template(model_cfg.chat_template, tokenizer, spec)
        tokenizer.chat_template = template.source
    model = load_model(model_cfg).eval()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    device = str(next(model.parameters()).device)
    from alignkit.eval.fastlm import CPU_GENERATE_BATCH, SharedContextLM

    scoring = batch_size(recipe.eval.batch_size, device)
    lm = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=scoring, device=device)
    if recipe.eval.batch_size == "auto" and not device.startswith("cuda"):
        lm.generate_batch_size = CPU_GENERATE_BATCH
    return lm


def metric_value(results: dict[str, Any], task: str, key: str) -> tuple[float, float | None]:
    row = results[task]
    value = row[key]
    metric, _, filt = key.partition(",")
    stderr = row.get(f"{metric}_stderr,{filt}")
    return float(value), (float(stderr) if isinstance(stderr, (int, float)) else None)


def weighted_stderr(stderrs: dict[str, float | None], items: dict[str, int]) -> float | None:
    """The standard error of the item-weighted mean of tasks, from theirs (all or none)."""
    if any(s is None for s in stderrs.values()):
        return None
    n = sum(items.values())
    return math.sqrt(sum((s * items[t] / n) ** 2 for t, s in stderrs.items()))


def item_scores(samples: dict[str, list[dict]], tasks: Iterable[str], key: str) -> list[float]:
    """Each scored item's value of `key` (`metric,filter`) in lm-eval's logged samples;
    a list of scores (IFEval's per instruction) counts each one, as its figure does."""
    metric, _, filt = key.partition(",")
    scores: list[float] = []
    for task in tasks:
        for row in samples.get(task, []):
            if row.get("filter") == filt and metric in row:
                value = row[metric]
                scores += [float(v) for v in value] if isinstance(value, list) else [float(value)]
    return scores


def mean_stderr(scores: list[float]) -> float | None:
    """lm-eval's standard error of a mean: sample standard deviation / sqrt(n)."""
    if len(scores) < 2:
        return None
    return statistics.stdev(scores) / math.sqrt(len(scores))


def summarize(
    benchmark: Benchmark, output: dict[str, Any], offline: bool, shots: int, total: int
) -> dict[str, Any]:
    """Our figures from lm-eval's results: one entry per reported metric (values 0..1),
    with its standard error and the items scored of the `total` a full run scores.

    MMLU's figure is the item-weighted mean over the subjects run, as lm-eval's group.
    """
    results, counts = output["results"], output["n-samples"]
    note = benchmark.offline_note if offline else None
    summary = {}
    for metric in benchmark.metrics:
        key = (
            benchmark.name
            if len(benchmark.metrics) == 1
            else (f"{benchmark.name}/{metric.key.split(',')[0]}")
        )
        items = {t: counts[t]["effective"] for t in results if t in counts}
        values = {t: metric_value(results, t, metric.key) for t in items}
        n = sum(items.values())
        value = sum(values[t][0] * items[t] for t in items) / n
        stderr = weighted_stderr({t: values[t][1] for t in items}, items)
        if stderr is None:  # a subject of one item, or a metric lm-eval gives none for
            stderr = mean_stderr(item_scores(output.get("samples", {}), items, metric.key))
        summary[key] = {
            "label": metric.label.format(shots=shots),
            "metric": metric.key,
            "value": value,
            "stderr": stderr,
            "items": n,
            "total_items": total,
            "note": note or None,
        }
    return summary


def run_benchmark(
    lm: Any, benchmark: Benchmark, plan: Plan, cfg: EvalConfig, task_manager: Any
) -> dict[str, Any]:
    """One benchmark through lm-eval's `simple_evaluate`."""
    from lm_eval import simple_evaluate

    if benchmark.name == "ifeval":
        from alignkit.eval.offline_nltk import use_shipped_punkt

        use_shipped_punkt()
    chat = plan.chat[benchmark.name]
    generative = benchmark.name in ("ifeval", "gsm8k")
    gen_kwargs = {"max_gen_toks": cfg.max_gen_toks} if generative and cfg.max_gen_toks else None
    samples = plan.samples[benchmark.name]
    return simple_evaluate(
        model=lm,
        tasks=[t for t in lm_tasks(benchmark) if t in samples],
        num_fewshot=plan.shots[benchmark.name],
        samples=samples,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        gen_kwargs=gen_kwargs,
        task_manager=task_manager,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True,
    )


def settings(plan: Plan, cfg: EvalConfig, benchmark: Benchmark) -> dict[str, Any]:
    return {
        "num_fewshot": plan.shots[benchmark.name],
        "apply_chat_template": plan.chat[benchmark.name],
        "data": "shipped copy" if plan.offline else "hub",
        "offline_note": benchmark.offline_note if plan.offline else None,
        "items": record_items(plan, benchmark),
        "total_items": plan.totals[benchmark.name],
        "max_gen_toks": cfg.max_gen_toks,
    }


def write_samples(samples: dict[str, list], folder: Path) -> None:
    """lm-eval's per-item records (prompts, answers, scores), one JSON line each."""
    for task, rows in samples.items():
        lines = "".join(json.dumps(row, default=str) + "\n" for row in rows)
        rundir.write_text(folder / f"{task}.jsonl", lines)


def check_outputs(plan: Plan, specs: list[str], labels: list[str], overwrite: bool) -> None:
    """Refuse, before any work, an output dir holding a model evaluated, a model's
    results dir that alignkit eval did not write, and earlier results unless asked."""
    rundir.check_output_dir(plan.out, local_paths(specs))
    foreign = [
        plan.out / label
        for label in labels
        if (plan.out / label).exists() and not (plan.out / label / rundir.RESULTS).is_file()
    ]
    if foreign:
        raise AlignkitError(
            f"'{foreign[0]}' exists and holds no {rundir.RESULTS}: alignkit eval did not write "
            "it, and would replace it with this model's results. Choose another --output-dir."
        )
    existing = [
        plan.out / label / rundir.RESULTS
        for label in labels
        if (plan.out / label / rundir.RESULTS).exists()
    ]
    if existing and not overwrite:
        raise AlignkitError(
            f"{existing[0]} already exists. Pass --overwrite to replace it, or choose another "
            "--output-dir. (`alignkit eval --compare DIR...` re-renders a table without re-running.)"
        )


def evaluate_models(specs: list[str], recipe: Recipe, say: Any = say) -> list[dict[str, Any]]:
    """Evaluate each model spec on the planned benchmarks; writes results and the table.
    lm-eval's and datasets' output goes to the output dir's log.txt, not the terminal."""
    check(recipe, "eval")
    cfg = recipe.eval
    plan = plan_eval(cfg)
    labels = unique_labels(specs)
    check_outputs(plan, specs, labels, cfg.overwrite)
    started = time.perf_counter()
    with captured(plan.out / rundir.LOG):
        say(eval_header(plan, cfg, labels))
        with (
            tempfile.TemporaryDirectory(prefix="alignkit-lm-eval-tasks-") as tmp,
            eval_progress() as progress,
        ):
            items = sum(record_items(plan, b) for b in plan.benchmarks)
            tick = partial(progress.update, progress.add_task("", total=len(specs) * items))
            task_manager = make_task_manager(plan, Path(tmp))
            results = []
            for spec, label in zip(specs, labels, strict=True):
                results.append(evaluate_one(spec, label, recipe, plan, task_manager, tick))
                say(model_line(results[-1]))
        table, chart = write_comparison(results, plan.out)
        minutes = (time.perf_counter() - started) / 60
        say(
            f"eval done in {minutes:.1f} min: {plan.out}/<model>/{rundir.RESULTS}, "
            f"table {table}, chart {chart}"
        )
    return results


def eval_header(plan: Plan, cfg: EvalConfig, labels: list[str]) -> str:
    source = "the shipped offline copies" if plan.offline else "the Hugging Face Hub"
    limit = f", at most {cfg.limit} items each" if cfg.limit else ""
    names = ", ".join(b.name for b in plan.benchmarks)
    return f"eval: {', '.join(labels)} on {names} ({source}{limit})"


def eval_progress() -> Progress:
    """The eval's live display: model and benchmark now running, items scored, time."""
    return live_progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("items"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


def model_line(record: dict[str, Any]) -> str:
    """One model's result: each benchmark's first figure with its standard error."""
    firsts: dict[str, str] = {}
    for key, item in record["summary"].items():
        firsts.setdefault(key.split("/")[0], figure(item))
    shown = ", ".join(f"{name} {value}" for name, value in firsts.items())
    dtype = "" if record["dtype"] == "float32" else f" ({record['dtype']})"
    return f"{record['model']}{dtype} done in {record['wall_seconds']:.0f} s: {shown}"


def make_task_manager(plan: Plan, folder: Path) -> Any:
    """lm-eval's task index; offline, with the shipped-data task configs taking precedence."""
    from lm_eval.tasks import TaskManager

    if not plan.offline:
        return TaskManager()
    return TaskManager(include_path=str(write_offline_tasks(plan.benchmarks, folder)))


def evaluate_one(
    spec: str,
    label: str,
    recipe: Recipe,
    plan: Plan,
    task_manager: Any,
    tick: Callable[..., None],
) -> dict[str, Any]:
    """All planned benchmarks on one model; writes its results.json and samples together,
    into a temporary dir renamed into place (an interrupted eval leaves no partial one).
    `tick(description=..., advance=...)` moves the live display."""
    cfg = recipe.eval
    started = time.perf_counter()
    lm = load_eval_model(spec, recipe)
    record: dict[str, Any] = {
        "model": label,
        "model_spec": spec,
        "limit": cfg.limit,
        "offline": plan.offline,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "settings": {},
        "summary": {},
        "task_seconds": {},
        "lm_eval": {},
    }
    samples: dict[str, list] = {}
    for benchmark in plan.benchmarks:
        items = record_items(plan, benchmark)
        tick(description=f"{label} · {benchmark.name} ({items} items)")
        t0 = time.perf_counter()
        output = run_benchmark(lm, benchmark, plan, cfg, task_manager)
        seconds = time.perf_counter() - t0
        shots = plan.shots[benchmark.name]
        summary = summarize(benchmark, output, plan.offline, shots, plan.totals[benchmark.name])
        record["task_seconds"][benchmark.name] = round(seconds, 1)
        record["settings"][benchmark.name] = settings(plan, cfg, benchmark)
        record["summary"].update(summary)
        samples.update(output.pop("samples", {}))
        record["lm_eval"][benchmark.name] = output
        tick(advance=items)
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["eval_config"] = to_dict(cfg)
    with rundir.atomic_dir(plan.out / label, existing="aside") as tmp:
        write_samples(samples, tmp / rundir.SAMPLES)
        rundir.write_json(tmp / rundir.RESULTS, record)
    return record


def record_items(plan: Plan, benchmark: Benchmark) -> int:
    return sum(len(v) for v in plan.samples[benchmark.name].values())
