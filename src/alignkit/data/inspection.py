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
from alignkit.config import DataConfig, DataSource, Recipe
from alignkit.data.prepared import TokenizedRows, prepare_examples
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


def _percentiles(values: np.ndarray) -> dict[int, int]:
    if not len(values):
        return {}
    return {p: int(np.percentile(values, p, method="higher")) for p in PERCENTILES}


@dataclass(frozen=True)
class Part:
    """Stored items, with the example each comes from (in order)."""

    rows: TokenizedRows
    owner: np.ndarray


def inspect_source(recipe: Recipe, source: DataSource) -> InspectReport:
    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(recipe.model.chat_template, tokenizer)
    examples, source_report = load_source(source, recipe.data.strict)
    # tokenized once at the limit; only what the limit changed is tokenized again
    rows, limited = prepare_examples(examples, tokenizer, template, recipe.data)
    parts = unlimited_parts(examples, rows, tokenizer, template, recipe.data)
    prompts, totals = zip(*(stored_lengths(part.rows) for part in parts), strict=True)
    first = first_item(parts)
    return InspectReport(
        source=source_report,
        lengths=_percentiles(np.concatenate(totals)),
        prompt_lengths=_percentiles(np.concatenate(prompts)),
        at_max_length=limited,
        max_length=recipe.data.max_length,
        example=None if first is None else (first, tokenizer),
    )


def owners(dataset: Any) -> np.ndarray:
    """The example each stored outcome row comes from (a row starts each example's run)."""
    return np.cumsum(np.asarray(dataset.data.column("first"), dtype=bool)) - 1


def unlimited_parts(
    examples: list[Any], rows: TokenizedRows, tokenizer: Any, template: Any, cfg: DataConfig
) -> list[Part]:
    """Every example's items with no length limit: the items at `cfg`'s limit that the
    limit left alone, and the other examples tokenized again without one.

    An example none of whose items was truncated or dropped at `cfg`'s limit has the same
    items with no limit (truncation is the only step the limit decides).
    """
    table = rows.dataset.data
    owner = owners(rows.dataset)
    changed = np.asarray(table.column("truncated"), dtype=bool)
    changed |= ~np.asarray(table.column("dropped").is_null(), dtype=bool)
    again = np.unique(owner[changed])
    unlimited = dataclasses.replace(cfg, max_length=1 << 30, max_prompt_length=(1 << 30) - 1)
    redone, _ = prepare_examples([examples[i] for i in again], tokenizer, template, unlimited)
    stored = owner[rows.index]  # the example of each kept row
    kept = ~np.isin(stored, again)
    return [
        Part(rows.subset(np.flatnonzero(kept)), stored[kept]),
        Part(redone, again[owners(redone.dataset)[redone.index]]),
    ]


def first_item(parts: list[Part]) -> Any | None:
    """The first example's first item (each part's rows are in example order)."""
    present = [part for part in parts if len(part.rows)]
    return min(present, key=lambda part: part.owner[0]).rows[0] if present else None


def value_lengths(column: Any) -> np.ndarray:
    """Each row's list length in an Arrow list column."""
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def list_lengths(rows: TokenizedRows, name: str) -> np.ndarray:
    return value_lengths(rows.dataset.data.column(name).take(rows.index))


def first_true(rows: TokenizedRows, name: str) -> np.ndarray:
    """Per row, the index of the first True in a list-of-bool column (0 when none is)."""
    import pyarrow.compute as pc

    column = rows.dataset.data.column(name).take(rows.index).combine_chunks()
    lengths = value_lengths(column)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(bool)
    row = np.repeat(np.arange(len(lengths)), lengths)
    start = np.cumsum(lengths) - lengths
    trues = np.flatnonzero(values)
    found, at = np.unique(row[trues], return_index=True)
    first = np.zeros(len(lengths), dtype=np.int64)
    first[found] = trues[at] - start[found]
    return first


def stored_lengths(rows: TokenizedRows) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, total tokens) of each stored item: a conversation's prompt is what
    comes before its first trained token; pairs count the longer completion."""
    if not len(rows):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if rows.kind == "sft":
        return first_true(rows, "labels_mask"), list_lengths(rows, "input_ids")
    prompt = list_lengths(rows, "prompt_ids")
    if rows.kind == "pair":
        longer = np.maximum(list_lengths(rows, "chosen_ids"), list_lengths(rows, "rejected_ids"))
        return prompt, prompt + longer
    return prompt, prompt + list_lengths(rows, "completion_ids")


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
