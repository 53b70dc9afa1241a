"""Eval outputs people look at: the markdown comparison table and a bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit import rundir
from alignkit.eval.tables import comparison_table, row_labels


def bar_heights(results: list[dict[str, Any]], rows: list[str]) -> list[tuple[list, list]]:
    """Per model: each row's value and standard error in % (nan where none was recorded)."""
    heights = []
    for r in results:
        items = [r["summary"].get(task, {}) for task in rows]
        heights.append(
            ([_percent(i.get("value")) for i in items], [_percent(i.get("stderr")) for i in items])
        )
    return heights


def _percent(value: float | None) -> float:
    return float("nan") if value is None else 100 * value


def plot_comparison(results: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: one group per benchmark row, one bar per model, values in %, with
    error bars of one standard error."""
    from alignkit.plots import plt, save_figure  # plots selects the Agg backend first

    rows = row_labels(results)
    width = 0.8 / max(len(results), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) * max(1, len(results)) ** 0.5), 4.5))
    for i, (r, (values, errors)) in enumerate(
        zip(results, bar_heights(results, list(rows)), strict=True)
    ):
        positions = [j + (i - (len(results) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(positions, values, width, yerr=errors, capsize=3, label=r["model"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(
        range(len(rows)), [label.replace(" (", "\n(") for label in rows.values()], fontsize=7
    )
    ax.set_ylabel("score (%), ± 1 standard error")
    ax.set_ylim(bottom=0)
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
