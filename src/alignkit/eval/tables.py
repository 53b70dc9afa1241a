"""Benchmark comparison tables from `alignkit eval` results.

A results dict holds `model` (a column label), `limit` (items per benchmark, or None)
and `summary`: {task: {"label": row label, "metric": metric name, "value": 0..1,
"stderr": its standard error (0..1, or None), "items": items scored, "total_items":
items in the whole benchmark, "note": how the figure differs from the standard one,
optional}}. Older results without `stderr` or `total_items` still render: a figure
without a standard error shows bare, and one without a total counts as whole unless a
limit was set.
"""

from __future__ import annotations

import math
from typing import Any

MARKS = "†‡§¶"


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def figure(item: dict[str, Any], bold: bool = False) -> str:
    """`62.5 ± 18.3`: the value and its standard error, in percent (the value in bold)."""
    value = f"**{percent(item['value'])}**" if bold else percent(item["value"])
    stderr = item.get("stderr")
    return value if stderr is None else f"{value} ± {percent(stderr)}"


def is_whole(result: dict[str, Any], item: dict[str, Any]) -> bool:
    """Whether every item of the benchmark was scored (without a recorded total: no limit)."""
    total, items = item.get("total_items"), item.get("items")
    if total is not None and items is not None:
        return items >= total
    return result.get("limit") is None


def coverage(result: dict[str, Any], item: dict[str, Any]) -> str:
    """`all 1172 items`, or `partial: 8 of 1172 items`."""
    total, items = item.get("total_items"), item.get("items")
    if is_whole(result, item):
        return f"all {total} items" if total is not None else "all items"
    if items is None:
        return "partial"
    return f"partial: {items} of {total} items" if total is not None else f"partial: {items} items"


def row_notes(results: list[dict[str, Any]]) -> dict[str, str]:
    """Each distinct note, in first-seen order, mapped to its footnote mark."""
    notes: dict[str, str] = {}
    for r in results:
        for item in r["summary"].values():
            note = item.get("note")
            if note and note not in notes:
                notes[note] = MARKS[len(notes) % len(MARKS)] * (1 + len(notes) // len(MARKS))
    return notes


def row_labels(
    results: list[dict[str, Any]], marks: dict[str, str] | None = None
) -> dict[str, str]:
    """Every benchmark row's key and label (with its note's mark), in first-seen order."""
    rows: dict[str, str] = {}
    for r in results:
        for task, item in r["summary"].items():
            mark = (marks or {}).get(item.get("note") or "")
            rows.setdefault(task, item.get("label", task) + (f" {mark}" if mark else ""))
    return rows


def table_row(results: list[dict[str, Any]], task: str, label: str) -> str:
    """One benchmark: each model's figure (the best value in bold), then the items scored."""
    items = [r["summary"].get(task) for r in results]
    values = [item["value"] for item in items if item is not None]
    best = max(values) if len(values) > 1 else None
    cells = ["–" if item is None else figure(item, item["value"] == best) for item in items]
    scored = dict.fromkeys(coverage(r, i) for r, i in zip(results, items, strict=True) if i)
    return f"| {label} | " + " | ".join(cells) + f" | {' / '.join(scored)} |"


def comparison_table(results: list[dict[str, Any]]) -> str:
    """Markdown: rows = benchmarks, columns = models (values in % ± standard error) and
    the items scored; the best of a row in bold.

    Footnotes say how offline figures were made and when a run was partial (`--limit`).
    """
    marks = row_notes(results)
    lines = [
        "| benchmark | " + " | ".join(r["model"] for r in results) + " | items |",
        "|---|" + "---:|" * len(results) + "---|",
    ]
    for task, label in row_labels(results, marks).items():
        lines.append(table_row(results, task, label))
    footer = [f"{mark} Offline data: {note}." for note, mark in marks.items()]
    if any(item.get("stderr") is not None for r in results for item in r["summary"].values()):
        footer.append(
            "± is the standard error (lm-eval's); two figures less than about twice their "
            "combined standard error apart cannot be told apart."
        )
    limits = {r.get("limit") for r in results} - {None}
    if limits:
        footer.append(
            f"Partial evaluation: at most {max(limits)} items per benchmark (`--limit`); "
            "not comparable with full-benchmark figures."
        )
    caps = {s.get("max_gen_toks") for r in results for s in r.get("settings", {}).values()}
    if caps - {None}:
        footer.append(
            f"Generated answers capped at {max(caps - {None})} tokens (`--max-gen-toks`); "
            "IFEval normally allows 1280 and GSM8K 256."
        )
    dtypes = [r.get("dtype") for r in results]  # results written before it: not recorded
    if any(dtypes) and set(dtypes) != {"float32"}:
        shown = ", ".join(
            f"{d or 'a dtype not recorded'} ({r['model']})"
            for d, r in zip(dtypes, results, strict=True)
        )
        footer.append(f"Weights scored in {shown}.")
    return "\n".join(lines) + ("\n\n" + "\n\n".join(footer) if footer else "")


# ---------------------------------------------------------------- changes between models


def change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """`+12.5 ± 9.1: beyond 2 SE`: the change in points, its combined standard error
    sqrt(se_a^2 + se_b^2), and whether the change is larger than twice that."""
    points = 100 * (after["value"] - before["value"])
    if before.get("stderr") is None or after.get("stderr") is None:
        return f"{points:+.1f} (no standard error)"
    combined = 100 * math.hypot(before["stderr"], after["stderr"])
    verdict = "**beyond 2 SE**" if abs(points) > 2 * combined else "within 2 SE"
    return f"{points:+.1f} ± {combined:.1f}: {verdict}"


def change_table(results: list[dict[str, Any]]) -> str:
    """Markdown: each benchmark's change from the first model to each later one."""
    first, later = results[0], results[1:]
    lines = [
        "| benchmark | " + " | ".join(f"{first['model']} → {r['model']}" for r in later) + " |",
        "|---|" + "---:|" * len(later),
    ]
    for task, label in row_labels([first]).items():
        cells = [
            change(first["summary"][task], r["summary"][task]) if task in r["summary"] else "–"
            for r in later
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
