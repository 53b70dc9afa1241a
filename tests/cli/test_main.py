from __future__ import annotations

import subprocess
import sys

import pytest
from support import TRAIN, write_jsonl

from alignkit.cli import main


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "data" in out.stdout and "chat" in out.stdout


def test_subcommand_help_comes_from_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["data", "inspect", "--help"])
    text = capsys.readouterr().out
    assert "Longest tokenized example" in text  # data.max_length's field help, on --max-length
    assert "--data.truncation" in text


@pytest.mark.parametrize("path", sorted(TRAIN.iterdir()), ids=lambda p: p.name)
def test_data_inspect_runs_on_every_shared_train_file(path, capsys):
    assert main(["data", "inspect", str(path), "--max-length", "512"]) == 0
    out = capsys.readouterr().out
    assert (
        "format" in out and "p50" in out and "at max_length=512" in out and "first example" in out
    )


def test_data_inspect_forced_format_and_counts(tmp_path, capsys):
    rows = [{"prompt": "hello", "completion": "world"}, {"prompt": "", "completion": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["data", "inspect", str(path), "--format", "prompt_completion"]) == 0
    out = capsys.readouterr().out
    assert "2 rows" in out and "skipped 1 rows: empty text in 'prompt'" in out


def test_malformed_file_exits_2_with_named_error(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops}\n')
    assert main(["data", "inspect", str(path)]) == 2
    assert "bad.jsonl: line 2 is not valid JSON" in capsys.readouterr().err


def test_cli_process_exit_code_is_2_for_bad_input(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x"}])
    out = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "data", "inspect", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "line 1 has fields [instruction]" in out.stderr
    assert "closest: 'alpaca', which also needs 'output'" in out.stderr


def test_unknown_override_is_an_error_with_suggestion(capsys):
    assert main(["data", "inspect", str(TRAIN / "alpaca_5000.json"), "--data.max_lenght", "5"]) == 2
    assert "Did you mean 'data.max_length'?" in capsys.readouterr().err


def test_chat_one_shot_on_a_tiny_model(tiny_model_dir, capsys):
    assert main(["chat", str(tiny_model_dir), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    reply = capsys.readouterr().out.strip()
    assert isinstance(reply, str) and "<|im_start|>" not in reply


@pytest.mark.slow
def test_bundled_model_answers_through_alignkit_chat():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit.cli",
            "chat",
            "default",
            "--prompt",
            "What is the capital of France? Answer in one sentence.",
            "--max-new-tokens",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_push_dry_run_and_export_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    assert main(["push", str(tiny_model_dir), "--repo-id", "me/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "nothing was uploaded" in out
    gguf = tmp_path / "tiny.gguf"
    assert main(["export", str(tiny_model_dir), "--gguf", str(gguf), "--type", "q8_0"]) == 0
    assert "GGUF (q8_0) written to" in capsys.readouterr().out
    assert main(["export", str(tiny_model_dir), "--gguf", str(gguf)]) == 2
    assert "Pass --overwrite" in capsys.readouterr().err
