"""How a command line is declared: commands, their arguments, and flags derived from
config fields (a flag's help is its field's help; a bool field's flag takes no value)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from alignkit.config import DataSource, Recipe, field_help, leaf_fields

Handler = Callable[[argparse.Namespace, list[str]], None]


@dataclass(frozen=True)
class Arg:
    """One `add_argument` call: a positional name or option flags, and its keywords."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """A subcommand. `sections` set makes it a recipe command: `--config`, the recipe
    sections in its `--help` epilog, and a flag per config key in `keys`."""

    name: str
    summary: str
    handler: Handler
    sections: tuple[str, ...] | None = None
    keys: tuple[str, ...] = ()
    args: tuple[Arg, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str | None = None


@dataclass(frozen=True)
class Group:
    """A command with subcommands of its own (`alignkit data inspect`)."""

    name: str
    summary: str
    commands: tuple[Command, ...]


def port(text: str) -> int:
    """An argparse type: a TCP port number."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (1 to 65535)")
    return int(text)


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return int(text)


def arg(*flags: str, **kwargs: Any) -> Arg:
    return Arg(flags, kwargs)


# config key -> its flag, where the flag is not --<last key part>
FLAG_NAMES = {"model.name_or_path": "--model"}
# two-valued Literal fields whose default is one of these become value-less switches
_OFF_VALUES = ("no", "off", "none", "false")


def flag_name(key: str) -> str:
    """The flag of a config key: `data.max_length` -> `--max-length`."""
    return FLAG_NAMES.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


def switch_value(key: str) -> str | None:
    """What a value-less flag for `key` sets: "true" for a bool field, the other value
    for a no/yes-style two-valued Literal; None when the flag takes a value."""
    tp, f = leaf_fields(Recipe)[key]
    if tp is bool or set(get_args(tp)) == {bool, type(None)}:
        return "true"
    values = get_args(tp)
    if get_origin(tp) is Literal and len(values) == 2 and f.default in _OFF_VALUES:
        return next(v for v in values if v != f.default)
    return None


def key_arg(key: str) -> Arg:
    """The flag aliasing a config key: dest is the key, help is the field's help."""
    kwargs: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": field_help(key)}
    const = switch_value(key)
    if const is None:
        kwargs["metavar"] = key.rsplit(".", 1)[-1].upper()
    else:
        kwargs.update(action="store_const", const=const)
    return Arg((flag_name(key),), kwargs)


def source_arg(name: str) -> Arg:
    """A `DataSource` field as a flag, with the field's default and help."""
    default = leaf_fields(DataSource)[name][1].default
    return arg(f"--{name}", default=default, help=field_help(name, DataSource))
