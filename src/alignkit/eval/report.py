"""Eval outputs people look at: the markdown comparison table and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.eval.tables import comparison_table

TABLE = "comparison.md"
CHART = "comparison.png"


def load_results(paths: list[Path]) -> list[dict[str, Any]]:
    """results.json files; a dir means its results.json, or those of its model subdirs."""
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif (path / "results.json").is_file():
            found.append(path / "results.json")
        elif path.is_dir() and (subs := sorted(path.glob("*/results.json"))):
            found.extend(subs)
        else:
            raise AlignkitError(
                f"No eval results at '{path}': pass a results.json, a model's eval dir, or the "
                "--output-dir of an `alignkit eval` run."
            )
    results = []
    for file in found:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise AlignkitError(
                f"'{file}' is not valid JSON ({exc}); re-run alignkit eval."
            ) from None
        if not isinstance(data, dict) or "summary" not in data or "model" not in data:
            raise AlignkitError(
                f"'{file}' is not an alignkit eval results.json (no summary/model)."
            )
        results.append(data)
    return results


def plot_comparison(results: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: one group per benchmark row, one bar per model, values in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, str] = {}
    for r in results:
        for task, item in r["summary"].items():
            rows.setdefault(task, item.get("label", task))
    width = 0.8 / max(len(results), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) * max(1, len(results)) ** 0.5), 4.5))
    for i, r in enumerate(results):
        values = [100 * r["summary"].get(t, {}).get("value", float("nan")) for t in rows]
        positions = [j + (i - (len(results) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(positions, values, width, label=r["model"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(rows)), [label.replace(" (", "\n(") for label in rows.values()],
                  fontsize=7)  # fmt: skip
    ax.set_ylabel("score (%)")
    limits = {r.get("limit") for r in results} - {None}
    title = "Benchmarks" + (f" (at most {max(limits)} items each)" if limits else "")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(results: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """comparison.md and comparison.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / TABLE
    table.write_text(
        "# Benchmark comparison\n\n" + comparison_table(results) + "\n", encoding="utf-8"
    )
    return table, plot_comparison(results, out / CHART)
