"""`alignkit run` on the console: per stage a header, a progress line and a result line;
other libraries' logging, warnings and prints in log.txt (on the terminal too with -v)."""

from __future__ import annotations

import logging
import warnings

import yaml
from support import write_jsonl

import alignkit.train.stage as stage
from alignkit.cli import main

ROWS = [
    {"instruction": f"Name colour {i}.", "input": "", "output": f"Colour {i} is blue."}
    for i in range(6)
]
CHATTER = ("a transformers warning", "a library warning", "a stray print")


def tiny_workflow(tmp_path, model_dir) -> str:
    recipe = {
        "name": "quiet",
        "model": {"name_or_path": str(model_dir), "adapter": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"max_length": 64},
        "train": {"micro_batch_size": 2, "max_steps": 2, "eval_fraction": 0.3},
        "stages": [
            {"stage": "sft", "data": {"sources": [str(write_jsonl(tmp_path / "d.jsonl", ROWS))]}},
            {"stage": "merge", "id": "final"},
            {
                "stage": "eval",
                "models": ["base", "final"],
                "eval": {"tasks": ["arc_easy"], "limit": 2, "num_fewshot": "0", "offline": True},
            },
            {"stage": "card"},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def chatty_stage_data(*args, **kwargs):
    """Loading the data, as third-party code inside a stage would: log, warn, print."""
    logging.getLogger("transformers.tokenization_utils").warning(CHATTER[0])
    warnings.warn(CHATTER[1], UserWarning, stacklevel=1)
    print(CHATTER[2])
    return load_stage_data(*args, **kwargs)


load_stage_data = stage.load_stage_data


def test_the_console_is_short_and_the_log_complete(tmp_path, tiny_model_dir, capfd, monkeypatch):
    monkeypatch.setattr(stage, "load_stage_data", chatty_stage_data)
    recipe, run_dir = tiny_workflow(tmp_path, tiny_model_dir), tmp_path / "run"
    assert main(["run", recipe, "--output-dir", str(run_dir)]) == 0
    shown = capfd.readouterr()
    lines = (shown.out + shown.err).splitlines()
    assert len(lines) <= 25, "\n".join(lines)
    assert shown.err == ""
    for sid, kind in (("sft", "sft"), ("final", "merge"), ("eval", "eval"), ("card", "card")):
        assert f"== {sid} ({kind}): running" in lines
    assert sum(line.startswith("sft: ") for line in lines) == 1  # the stage's header
    assert sum(line.startswith("sft done: 2 steps") for line in lines) == 1
    assert sum("step 2/2" in line for line in lines) == 1  # the progress display, as it ended
    assert sum(line.startswith("eval done in") for line in lines) == 1
    assert any("ARC-Easy" in line or "arc_easy" in line for line in lines)
    assert "learning_rate" not in shown.out  # no config dump: it is in config.yaml
    for text in CHATTER:
        assert text not in shown.out
    for log in (run_dir / "log.txt", run_dir / "sft" / "log.txt"):
        logged = log.read_text()
        assert all(text in logged for text in CHATTER) and "sft done: 2 steps" in logged
    assert "learning_rate" in (run_dir / "sft" / "config.yaml").read_text()
    assert (run_dir / "eval" / "log.txt").is_file() and (run_dir / "final" / "log.txt").is_file()

    args = ["run", recipe, "--output-dir", str(run_dir), "--from", "sft", "--until", "sft", "-v"]
    assert main(args) == 0
    shown = capfd.readouterr()
    assert CHATTER[0] in shown.err and CHATTER[1] in shown.err and CHATTER[2] in shown.out
