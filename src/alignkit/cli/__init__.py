"""The `alignkit` command: subcommands, each a thin shell over a library function.

Every subcommand takes `--config RECIPE.yaml` and dotted overrides
(`--data.max_length 512` or `data.max_length=512`). Short flags such as `--format`
are aliases of config keys and take their help text from the config field.
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from alignkit import __version__
from alignkit.cli.spec import Arg, Command, Group, key_arg
from alignkit.cli.table import COMMANDS, CONFIG, VERBOSE
from alignkit.config import Recipe, help_text
from alignkit.console import set_verbose
from alignkit.errors import AlignkitError


def command_args(cmd: Command) -> list[Arg]:
    """Every argument of a command, in `--help` order."""
    recipe = [CONFIG, *map(key_arg, cmd.keys)] if cmd.sections is not None else []
    return [*recipe, *cmd.args, VERBOSE]


def parser_kwargs(cmd: Command) -> dict[str, Any]:
    """`add_parser` keywords: recipe commands list their config keys in the epilog."""
    kwargs: dict[str, Any] = {
        "aliases": list(cmd.aliases),
        "help": cmd.summary,
        "description": cmd.description or cmd.summary,
        "allow_abbrev": False,
    }
    if cmd.sections is not None:
        kwargs["epilog"] = help_text(Recipe, list(cmd.sections))
        kwargs["formatter_class"] = argparse.RawDescriptionHelpFormatter
    return kwargs


def add_command(subparsers: argparse._SubParsersAction, cmd: Command) -> None:
    parser = subparsers.add_parser(cmd.name, **parser_kwargs(cmd))
    for a in command_args(cmd):
        parser.add_argument(*a.flags, **a.kwargs)
    parser.set_defaults(handler=cmd.handler)


def add_commands(
    parser: argparse.ArgumentParser, entries: tuple[Command | Group, ...], dest: str, metavar: str
) -> None:
    """Add `entries` as subcommands of `parser`; a group nests its own under ACTION."""
    subparsers = parser.add_subparsers(dest=dest, metavar=metavar, required=True)
    for entry in entries:
        if isinstance(entry, Group):
            group = subparsers.add_parser(entry.name, help=entry.summary, allow_abbrev=False)
            add_commands(group, entry.commands, f"{entry.name}_command", "ACTION")
        else:
            add_command(subparsers, entry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit",
        description="Post-train open language models: SFT, preference optimization, merge, eval, chat.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    parser.add_argument(*VERBOSE.flags, **{**VERBOSE.kwargs, "default": False})
    add_commands(parser, COMMANDS, dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    handler: Callable = args.handler
    set_verbose(args.verbose)
    try:
        handler(args, extra)
    except AlignkitError as exc:
        return report(str(exc))
    except PermissionError as exc:
        where = exc.filename or "a file or directory this command uses"
        return report(
            f"Permission denied: '{where}'. This user may not read it (or write there, for an "
            "output). Change its permissions, or pass a path this user can use."
        )
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = exc.filename or "the output directory"
        return report(
            f"No space left on the device holding '{where}'. Free some space, then run the "
            "command again (a training run: with --resume, from its last complete checkpoint)."
        )
    finally:
        set_verbose(False)  # -v is for this command only (main may run again in-process)
    return 0


def report(message: str) -> int:
    """An error a user can act on: one message, no traceback, exit code 2."""
    Console(stderr=True).print(
        f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True
    )
    return 2
