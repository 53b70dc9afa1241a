"""Prompts for on-policy training from prompt-only, SFT and preference rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import write_jsonl

from alignkit.config import DataSource
from alignkit.data.prompts import load_prompts
from alignkit.errors import AlignkitError
from alignkit.rewards.verifiable import constraints, ifeval_reward

ROOT = Path(__file__).resolve().parents[2]


def test_prompts_from_every_kind_of_row(tmp_path):
    rows = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "Say hi in lowercase.", "instruction_id_list": ["a"], "kwargs": [{}]},
            {"question": "2 + 2?", "answer": "#### 4"},
            {
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            },
        ],
    )
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": "Name a fruit.", "input": "", "output": "Apple."}],
    )
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "Pick one.", "chosen": "A", "rejected": "B"}]
    )
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": "And now?"},
                    {"role": "assistant", "content": "Now this."},
                ]
            }
        ],
    )
    sources = [DataSource(path=str(p)) for p in (rows, alpaca, pairs, chat)]
    prompts, skipped = load_prompts(sources)
    assert not skipped
    assert [p.text for p in prompts] == [
        "Say hi in lowercase.",
        "2 + 2?",
        "Hi",
        "Name a fruit.",
        "Pick one.",
        "And now?",
    ]
    assert prompts[0].fields["instruction_id_list"] == ["a"]
    assert prompts[1].fields["answer"] == "#### 4"
    assert prompts[2].messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in prompts[5].messages] == ["user", "assistant", "user"]
    assert prompts[0].source.endswith("mixed.jsonl: line 1")


def test_bad_rows_are_named_and_empty_prompts_skipped_with_a_count(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "what is this"}])
    with pytest.raises(AlignkitError, match=r"bad.jsonl: line 2: .*prompt"):
        load_prompts([DataSource(path=str(bad))])
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "ok"}, {"prompt": "  "}])
    prompts, skipped = load_prompts([DataSource(path=str(empty))])
    assert len(prompts) == 1 and sum(skipped.values()) == 1


def test_shipped_ifeval_prompts_carry_checkable_constraints():
    path = ROOT / "data" / "ifeval_style_prompts_200.jsonl"
    prompts, skipped = load_prompts([DataSource(path=str(path))])
    assert len(prompts) == 200 and not skipped
    families = {constraints(p)[0][0]: p for p in prompts}
    assert len(families) == 6
    # "x": not detected as English (lowercase fails), no comma, no end phrase, under 40
    # words, not quoted, no P.S.: the kwargs are the ones the checkers take
    assert ifeval_reward(list(families.values()), ["x"] * 6) == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    licenses = (ROOT / "data" / "LICENSES.md").read_text()
    assert "ifeval_style_prompts_200.jsonl" in licenses
    first = json.loads(path.read_text().splitlines()[0])
    assert first["prompt"].startswith("Describe a process of making crepes.")
