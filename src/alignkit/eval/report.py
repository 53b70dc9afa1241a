"""Eval outputs people look at: the markdown comparison table and a bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit import rundir
from alignkit.eval.tables import comparison_table


def plot_comparison(results: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: one group per benchmark row, one bar per model, values in %."""
    from alignkit.plots import plt, save_figure  # plots selects the Agg backend first

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
    ax.set_xticks(
        range(len(rows)), [label.replace(" (", "\n(") for label in rows.values()], fontsize=7
    )
    ax.set_ylabel("score (%)")
    limits = {r.get("limit") for r in results} - {None}
    title = "Benchmarks" + (f" (at most {max(limits)} items each)" if limits else "")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_comparison(results: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """comparison.md and comparison.png in `out`."""
    table = rundir.write_text(
        out / rundir.TABLE, "# Benchmark comparison\n\n" + comparison_table(results) + "\n"
    )
    return table, plot_comparison(results, out / rundir.CHART)
