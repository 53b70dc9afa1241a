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
from pathlib import Path

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
# `alignkit eval` flags -> eval.* keys (its --output-dir is not the training one)
EVAL_ALIASES = {
    "--tasks": "eval.tasks",
    "--limit": "eval.limit",
    "--batch-size": "eval.batch_size",
    "--num-fewshot": "eval.num_fewshot",
    "--apply-chat-template": "eval.apply_chat_template",
    "--max-gen-toks": "eval.max_gen_toks",
    "--offline": "eval.offline",
    "--output-dir": "eval.output_dir",
    "--overwrite": "eval.overwrite",
}
# flags that take no value; the value they set
FLAG_VALUES = {
    "eval.apply_chat_template": "true",
    "eval.offline": "true",
    "eval.overwrite": "true",
    "data.train_on_prompt": "true",
    "data.strict": "true",
    "train.overwrite": "true",
    "train.packing": "true",
    "train.resume": "auto",
    "pref.precompute_ref": "true",
}


def _add_aliases(
    parser: argparse.ArgumentParser, flags: list[str], table: dict[str, str] = ALIASES
) -> None:
    for flag in flags:
        key = table[flag]
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
    from alignkit.chat import open_session, run_repl

    session = open_session(_recipe(args, extra), args.system)
    if args.prompt is not None:
        print(session.reply(args.prompt))
        return

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_repl(session, input, write)


