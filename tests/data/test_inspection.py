from __future__ import annotations

from support import TEMPLATES, write_jsonl

from alignkit.cli import main


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
