"""The benchmarks `alignkit eval` knows: lm-eval task, seed settings, reported metrics, data.

Online, lm-eval's own task configs load their hub data sets. Offline, each task is
re-declared in a generated folder as `include: <lm-eval's yaml>` plus a data source
swapped to the shipped JSON lines (`alignkit/eval/data`); prompts, few-shot
formatting, filters and metrics stay lm-eval's. lm-eval gives an include folder
precedence over its own tasks of the same name.
"""

from __future__ import annotations

import gzip
import socket
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import AlignkitError

DATA_DIR = Path(__file__).resolve().parent / "data"
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class Metric:
    """One reported figure: lm-eval's `metric,filter` key and the table row label."""

    key: str
    label: str


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as the seeds report it.

    `yaml` is lm-eval's task file relative to `lm_eval/tasks` (`{subject}` for MMLU's
    57 subject tasks); `offline` maps each split lm-eval reads to a shipped file,
    `offline_overrides` are config keys changed with it, `offline_note` says how the
    offline run differs (shown beside its figures), None when no copy is shipped.
    """

    name: str
    yaml: str
    fewshot: int
    metrics: tuple[Metric, ...]
    chat_template: bool = False
    offline: dict[str, str] = field(default_factory=dict)
    offline_overrides: dict[str, Any] = field(default_factory=dict)
    offline_note: str | None = None
    subjects: bool = False


FEWSHOT_FROM_EVAL = "few-shot examples drawn from the evaluated split (never the item itself)"
# ARC ships its test split only: few-shot examples come from it
FEWSHOT_FROM_TEST = {"training_split": None, "validation_split": None, "fewshot_split": "test"}

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "ifeval",
            "ifeval/ifeval.yaml",
            0,
            (
                Metric("prompt_level_strict_acc,none", "IFEval prompt-level strict"),
                Metric("inst_level_strict_acc,none", "IFEval instruction-level strict"),
                Metric("prompt_level_loose_acc,none", "IFEval prompt-level loose"),
                Metric("inst_level_loose_acc,none", "IFEval instruction-level loose"),
            ),
            chat_template=True,
            offline={"train": "ifeval/train"},
            offline_note="",
        ),
        Benchmark(
            "gsm8k",
            "gsm8k/gsm8k.yaml",
            5,
            (Metric("exact_match,flexible-extract", "GSM8K ({shots}-shot, flexible-extract)"),),
            offline={"train": "gsm8k/train", "test": "gsm8k/test"},
            offline_note="",
        ),
        Benchmark(
            "mmlu",
            "mmlu/default/mmlu_{subject}.yaml",
            5,
            (Metric("acc,none", "MMLU ({shots}-shot)"),),
            offline={"test": "mmlu/{subject}/test", "dev": "mmlu/{subject}/dev"},
            offline_note="",
            subjects=True,
        ),
        Benchmark(
            "truthfulqa_mc2",
            "truthfulqa/truthfulqa_mc2.yaml",
            0,
            (Metric("acc,none", "TruthfulQA MC2 ({shots}-shot)"),),
            offline={"validation": "truthfulqa/validation"},
            offline_note="MC2 targets derived from the csv's correct vs incorrect answers",
        ),
        Benchmark(
            "winogrande",
            "winogrande/default.yaml",
            5,
            (Metric("acc,none", "Winogrande ({shots}-shot)"),),
        ),
        Benchmark(
            "arc_challenge",
            "arc/arc_challenge.yaml",
            25,
            (Metric("acc_norm,none", "ARC-Challenge ({shots}-shot, acc_norm)"),),
            offline={"test": "arc_challenge/test"},
            offline_overrides=FEWSHOT_FROM_TEST,
            offline_note=FEWSHOT_FROM_EVAL,
        ),
        Benchmark(
            "arc_easy",
            "arc/arc_easy.yaml",
            25,
            (Metric("acc_norm,none", "ARC-Easy ({shots}-shot, acc_norm)"),),
            offline={"test": "arc_easy/test"},
            offline_overrides=FEWSHOT_FROM_TEST,
            offline_note=FEWSHOT_FROM_EVAL,
        ),
        Benchmark(
            "hellaswag",
            "hellaswag/hellaswag.yaml",
            10,
            (Metric("acc_norm,none", "HellaSwag ({shots}-shot, acc_norm)"),),
            offline={"validation": "hellaswag/validation"},
            offline_overrides={"training_split": None, "fewshot_split": "validation"},
            offline_note=FEWSHOT_FROM_EVAL,
        ),
    )
}
SEED_TASKS = ("ifeval", "gsm8k", "mmlu", "truthfulqa_mc2", "winogrande")
OFFLINE_TASKS = tuple(name for name, b in BENCHMARKS.items() if b.offline_note is not None)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers on its HTTPS port (False when offline)."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def parse_tasks(spec: list[str]) -> list[Benchmark]:
    """Benchmarks by name, in the given order; an unknown name is an error listing the known."""
    names = [n.strip() for item in spec for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise AlignkitError(
            f"Unknown eval task(s) {unknown or spec}. Known: {', '.join(BENCHMARKS)}."
        )
    return [BENCHMARKS[n] for n in dict.fromkeys(names)]


def check_offline(benchmarks: list[Benchmark]) -> None:
    missing = [b.name for b in benchmarks if b.offline_note is None]
    if missing:
        raise AlignkitError(
            f"No offline copy of {', '.join(missing)} ships with alignkit (no public copy could "
            "be redistributed), and the Hugging Face Hub is not being used. Drop it from "
            "--tasks, or run with network access and without --offline."
        )


def parse_fewshot(spec: str | None, benchmarks: list[Benchmark]) -> dict[str, int]:
    """Shots per benchmark: the seed default, overridden by `N` (all) or `task=N,task=N`."""
    shots = {b.name: b.fewshot for b in benchmarks}
    if not spec:
        return shots
    for part in str(spec).split(","):
        name, sep, value = part.strip().rpartition("=")
        if not value.strip().isdigit() or (sep and name not in shots):
            raise AlignkitError(
                f"eval.num_fewshot '{spec}': use a number for every task, or task=N pairs "
                f"with tasks from {', '.join(shots)}."
            )
        for task in [name] if sep else shots:
            shots[task] = int(value)
    return shots


@cache
def subjects() -> tuple[str, ...]:
    """MMLU subjects that have shipped data (all 57)."""
    return tuple(sorted(p.name for p in (DATA_DIR / "mmlu").iterdir() if p.is_dir()))


def lm_tasks(benchmark: Benchmark) -> list[str]:
    """lm-eval task names a benchmark runs: MMLU is its subjects, the others one task."""
    if benchmark.subjects:
        return [f"mmlu_{s}" for s in subjects()]
    return [benchmark.name]


def data_file(name: str) -> Path:
    return DATA_DIR / f"{name}.jsonl.gz"


def count_rows(path: Path) -> int:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def eval_split_sizes(benchmark: Benchmark) -> dict[str, int]:
    """Items in the evaluated split of each lm-eval task (the shipped copies match the hub's)."""
    if benchmark.name == "winogrande":
        return {"winogrande": 1267}
    sizes = {}
    for task in lm_tasks(benchmark):
        subject = task.removeprefix("mmlu_")
        splits = {k: v.format(subject=subject) for k, v in benchmark.offline.items()}
        evaluated = next(s for s in ("test", "validation", "train") if s in splits)
        sizes[task] = count_rows(data_file(splits[evaluated]))
    return sizes


def spread_limit(limit: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split `limit` items over tasks in proportion to their sizes (largest remainders).

    One task simply gets min(limit, size). For MMLU's subjects this gives the
    composition a uniform sample of `limit` items would have on average.
    """
    total = sum(sizes.values())
    if limit >= total:
        return dict(sizes)
    quotas = {t: limit * n / total for t, n in sizes.items()}
    counts = {t: int(q) for t, q in quotas.items()}
    by_remainder = sorted(sizes, key=lambda t: (-(quotas[t] - counts[t]), t))
    for task in by_remainder[: limit - sum(counts.values())]:
        counts[task] += 1
    return counts


def sample_indices(limit: int | None, sizes: dict[str, int]) -> dict[str, list[int]]:
    """lm-eval `samples`: the first items of each task; tasks left with none are dropped."""
    counts = dict(sizes) if limit is None else spread_limit(limit, sizes)
    return {task: list(range(n)) for task, n in counts.items() if n > 0}


def offline_config(benchmark: Benchmark, task: str, tasks_root: Path) -> dict[str, Any]:
    """The include-and-override YAML that points one lm-eval task at the shipped data."""
    subject = task.removeprefix("mmlu_")
    files = {
        split: str(data_file(name.format(subject=subject)))
        for split, name in benchmark.offline.items()
    }
    return {
        "include": str(tasks_root / benchmark.yaml.format(subject=subject)),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        **benchmark.offline_overrides,
    }


def write_offline_tasks(benchmarks: list[Benchmark], folder: Path) -> Path:
    """Write the offline task YAMLs for `benchmarks` into `folder` (an lm-eval include path)."""
    import lm_eval.tasks

    tasks_root = Path(lm_eval.tasks.__file__).parent
    folder.mkdir(parents=True, exist_ok=True)
    for benchmark in benchmarks:
        for task in lm_tasks(benchmark):
            config = offline_config(benchmark, task, tasks_root)
            (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder
