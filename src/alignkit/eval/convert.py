"""Convert public benchmark files into the row schema of the hub data sets lm-eval reads.

Each function maps one upstream record to one hub row, so lm-eval's own task
definitions (prompts, few-shot, metrics, filters) run unchanged on the shipped copy.
`build_shipped_data` turns the folder described in `../shared/data/README.md` into
`alignkit/eval/data/` (gzipped JSON lines); `scripts/build_benchmark_data.py` runs it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# every key an IFEval instruction can take; the hub rows carry all of them (None when unused)
IFEVAL_KWARGS = (
    "num_highlights",
    "relation",
    "num_words",
    "num_placeholders",
    "prompt_to_repeat",
    "num_bullets",
    "section_spliter",
    "num_sections",
    "capital_relation",
    "capital_frequency",
    "keywords",
    "num_paragraphs",
    "language",
    "let_relation",
    "letter",
    "let_frequency",
    "end_phrase",
    "forbidden_words",
    "keyword",
    "frequency",
    "num_sentences",
    "postscript_marker",
    "first_word",
    "nth_paragraph",
)


def gsm8k_row(record: dict[str, Any]) -> dict[str, Any]:
    """openai/gsm8k `main`: the upstream record already has the hub's fields."""
    return {"question": record["question"], "answer": record["answer"]}


def arc_row(record: dict[str, Any]) -> dict[str, Any]:
    """allenai/ai2_arc row from either the hub schema or the original nested one."""
    question = record["question"]
    if isinstance(question, dict):  # original: {"stem", "choices": [{"text", "label"}]}
        choices = {
            "text": [c["text"] for c in question["choices"]],
            "label": [c["label"] for c in question["choices"]],
        }
        question = question["stem"]
    else:
        choices = {
            "text": list(record["choices"]["text"]),
            "label": list(record["choices"]["label"]),
        }
    return {
        "id": record["id"],
        "question": question,
        "choices": choices,
        "answerKey": record["answerKey"],
    }


def split_hellaswag_context(context: str) -> tuple[str, str]:
    """Split a HellaSwag context into the hub's `ctx_a` and `ctx_b`.

    The text files join them with a space; `ctx_b` is the unfinished sentence the
    endings complete, which starts in lower case after the last full stop.
    """
    match = re.search(r"^(.*[.!?]) ([a-z][^.!?]*)$", context)
    if match is None:
        return context, ""
    return match.group(1), match.group(2)


def hellaswag_rows(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Rowan/hellaswag validation rows from the 6-lines-per-item text format.

    `source_id` and `split_type` are not in the text files and are left empty.
    """
    items = list(lines)
    if len(items) % 6:
        raise ValueError(f"HellaSwag text has {len(items)} lines, not a multiple of 6")
    for ind in range(len(items) // 6):
        head, gold, *endings = items[6 * ind : 6 * ind + 6]
        activity, _, context = head.partition(": ")
        ctx_a, ctx_b = split_hellaswag_context(context)
        yield {
            "ind": ind,
            "activity_label": activity,
            "ctx_a": ctx_a,
            "ctx_b": ctx_b,
            "ctx": context,
            "endings": endings,
            "source_id": "",
            "split": "val",
            "split_type": "",
            "label": str(int(gold)),
        }


def mmlu_row(record: dict[str, str], subject: str) -> dict[str, Any]:
    """cais/mmlu row from the csv layout `question,choice0..choice3,answer`."""
    return {
        "question": record["question"],
        "subject": subject,
        "choices": [record[f"choice{i}"] for i in range(4)],
        "answer": int(record["answer"]),
    }


def split_answers(cell: str) -> list[str]:
    return [a.strip() for a in cell.split(";") if a.strip()]


def truthfulqa_mc_row(record: dict[str, str]) -> dict[str, Any]:
    """truthful_qa `multiple_choice` row derived from the generation csv.

    MC1: the best answer, then the incorrect ones. MC2: the best answer and the
    other correct answers (label 1), then the incorrect ones (label 0). This is a
    derivation, not the published MC targets; tables label it so.
    """
    best = record["Best Answer"].strip()
    correct = [best] + [a for a in split_answers(record["Correct Answers"]) if a != best]
    incorrect = split_answers(record["Incorrect Answers"])
    return {
        "question": record["Question"].strip(),
        "mc1_targets": {"choices": [best, *incorrect], "labels": [1] + [0] * len(incorrect)},
        "mc2_targets": {
            "choices": correct + incorrect,
            "labels": [1] * len(correct) + [0] * len(incorrect),
        },
    }


def ifeval_row(record: dict[str, Any]) -> dict[str, Any]:
    """google/IFEval row: every kwargs dict carries all keys, None where unused."""
    unknown = {k for kw in record["kwargs"] for k in kw} - set(IFEVAL_KWARGS)
    if unknown:
        raise ValueError(f"IFEval record {record['key']} has unknown kwargs {sorted(unknown)}")
    return {
        "key": int(record["key"]),
        "prompt": record["prompt"],
        "instruction_id_list": list(record["instruction_id_list"]),
        "kwargs": [{k: kw.get(k) for k in IFEVAL_KWARGS} for kw in record["kwargs"]],
    }


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        yield from csv.DictReader(handle)


def write_jsonl_gz(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """Write rows reproducibly (no timestamp in the gzip header); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
    return count


def build_shipped_data(source: Path, out: Path) -> dict[str, int]:
    """Convert every benchmark in `source` into `out/<dataset>/<split>.jsonl.gz`."""
    counts: dict[str, int] = {}

    def put(name: str, rows: Iterable[dict[str, Any]]) -> None:
        counts[name] = write_jsonl_gz(rows, out / f"{name}.jsonl.gz")

    put("gsm8k/test", map(gsm8k_row, read_jsonl(source / "gsm8k_test.jsonl")))
    put("gsm8k/train", map(gsm8k_row, read_jsonl(source / "gsm8k_train.jsonl")))
    put("arc_challenge/test", map(arc_row, read_jsonl(source / "arc_challenge_test.jsonl")))
    put("arc_easy/test", map(arc_row, read_jsonl(source / "arc_easy_test.jsonl")))
    with bz2.open(source / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as handle:
        put("hellaswag/validation", hellaswag_rows(line.rstrip("\n") for line in handle))
    put("truthfulqa/validation", map(truthfulqa_mc_row, read_csv(source / "truthfulqa.csv")))
    put("ifeval/train", map(ifeval_row, read_jsonl(source / "ifeval_input_data.jsonl")))
    for split in ("test", "dev"):
        for csv_path in sorted((source / "mmlu" / split).glob(f"*_{split}.csv")):
            subject = csv_path.name.removesuffix(f"_{split}.csv")
            rows = (mmlu_row(r, subject) for r in read_csv(csv_path))
            put(f"mmlu/{subject}/{split}", rows)
    return counts
