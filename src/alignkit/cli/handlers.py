"""What each command does: a thin shell over a library function, imported when run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignkit.config import DataSource, Recipe, load_recipe, parse_overrides
from alignkit.config.check import check
from alignkit.errors import AlignkitError


def _recipe(args: argparse.Namespace, extra: list[str], command: str = "") -> Recipe:
    overrides = [(k, v) for k, v in vars(args).items() if "." in k and v is not None]
    recipe = load_recipe(args.config, overrides + parse_overrides(extra))
    check(recipe, command)
    return recipe


def no_settings(command: str, extra: list[str]) -> None:
    if extra:
        raise AlignkitError(f"alignkit {command} takes no settings; got {' '.join(extra)}.")


def cmd_data_inspect(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.data.inspection import inspect_source, print_report

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


def cmd_online(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.train.online import train_online

    train_online(_recipe(args, extra, "online"))


def cmd_rm(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.train.rm import train_rm

    train_rm(_recipe(args, extra, "rm"))


def cmd_rm_score(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.train.rm import score_file

    out = score_file(args.model, Path(args.file), _recipe(args, extra, "rm"))
    print(f"scores written to {out}")


def cmd_merge(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.merge import merge_adapter

    no_settings("merge", extra)
    out = merge_adapter(args.adapter_dir, Path(args.out).expanduser(), args.dtype, args.overwrite)
    print(f"merged model written to {out}")


def cmd_card(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.card import write_card

    no_settings("card", extra)
    run_dirs = [Path(p) for p in args.run_dirs]
    evals = [Path(p) for p in args.eval or []]
    out = write_card(
        run_dirs, evals, Path(args.out) if args.out else None, args.name, args.overwrite
    )
    print(f"model card written to {out}")


def cmd_push(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.push import push

    no_settings("push", extra)
    push(args.model, args.repo_id, args.private, args.revision, args.dry_run)


def cmd_export(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.export import export_gguf

    no_settings("export", extra)
    out = export_gguf(args.model, Path(args.gguf).expanduser(), args.type, args.overwrite)
    print(f"GGUF ({args.type}) written to {out}")


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> None:
    if args.compare:
        from alignkit.eval.report import write_comparison
        from alignkit.rundir import load_results

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
    from alignkit.workflow import default_run_dir, describe, load_workflow, run_workflow, validate
    from alignkit.workflow.check import batch_plans, launch_world

    workflow = load_workflow(args.recipe, extra)
    run_dir = Path(args.output_dir) if args.output_dir else default_run_dir(workflow)
    if args.dry_run:
        notes = validate(workflow)
        world, main_process = launch_world()
        if not main_process:  # under accelerate launch / torchrun: the plan is printed once
            return
        print(describe(workflow, run_dir))
        print("\nchecks:\n" + "\n".join(f"  {n}" for n in notes))
        print("\nbatches:\n" + "\n".join(f"  {n}" for n in batch_plans(workflow, world)))
        print("\nrecipe is valid (dry run: nothing was trained)")
        return
    run_workflow(workflow, run_dir, args.start, args.until)


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> None:
    from alignkit.serve import api_key, serve

    recipe = _recipe(args, extra)
    key = api_key(args.api_key, args.api_key_file)
    serve(
        recipe,
        args.host,
        args.port,
        key,
        args.served_name,
        args.max_queue,
        max_batch=args.max_batch,
    )
