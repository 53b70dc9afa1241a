"""Write data/ifeval_style_prompts_200.jsonl: the shipped Alpaca instructions, each with
one verifiable constraint in IFEval's row schema (`prompt`, `instruction_id_list`,
`kwargs`), for the `ifeval` reward of `alignkit online`.

The instructions come from data/alpaca_en_demo_200.jsonl (Apache-2.0); the constraint
sentences are written here. Constraints cycle in row order, so every family gets 1/6
of the rows. Deterministic: running it again writes the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
SOURCE = DATA / "alpaca_en_demo_200.jsonl"
TARGET = DATA / "ifeval_style_prompts_200.jsonl"

# (instruction id, its kwargs, the sentence appended to the instruction)
CONSTRAINTS = [
    ("change_case:english_lowercase", {}, "Write your whole answer in lowercase letters only."),
    ("punctuation:no_comma", {}, "Do not use any commas in your answer."),
    (
        "startend:end_checker",
        {"end_phrase": "Is there anything else I can help with?"},
        "End your answer with the exact phrase 'Is there anything else I can help with?'.",
    ),
    (
        "length_constraints:number_words",
        {"relation": "less than", "num_words": 40},
        "Answer in fewer than 40 words.",
    ),
    ("startend:quotation", {}, "Wrap your entire answer in double quotation marks."),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Add a postscript at the end of your answer, starting with P.S.",
    ),
]


def prompt_text(record: dict) -> str:
    extra = record.get("input") or ""
    return record["instruction"].strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")


def build() -> int:
    lines = SOURCE.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        name, kwargs, sentence = CONSTRAINTS[i % len(CONSTRAINTS)]
        text = prompt_text(json.loads(line))
        rows.append(
            {"prompt": f"{text}\n\n{sentence}", "instruction_id_list": [name], "kwargs": [kwargs]}
        )
    TARGET.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


if __name__ == "__main__":
    print(f"wrote {build()} rows to {TARGET}")
