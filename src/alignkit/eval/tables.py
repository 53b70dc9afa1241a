"""Benchmark comparison tables from `alignkit eval` results.

A results dict holds `model` (a column label), `limit` (items per benchmark, or None)
and `summary`: {task: {"label": row label, "metric": metric name, "value": 0..1,
"note": how the figure differs from the standard one, optional}}.
"""

from __future__ import annotations

from typing import Any

MARKS = "†‡§¶"


def row_notes(results: list[dict[str, Any]]) -> dict[str, str]:
    """Each distinct note, in first-seen order, mapped to its footnote mark."""
    notes: dict[str, str] = {}
    for r in results:
        for item in r["summary"].values():
            note = item.get("note")
            if note and note not in notes:
                notes[note] = MARKS[len(notes) % len(MARKS)] * (1 + len(notes) // len(MARKS))
    return notes


def comparison_table(results: list[dict[str, Any]]) -> str:
    """Markdown: rows = benchmarks, columns = models (values in %), best of a row in bold.

    Footnotes say how offline figures were made and when a run was partial (`--limit`).
    """
    marks = row_notes(results)
    rows: dict[str, str] = {}
    for r in results:
        for task, item in r["summary"].items():
            mark = marks.get(item.get("note") or "")
            rows.setdefault(task, item.get("label", task) + (f" {mark}" if mark else ""))
    lines = [
        "| benchmark | " + " | ".join(r["model"] for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for task, label in rows.items():
        values = [r["summary"].get(task, {}).get("value") for r in results]
        present = [v for v in values if v is not None]
        best = max(present) if len(present) > 1 else None
        cells = [
            "–" if v is None else (f"**{100 * v:.2f}**" if v == best else f"{100 * v:.2f}")
            for v in values
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    footer = [f"{mark} Offline data: {note}." for note, mark in marks.items()]
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
    return "\n".join(lines) + ("\n\n" + "\n\n".join(footer) if footer else "")
