"""The terminal and the log: alignkit's own lines on the terminal, everyone else's in a log.

For the length of a stage, `captured(path)` sends what other libraries print, log and
warn (lm-eval, datasets, transformers, accelerate, peft, tqdm bars) to the stage's
`log.txt` instead of the terminal: their loggers, `warnings.showwarning`, and
`sys.stdout` / `sys.stderr` themselves (a progress bar's redrawn line lands once, as last
drawn). alignkit's own lines (`say`) and live displays (`live_progress`) go to the
terminal as it was before the capture, and into the log as well. Captures nest: a
workflow's run-dir log holds everything its stages' logs hold. `set_verbose(True)`
(`alignkit -v`) shows the other libraries' output on the terminal too. An exception
leaving a capture is written to its log and raised on once the streams are put back,
so it reaches the terminal whole.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import Progress, ProgressColumn

from alignkit import __version__, rundir

# library loggers that keep their own handlers (bound to the terminal): during a capture
# they hand their records to the root logger, where the capture's handler takes them
LIBRARIES = (
    "transformers",
    "datasets",
    "lm_eval",
    "accelerate",
    "huggingface_hub",
    "peft",
    "torch",
    "evaluate",
    "absl",
)
RECORD_FORMAT = "%(levelname)s %(name)s: %(message)s"


class Log:
    """One capture's log: held in memory until `attach` names its file."""

    def __init__(self) -> None:
        self.held: list[str] = []
        self.file: TextIO | None = None

    def write(self, text: str) -> None:
        if self.file is None:
            self.held.append(text)
        else:
            self.file.write(text)

    def attach(self, path: Path) -> None:
        """Write to `path` (appended to) from now on, what was held first."""
        self.file = rundir.open_log(path)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"---- {stamp} alignkit {__version__}\n" + "".join(self.held))
        self.held = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


_logs: list[Log] = []  # the open captures, outermost first
_verbose = False


def set_verbose(on: bool) -> None:
    """Show other libraries' logging, warnings and progress bars on the terminal too."""
    global _verbose
    _verbose = on


def _to_logs(text: str) -> None:
    for log in _logs:
        log.write(text)


def last_drawn(line: str) -> str:
    """What a terminal shows of a line redrawn with carriage returns: its last drawing."""
    return line.rstrip("\r").rsplit("\r", 1)[-1]


class _Stream(io.TextIOBase):
    """`sys.stdout` or `sys.stderr` during a capture: whole lines to every open log, and
    everything to the terminal stream it replaced when verbose (or once the capture ended)."""

    def __init__(self, terminal: TextIO, echo: bool) -> None:
        super().__init__()
        self.terminal, self.echo, self.active, self.pending = terminal, echo, True, ""

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.terminal, "encoding", None) or "utf-8"

    def _shown(self) -> bool:
        return self.echo or not self.active

    def write(self, text: str) -> int:
        if self._shown():
            self.terminal.write(text)
        if self.active:
            lines = (self.pending + text).split("\n")
            self.pending = "\r".join(lines.pop().split("\r")[-2:])  # a bar's last drawing
            for line in lines:
                _to_logs(last_drawn(line) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._shown():
            self.terminal.flush()

    def isatty(self) -> bool:
        return self._shown() and self.terminal.isatty()

    def end(self) -> None:
        """Log an unfinished last line; from now on write to the terminal stream."""
        if last_drawn(self.pending).strip():
            _to_logs(last_drawn(self.pending) + "\n")
        self.pending, self.active = "", False


def _show_warning(
    stream: _Stream,
    message: Any,
    category: Any,
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    stream.write(warnings.formatwarning(message, category, filename, lineno, line))


@dataclass
class _Redirection:
    """What the outermost capture replaced, put back when it ends."""

    stdout: TextIO
    stderr: TextIO
    showwarning: Any
    loggers: dict[str, tuple[list[logging.Handler], bool]]
    streams: tuple[_Stream, _Stream]
    handler: logging.Handler
    terminal: Console


_redirection: _Redirection | None = None


def _redirect() -> _Redirection:
    out, err = _Stream(sys.stdout, _verbose), _Stream(sys.stderr, _verbose)
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(RECORD_FORMAT))
    loggers = {name: logging.getLogger(name) for name in LIBRARIES}
    redirection = _Redirection(
        stdout=sys.stdout,
        stderr=sys.stderr,
        showwarning=warnings.showwarning,
        loggers={name: (lg.handlers[:], lg.propagate) for name, lg in loggers.items()},
        streams=(out, err),
        handler=handler,
        terminal=Console(file=sys.stdout),
    )
    for lg in loggers.values():
        lg.handlers, lg.propagate = [], True
    logging.getLogger().addHandler(handler)
    warnings.showwarning = partial(_show_warning, err)
    sys.stdout, sys.stderr = out, err
    return redirection


def _restore(redirection: _Redirection) -> None:
    for stream in redirection.streams:
        stream.end()
    sys.stdout, sys.stderr = redirection.stdout, redirection.stderr
    warnings.showwarning = redirection.showwarning
    logging.getLogger().removeHandler(redirection.handler)
    for name, (handlers, propagate) in redirection.loggers.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate


@contextmanager
def captured(path: Path | None = None) -> Iterator[Log]:
    """Other libraries' output goes to a log (at `path`, or held until `Log.attach`)
    for the length of the block; alignkit's own lines still reach the terminal."""
    global _redirection
    log = Log()
    if path is not None:
        log.attach(path)
    if not _logs:
        _redirection = _redirect()
    _logs.append(log)
    try:
        yield log
    except BaseException:
        with suppress(OSError):  # a full disk must not hide the error itself
            log.write(traceback.format_exc())
        raise
    finally:
        if _logs == [log] and _redirection is not None:
            _restore(_redirection)
            _redirection = None
        _logs.remove(log)
        with suppress(OSError):
            log.close()


def terminal() -> Console:
    """alignkit's console: the terminal, also while a capture holds `sys.stdout`."""
    return _redirection.terminal if _redirection is not None else Console()


def say(text: str, on: Console | None = None) -> None:
    """A line of alignkit's own: on the terminal (or the console `on`) and in every open log."""
    (on or terminal()).print(text, markup=False, highlight=False, soft_wrap=True)
    _to_logs(text + "\n")


def note(text: str, on: Console | None = None) -> None:
    """A detail: in every open log, and on the terminal too when verbose or no log is open."""
    if _verbose or not _logs:
        (on or terminal()).print(text, markup=False, highlight=False, soft_wrap=True)
    _to_logs(text + "\n")


def live_progress(
    *columns: ProgressColumn | str,
    console: Console | None = None,
    active: bool = True,
    transient: bool = False,
) -> Progress:
    """A live display on the terminal; it leaves `sys.stdout` and `sys.stderr` where a
    capture put them. Where the output is no terminal, it shows once, as it ends (a
    transient one not at all)."""
    console = console or terminal()
    return Progress(
        *columns,
        console=console,
        disable=not active or (transient and not console.is_terminal),
        transient=transient,
        redirect_stdout=False,
        redirect_stderr=False,
    )
