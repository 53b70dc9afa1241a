from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from support import TEMPLATES, write_jsonl

from alignkit.chat_templates import resolve_template
from alignkit.cli import main
from alignkit.config import DataSource, load_recipe
from alignkit.data import prepared, tokenize
from alignkit.data.inspection import inspect_source
from alignkit.data.sources import load_source
from alignkit.data.tokenize import TokenizedFeedback, TokenizedPair
from alignkit.models import load_tokenizer


def table_counts(out: str) -> dict[str, int]:
    """The (what, count) rows of the printed table of template and truncation effects."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines()]
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}


def turn(role: str, content: str, **extra: str) -> dict[str, str]:
    return {"role": role, "content": content, **extra}


def test_inspect_counts_split_turns_of_sft_conversations(tmp_path, capsys):
    chat = [
        turn("system", "You are terse."),
        turn("user", "Hi"),
        turn("assistant", "Hello!", reasoning_content="A greeting."),
        turn("user", "2+2?"),
        turn("assistant", "4", reasoning_content="Add."),
    ]
    rows = [
        {"messages": chat},  # Qwen3 drops the first <think> later: split into 2 examples
        {"messages": chat[:3]},
        {"messages": [turn("user", "word " * 300), turn("assistant", "ok")]},  # truncated
        {"messages": [turn("user", "q"), turn("assistant", "x " * 300)]},  # completion cut
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    args = ["data", "inspect", str(path), "--chat-template", str(TEMPLATES / "qwen3.jinja")]
    assert main([*args, "--max-length", "128"]) == 0
    out = capsys.readouterr().out
    assert "sft conversations at max_length=128" in out
    assert table_counts(out) == {
        "rows": 4,
        "examples kept": 5,
        "rows split by turn": 1,
        "examples made by splitting": 2,
        "truncated": 2,
    }


def test_inspect_counts_what_happened_to_pairs(tmp_path, capsys):
    same_start = "Sure, here is a long and careful answer. " * 6
    rows = [
        {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Rock."},
        # diverging before the last turn: the user turn in each branch is context
        {
            "prompt": [turn("user", "Name a fruit.")],
            "chosen": [
                turn("assistant", "Apple."),
                turn("user", "More?"),
                turn("assistant", "Pear."),
            ],
            "rejected": [
                turn("assistant", "Rock."),
                turn("user", "Fruit!"),
                turn("assistant", "No."),
            ],
        },
        {"prompt": "Explain.", "chosen": same_start + "Yes.", "rejected": same_start + "No."},
        {"prompt": "Hi", "chosen": "a<|im_end|>b", "rejected": "c"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(["data", "inspect", str(path), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "preference pairs at max_length=64" in out
    assert table_counts(out) == {
        "rows": 4,
        "examples kept": 2,
        "truncated": 0,  # the one truncated pair became identical
        "dropped: identical after truncation": 1,
        "dropped: end-of-turn marker inside the text": 1,
        "re-tokenized at the prompt boundary": 0,
    }


def test_inspect_counts_feedback(tmp_path, capsys):
    rows = [
        {"messages": [turn("user", "Hi"), turn("assistant", "Hello!")], "label": True},
        {"messages": [turn("user", "word " * 300), turn("assistant", "ok")], "label": False},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    assert main(["data", "inspect", str(path), "--max-length", "64", "--truncation", "drop"]) == 0
    out = capsys.readouterr().out
    assert "feedback at max_length=64" in out
    assert table_counts(out) == {
        "rows": 2,
        "examples kept": 1,
        "truncated": 0,
        "dropped: longer than max_length": 1,
        "re-tokenized at the prompt boundary": 0,
    }


SFT_ROWS = [
    {"messages": [turn("user", "Hi"), turn("assistant", "Hello!")]},
    {"messages": [turn("user", "word " * 300), turn("assistant", "ok")]},  # truncated
    {"messages": [turn("user", "q"), turn("assistant", "x " * 300)]},  # completion cut
    {"messages": [turn("user", "Hi"), turn("assistant", "a<|im_end|>b")]},  # dropped
    {"messages": [turn("user", "2+2?"), turn("assistant", "4")]},
]
PAIR_ROWS = [
    {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Rock."},
    {"prompt": "word " * 100, "chosen": "Yes.", "rejected": "No."},  # prompt cut
    {"prompt": "Explain.", "chosen": "long " * 60 + "Yes.", "rejected": "long " * 60 + "No."},
    {"prompt": "Hi", "chosen": "Fine.", "rejected": "Bad."},
]


FEEDBACK_ROWS = [
    {"messages": [turn("user", "Hi"), turn("assistant", "Hello!")], "label": True},
    {"messages": [turn("user", "word " * 300), turn("assistant", "ok")], "label": False},
    {"messages": [turn("user", "Say no."), turn("assistant", "No.")], "label": False},
]


@pytest.mark.parametrize(
    "rows", [SFT_ROWS, PAIR_ROWS, FEEDBACK_ROWS], ids=["sft", "pairs", "feedback"]
)
def test_inspect_tokenizes_once_and_again_only_what_the_limit_changed(tmp_path, monkeypatch, rows):
    """Lengths at no limit equal a plain tokenization without one, though only the truncated
    or dropped examples are tokenized a second time."""
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = load_recipe(None, [("data.max_length", "64")])
    tokenized: list[int] = []
    plain = tokenize.batch_outcomes

    def counted(examples, *args):
        tokenized.append(len(examples))
        return plain(examples, *args)

    monkeypatch.setattr(tokenize, "batch_outcomes", counted)
    monkeypatch.setattr(prepared, "batch_outcomes", counted)
    report = inspect_source(recipe, DataSource(path=str(path)))
    assert report.at_max_length.truncated + sum(report.at_max_length.dropped.values()) > 0
    changed = len(rows) - report.at_max_length.kept + report.at_max_length.truncated
    assert sum(tokenized) == len(rows) + changed

    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(None, tokenizer)
    examples, _ = load_source(DataSource(path=str(path)))
    unlimited = dataclasses.replace(
        recipe.data, max_length=1 << 30, max_prompt_length=(1 << 30) - 1
    )
    items, _ = tokenize.tokenize_examples(examples, tokenizer, template, unlimited)
    sizes = [item_lengths(item) for item in items]
    assert report.lengths == percentiles([total for _, total in sizes])
    assert report.prompt_lengths == percentiles([prompt for prompt, _ in sizes])
    assert report.example[0] == items[0]


def item_lengths(item) -> tuple[int, int]:
    """(prompt tokens, total tokens) of one item, read off its Python lists."""
    if isinstance(item, TokenizedPair):
        return len(item.prompt_ids), len(item.prompt_ids) + max(
            len(item.chosen_ids), len(item.rejected_ids)
        )
    if isinstance(item, TokenizedFeedback):
        return len(item.prompt_ids), len(item.prompt_ids) + len(item.completion_ids)
    first = item.labels_mask.index(True) if True in item.labels_mask else 0
    return first, len(item.input_ids)


def percentiles(values: list[int]) -> dict[int, int]:
    return {p: int(np.percentile(values, p, method="higher")) for p in (50, 90, 95, 99, 100)}