def cmd_sft(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.train.sft import train_sft

    train_sft(_recipe(args, extra))


def cmd_pref(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.train.pref import train_pref

    train_pref(_recipe(args, extra))


def cmd_merge(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.merge import merge_adapter

    if extra:
        raise AlignkitError(f"alignkit merge takes no settings; got {' '.join(extra)}.")
    out = merge_adapter(args.adapter_dir, Path(args.out), args.dtype, args.overwrite)
    print(f"merged model written to {out}")


def cmd_card(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.card import write_card

    if extra:
        raise AlignkitError(f"alignkit card takes no settings; got {' '.join(extra)}.")
    out = write_card([Path(p) for p in args.run_dirs], [Path(p) for p in args.eval or []],
                     Path(args.out) if args.out else None, args.name, args.overwrite)  # fmt: skip
    print(f"model card written to {out}")


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> None:
    if args.compare:
        from alignkit.eval.report import load_results, write_comparison

        if args.models:
            raise AlignkitError("Pass either MODEL... to evaluate or --compare DIR..., not both.")
        recipe = _recipe(args, extra)
        out = Path(recipe.eval.output_dir) if recipe.eval.output_dir else Path(args.compare[0])
        table, chart = write_comparison(load_results([Path(p) for p in args.compare]), out)
        print(table.read_text(encoding="utf-8"))
        print(f"table: {table}\nchart: {chart}")
        return
    from alignkit.eval.run import evaluate_models

    if not args.models:
        raise AlignkitError("Name at least one MODEL to evaluate (or `default`).")
    evaluate_models(args.models, _recipe(args, extra))


def cmd_run(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.workflow import describe, load_workflow, run_workflow, validate

    workflow = load_workflow(args.recipe, extra)
    run_dir = Path(args.output_dir or f"runs/{workflow.name}")
    if args.dry_run:
        notes = validate(workflow)
        print(describe(workflow, run_dir))
        print("\nchecks:\n" + "\n".join(f"  {n}" for n in notes))
        print("\nrecipe is valid (dry run: nothing was trained)")
        return
    run_workflow(workflow, run_dir, args.start, args.until)


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.serve import serve

    serve(_recipe(args, extra), args.host, args.port, args.api_key, args.served_name)


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
        "Chat with a model: interactive (streamed answers, /reset, /system TEXT, /exit) or one-shot with --prompt.",
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

    merge = subparsers.add_parser(
        "merge", help="Merge a LoRA adapter into its base: plain safetensors weights.",
        description="Merge a LoRA adapter (from sft or pref) into its base model and save full "
        "safetensors weights with the tokenizer and chat template; loads with transformers alone.",
        allow_abbrev=False,
    )  # fmt: skip
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="A run's adapter output dir.")
    merge.add_argument("--out", required=True, help="Directory for the merged model.")
    merge.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="Saved weight dtype; auto = the base checkpoint's dtype.")  # fmt: skip
    merge.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out.")
    merge.set_defaults(handler=cmd_merge)

    card = subparsers.add_parser(
        "card", help="Write a Hugging Face model card from runs' saved artifacts.",
        description="Write README.md (model card) from training run dirs, in stage order, "
        "and alignkit eval results; every number comes from those files.",
        allow_abbrev=False,
    )  # fmt: skip
    card.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="Run dirs, first stage first; the last is the model.",
    )
    card.add_argument(
        "--eval",
        nargs="+",
        metavar="RESULTS",
        help="alignkit eval results.json files or dirs, base model first.",
    )
    card.add_argument("--out", help="Card path; default RUN_DIR/README.md of the last run dir.")
    card.add_argument("--name", help="Model name in the card; default the last run dir's name.")
    card.add_argument(
        "--overwrite", action="store_true", help="Replace a README.md alignkit did not write."
    )
    card.set_defaults(handler=cmd_card)

    evaluate = _subparser(
        subparsers,
        "eval",
        "Benchmarks through lm-evaluation-harness (IFEval, GSM8K, MMLU, TruthfulQA, ...), "
        "online or on the shipped offline copies; a comparison table and chart.",
        ["model", "eval"],
        ["--chat-template", "--dtype", "--device"],
    )
    _add_aliases(evaluate, list(EVAL_ALIASES), EVAL_ALIASES)
    evaluate.add_argument(
        "models", nargs="*", metavar="MODEL",
        help="Models to evaluate, base first: hub id, local or adapter dir, .gguf, default.",
    )  # fmt: skip
    evaluate.add_argument(
        "--compare", nargs="+", metavar="DIR",
        help="Re-render the table and chart from saved results (no evaluation).",
    )  # fmt: skip
    evaluate.set_defaults(handler=cmd_eval)

    run = subparsers.add_parser(
        "run", help="Run a workflow recipe's stages (sft, pref, merge, eval, card) in order.",
        description="Run the stages a recipe lists, each in its own subdirectory of the run dir; "
        "finished unchanged stages are skipped, an interrupted stage resumes, a changed stage "
        "reruns with everything after it. Overrides: key=value (every stage) or "
        "<stage id>.key=value.",
        allow_abbrev=False,
    )  # fmt: skip
    run.add_argument("recipe", metavar="RECIPE", help="Workflow recipe YAML (with `stages`).")
    run.add_argument("--output-dir", help="Run dir; default runs/<recipe name>.")
    run.add_argument("--dry-run", action="store_true",
                     help="Validate the recipe, data, model and LoRA targets; print the plan.")  # fmt: skip
    run.add_argument("--from", dest="start", metavar="STAGE", help="Rerun from this stage on.")
    run.add_argument("--until", metavar="STAGE", help="Stop after this stage.")
    run.set_defaults(handler=cmd_run)

    serve = _subparser(
        subparsers,
        "serve",
        "Serve a model over an OpenAI-compatible HTTP API (chat, completions, models, health).",
        ["model"],
        ["--chat-template", "--dtype", "--device"],
    )
    serve.add_argument(
        "model.name_or_path", nargs="?", metavar="MODEL", help=field_help("model.name_or_path")
    )
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind; loopback by default.")
    serve.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    serve.add_argument("--api-key", help="Require Authorization: Bearer KEY on /v1 routes.")
    serve.add_argument("--served-name", help="Model id the API reports; default MODEL.")
    serve.set_defaults(handler=cmd_serve)
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
