"""Benchmark comparison tables from `alignkit eval` results.

A results dict holds `model` (a column label), `limit` (items per benchmark, or None)
and `summary`: {task: {"label": row label, "metric": metric name, "value": 0..1}}.
"""

from __future__ import annotations

from typing import Any


def comparison_table(results: list[dict[str, Any]]) -> str:
    """Markdown: rows = benchmarks, columns = models (values in %), best of a row in bold."""
    tasks: dict[str, str] = {}
    for r in results:
        for task, item in r["summary"].items():
            tasks.setdefault(task, item.get("label", task))
    lines = ["| benchmark | " + " | ".join(r["model"] for r in results) + " |",
             "|---|" + "---:|" * len(results)]  # fmt: skip
    for task, label in tasks.items():
        values = [r["summary"].get(task, {}).get("value") for r in results]
        present = [v for v in values if v is not None]
        best = max(present) if len(present) > 1 else None
        cells = ["–" if v is None else (f"**{100 * v:.2f}**" if v == best else f"{100 * v:.2f}")
                 for v in values]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
