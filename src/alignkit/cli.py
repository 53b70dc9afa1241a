"""The `alignkit` command: subcommands, each a thin shell over a library function.

Every subcommand takes `--config RECIPE.yaml` and dotted overrides
(`--data.max_length 512` or `data.max_length=512`). Short flags such as `--format`
are aliases of config keys and take their help text from the config field.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from alignkit import __version__
from alignkit.config import DataSource, Recipe, field_help, help_text, load_recipe, parse_overrides
from alignkit.errors import AlignkitError

# flag -> config key; the key's field help is the flag's help
ALIASES = {
    "--model": "model.name_or_path",
    "--chat-template": "model.chat_template",
    "--dtype": "model.dtype",
    "--device": "model.device",
    "--max-length": "data.max_length",
    "--max-prompt-length": "data.max_prompt_length",
    "--truncation": "data.truncation",
    "--train-on-prompt": "data.train_on_prompt",
    "--strict": "data.strict",
    "--max-new-tokens": "generation.max_new_tokens",
    "--temperature": "generation.temperature",
    "--top-p": "generation.top_p",
    "--top-k": "generation.top_k",
    "--repetition-penalty": "generation.repetition_penalty",
    "--seed": "generation.seed",
    "--output-dir": "train.output_dir",
    "--overwrite": "train.overwrite",
    "--packing": "train.packing",
    "--resume": "train.resume",
    "--loss": "pref.loss",
    "--loss-weights": "pref.loss_weights",
    "--beta": "pref.beta",
    "--label-smoothing": "pref.label_smoothing",
    "--rpo-alpha": "pref.rpo_alpha",
    "--ref-model": "pref.ref_model",
    "--precompute-ref": "pref.precompute_ref",
}
# flags that take no value; the value they set
FLAG_VALUES = {
    "data.train_on_prompt": "true",
    "data.strict": "true",
    "train.overwrite": "true",
    "train.packing": "true",
    "train.resume": "auto",
    "pref.precompute_ref": "true",
}


def _add_aliases(parser: argparse.ArgumentParser, flags: list[str]) -> None:
    for flag in flags:
        key = ALIASES[flag]
        if key in FLAG_VALUES:
            parser.add_argument(
                flag,
                dest=key,
                action="store_const",
                const=FLAG_VALUES[key],
                default=argparse.SUPPRESS,
                help=field_help(key),
            )
        else:
            parser.add_argument(
                flag,
                dest=key,
                default=argparse.SUPPRESS,
                help=field_help(key),
                metavar=key.rsplit(".", 1)[-1].upper(),
            )


def _subparser(
    subparsers: argparse._SubParsersAction,
    name: str,
    summary: str,
    sections: list[str],
    flags: list[str],
    aliases: tuple[str, ...] | list[str] = (),
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        aliases=list(aliases),
        help=summary,
        description=summary,
        epilog=help_text(Recipe, sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", help="Recipe YAML file; flags and overrides apply on top of it."
    )
    _add_aliases(parser, flags)
    return parser


def _recipe(args: argparse.Namespace, extra: list[str]) -> Recipe:
    overrides = [(k, v) for k, v in vars(args).items() if "." in k and v is not None]
    return load_recipe(args.config, overrides + parse_overrides(extra))


def cmd_data_inspect(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.data.inspect import inspect_source, print_report

    recipe = _recipe(args, extra)
    source = DataSource(path=args.path, format=args.format, split=args.split)
    print_report(inspect_source(recipe, source))


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.chat import chat_once

    recipe = _recipe(args, extra)
    if args.prompt is None:
        raise AlignkitError("Pass --prompt TEXT for a one-shot answer.")
    print(chat_once(recipe, args.prompt, args.system))


def cmd_sft(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.train.sft import train_sft

    train_sft(_recipe(args, extra))


def cmd_pref(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.train.pref import train_pref

    train_pref(_recipe(args, extra))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit",
        description="Post-train open language models: SFT, preference optimization, merge, eval, chat.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = subparsers.add_parser("data", help="Look at training data.", allow_abbrev=False)
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    inspect = _subparser(
        data_sub,
        "inspect",
        "Detected format, row count, token-length percentiles, truncation counts and a rendered example.",
        ["model", "data"],
        [
            "--model",
            "--chat-template",
            "--max-length",
            "--max-prompt-length",
            "--truncation",
            "--train-on-prompt",
            "--strict",
        ],
    )
    inspect.add_argument("path", help="A data file or hub dataset id.")
    inspect.add_argument("--format", default="auto", help=field_help("format", DataSource))
    inspect.add_argument("--split", default="train", help=field_help("split", DataSource))
    inspect.set_defaults(handler=cmd_data_inspect)

    chat = _subparser(
        subparsers,
        "chat",
        "Chat with a model (one-shot with --prompt).",
        ["model", "generation"],
        [
            "--chat-template",
            "--dtype",
            "--device",
            "--max-new-tokens",
            "--temperature",
            "--top-p",
            "--top-k",
            "--repetition-penalty",
            "--seed",
        ],
    )
    chat.add_argument(
        "model.name_or_path", nargs="?", metavar="MODEL", help=field_help("model.name_or_path")
    )
    chat.add_argument("--prompt", help="Answer this one message and exit.")
    chat.add_argument("--system", help="System message for the conversation.")
    chat.set_defaults(handler=cmd_chat)

    sft = _subparser(
        subparsers,
        "sft",
        "Supervised fine-tuning (full weights, LoRA or QLoRA).",
        ["model", "lora", "data", "train"],
        [
            "--model",
            "--chat-template",
            "--max-length",
            "--train-on-prompt",
            "--output-dir",
            "--overwrite",
            "--resume",
            "--packing",
        ],
    )
    sft.set_defaults(handler=cmd_sft)

    pref = _subparser(
        subparsers,
        "pref",
        "Preference optimization (DPO, APO, IPO, KTO, ORPO, SimPO, ...) with LoRA, QLoRA or full weights.",
        ["model", "lora", "data", "train", "pref"],
        [
            "--model",
            "--chat-template",
            "--max-length",
            "--max-prompt-length",
            "--output-dir",
            "--overwrite",
            "--resume",
            "--loss",
            "--loss-weights",
            "--beta",
            "--label-smoothing",
            "--rpo-alpha",
            "--ref-model",
            "--precompute-ref",
        ],
        aliases=["dpo"],
    )
    pref.set_defaults(handler=cmd_pref)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    handler: Callable = args.handler
    try:
        handler(args, extra)
    except AlignkitError as exc:
        Console(stderr=True).print(
            f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
