"""The console: other libraries' output goes to the log, alignkit's lines to the terminal."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from alignkit import console
from alignkit.console import captured, last_drawn, note, say


@pytest.fixture
def verbose():
    console.set_verbose(True)
    yield
    console.set_verbose(False)


def chatter() -> None:
    """What third-party code does: log, warn, print, and draw a progress bar."""
    logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
    logging.getLogger("lm_eval.evaluator").warning("Overwriting default num_fewshot")
    warnings.warn("a library warning", UserWarning, stacklevel=1)
    print("a stray print")
    for done in (0, 50, 100):
        sys.stderr.write(f"\rGenerating dev split: {done}%")
    sys.stderr.write("\n")


def test_other_libraries_go_to_the_log_and_alignkit_lines_to_the_terminal(tmp_path, capsys):
    with captured(tmp_path / "log.txt"):
        say("sft: 8 train rows")
        chatter()
        note("data a.jsonl: 8 rows")
    shown = capsys.readouterr()
    assert shown.out == "sft: 8 train rows\n" and shown.err == ""
    log = (tmp_path / "log.txt").read_text()
    for line in (
        "sft: 8 train rows",
        "WARNING transformers.modeling_utils: a transformers warning",
        "WARNING lm_eval.evaluator: Overwriting default num_fewshot",
        "UserWarning: a library warning",
        "a stray print",
        "data a.jsonl: 8 rows",
    ):
        assert line in log
    # a redrawn bar is logged once, as last drawn
    assert log.count("Generating dev split") == 1 and "Generating dev split: 100%\n" in log


def test_verbose_shows_them_on_the_terminal_too(tmp_path, capsys, verbose):
    with captured(tmp_path / "log.txt"):
        chatter()
        note("a detail")
    shown = capsys.readouterr()
    assert "a transformers warning" in shown.err and "a library warning" in shown.err
    assert "a stray print" in shown.out and "a detail" in shown.out
    assert "a transformers warning" in (tmp_path / "log.txt").read_text()


def test_everything_is_put_back_and_an_error_reaches_the_log_and_the_caller(tmp_path, capsys):
    before = (sys.stdout, sys.stderr, warnings.showwarning)
    handlers = logging.getLogger("transformers").handlers[:]
    with pytest.raises(ValueError, match="broke"), captured(tmp_path / "log.txt"):
        raise ValueError("broke")
    assert (sys.stdout, sys.stderr, warnings.showwarning) == before
    assert logging.getLogger("transformers").handlers == handlers
    assert "ValueError: broke" in (tmp_path / "log.txt").read_text()
    print("after")
    assert capsys.readouterr().out == "after\n"


def test_a_held_log_gets_its_file_later_and_an_outer_log_holds_the_inner_ones(tmp_path, capsys):
    with captured(tmp_path / "run.txt"), captured() as stage:
        print("before the dir exists")
        stage.attach(tmp_path / "stage" / "log.txt")
        print("after")
    for name in ("run.txt", "stage/log.txt"):
        text = (tmp_path / name).read_text()
        assert "before the dir exists\nafter\n" in text
    assert capsys.readouterr().out == ""


def test_last_drawn():
    assert last_drawn("\r 10%\r 50%\r100%") == "100%"
    assert last_drawn("done\r") == "done"
    assert last_drawn("plain") == "plain"
