"""`alignkit data inspect`: what a data file holds and what tokenization will do to it."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from alignkit.chat_templates import resolve_template
from alignkit.config import DataSource, Recipe
from alignkit.data.prepared import prepare_examples
from alignkit.data.sources import SourceReport, load_source
from alignkit.data.tokenize import (
    IDENTICAL_AFTER_TRUNCATION,
    TokenizedExample,
    TokenizedFeedback,
    TokenizedPair,
    TokenizeReport,
)
from alignkit.models import load_tokenizer

PERCENTILES = (50, 90, 95, 99, 100)


@dataclass
class InspectReport:
    source: SourceReport
    lengths: dict[int, int]
    prompt_lengths: dict[int, int]
    at_max_length: TokenizeReport
    max_length: int
    example: Any


KIND_NAMES = {"sft": "sft conversations", "pair": "preference pairs", "feedback": "feedback"}


def _lengths(item: Any) -> tuple[int, int]:
    """(prompt tokens, total tokens) of a tokenized item; pairs count the longer completion."""
    if isinstance(item, TokenizedExample):
        first_trained = item.labels_mask.index(True) if True in item.labels_mask else 0
        return first_trained, len(item.input_ids)
    if isinstance(item, TokenizedPair):
        return len(item.prompt_ids), len(item.prompt_ids) + max(
            len(item.chosen_ids), len(item.rejected_ids)
        )
    return len(item.prompt_ids), len(item.prompt_ids) + len(item.completion_ids)


def _percentiles(values: list[int]) -> dict[int, int]:
    if not values:
        return {}
    return {p: int(np.percentile(values, p, method="higher")) for p in PERCENTILES}


def inspect_source(recipe: Recipe, source: DataSource) -> InspectReport:
    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(recipe.model.chat_template, tokenizer)
    examples, source_report = load_source(source, recipe.data.strict)
    unlimited = dataclasses.replace(
        recipe.data, max_length=1 << 30, max_prompt_length=(1 << 30) - 1
    )
    full, _ = prepare_examples(examples, tokenizer, template, unlimited)
    _, limited = prepare_examples(examples, tokenizer, template, recipe.data)
    sizes = [_lengths(item) for item in full]
    return InspectReport(
        source=source_report,
        lengths=_percentiles([total for _, total in sizes]),
        prompt_lengths=_percentiles([prompt for prompt, _ in sizes]),
        at_max_length=limited,
        max_length=recipe.data.max_length,
        example=(full[0], tokenizer) if len(full) else None,
    )


def highlight(item: Any, tokenizer: Any) -> Text:
    """The example's text with trained tokens in green (rejected completions in red)."""
    text = Text()

    def add(ids: list[int], style: str, scored: list[bool] | None = None) -> None:
        for token, trained in zip(ids, scored or [True] * len(ids), strict=True):
            text.append(tokenizer.decode([token]), style=style if trained else "dim")

    if isinstance(item, TokenizedExample):
        for token, trained in zip(item.input_ids, item.labels_mask, strict=True):
            text.append(tokenizer.decode([token]), style="bold green" if trained else "dim")
    elif isinstance(item, TokenizedPair):
        add(item.prompt_ids, "dim")
        text.append("\n--- chosen (trained) ---\n", style="bold")
        add(item.chosen_ids, "bold green", item.chosen_mask)
        text.append("\n--- rejected (trained) ---\n", style="bold")
        add(item.rejected_ids, "bold red", item.rejected_mask)
    elif isinstance(item, TokenizedFeedback):
        add(item.prompt_ids, "dim")
        text.append(f"\n--- completion (label={item.label}) ---\n", style="bold")
        add(item.completion_ids, "bold green", item.completion_mask)
    return text


def effect_rows(report: TokenizeReport, kind: str) -> list[tuple[str, int]]:
    """What the template and truncation did to rows of one kind, as (what, count) rows."""
    rows = [("rows", report.rows), ("examples kept", report.kept)]
    if kind == "sft":
        rows += [
            ("rows split by turn", report.split_rows),
            ("examples made by splitting", report.split_examples),
        ]
    rows.append(("truncated", report.truncated))
    dropped = Counter({IDENTICAL_AFTER_TRUNCATION: 0} if kind == "pair" else {})
    dropped.update(report.dropped)
    rows += [(f"dropped: {why}", n) for why, n in dropped.items()]
    if kind != "sft":
        rows.append(("re-tokenized at the prompt boundary", report.retokenized_at_boundary))
    return rows


def effects_table(report: InspectReport) -> Table:
    kind = report.source.kind
    table = Table(title=f"{KIND_NAMES[kind]} at max_length={report.max_length}")
    table.add_column("")
    table.add_column("count", justify="right")
    for what, count in effect_rows(report.at_max_length, kind):
        table.add_row(what, str(count))
    return table


def print_report(report: InspectReport, console: Console | None = None) -> None:
    console = console or Console()
    src = report.source
    console.print(
        f"[bold]{src.path}[/bold]: format [cyan]{src.format}[/cyan] ({src.kind}), {src.rows} rows"
    )
    for reason, count in src.skipped.items():
        console.print(f"  skipped {count} rows: {reason}")
    table = Table(title="token lengths (untruncated)")
    table.add_column("")
    for p in PERCENTILES:
        table.add_column("max" if p == 100 else f"p{p}", justify="right")
    table.add_row("total", *[str(report.lengths.get(p, "-")) for p in PERCENTILES])
    table.add_row("prompt", *[str(report.prompt_lengths.get(p, "-")) for p in PERCENTILES])
    console.print(table)
    console.print(effects_table(report))
    if report.example is not None:
        item, tokenizer = report.example
        console.print("\n[bold]first example[/bold] ([green]green[/green] = trained tokens):")
        console.print(highlight(item, tokenizer))
