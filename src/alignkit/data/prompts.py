"""Prompts for on-policy training, from any data file alignkit reads.

A row gives its prompt as:
- a prompt-only row: `prompt` (a string, or a list of chat messages) with no
  completion (IFEval's rows are of this kind); or `question` (GSM8K's rows);
- the prompt side of an SFT row (the conversation before its last assistant turn) or
  of a preference or feedback row.
The row's other fields (`instruction_id_list`, `kwargs`, `answer`, ...) travel with the
prompt for the rewards. Errors name the file and row; rows without a prompt are skipped
with a count.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from alignkit.config import DataSource
from alignkit.data.formats import (
    FORMATS,
    Conversation,
    RowProblem,
    _as_messages,
    detect_format,
)
from alignkit.data.sources import read_records
from alignkit.errors import AlignkitError
from alignkit.rewards.base import Prompt

ANSWER_KEYS = {"completion", "chosen", "rejected", "output", "response"}


def prompt_only(record: dict[str, Any]) -> list[dict[str, str]] | None:
    """The messages of a prompt-only row, or None when the row holds a completion."""
    if ANSWER_KEYS & set(record):
        return None
    if "prompt" in record:
        return _as_messages(record["prompt"], "prompt", "user")
    if isinstance(record.get("question"), str):
        return [{"role": "user", "content": record["question"]}]
    return None


def prompt_side(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The prompt messages of an SFT, preference or feedback row."""
    chosen = FORMATS.get(fmt) if fmt != "auto" else detect_format(record)
    if chosen is None:
        raise RowProblem("no known format fits this row (see alignkit data inspect)")
    example = chosen.convert(record)
    if not isinstance(example, Conversation):
        return list(example.prompt)
    messages = list(example.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def row_prompt(record: Any, fmt: str, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise RowProblem("a row must be a JSON object")
    messages = prompt_only(record) if fmt == "auto" else None
    if messages is None:
        messages = prompt_side(record, fmt)
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise RowProblem("the prompt does not end with a non-empty user message", skip=True)
    return Prompt(messages=messages, fields=dict(record), source=where)


def load_prompts(sources: list[DataSource]) -> tuple[list[Prompt], Counter]:
    """Every source's prompts, in order, and the skipped rows per reason."""
    prompts, skipped = [], Counter()
    for source in sources:
        for where, record in read_records(source):
            label = f"{source.path}: {where}"
            try:
                prompts.append(row_prompt(record, source.format, label))
            except RowProblem as problem:
                if not problem.skip:
                    raise AlignkitError(
                        f"{label}: {problem}. Give prompt-only rows a `prompt` field, or rows "
                        "in a format alignkit reads (alignkit data inspect shows it)."
                    ) from None
                skipped[str(problem)] += 1
    if not prompts:
        raise AlignkitError("data.sources hold no usable prompts; add rows with a prompt.")
    return prompts, skipped
