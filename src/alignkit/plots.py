"""Training curves as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from alignkit import rundir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(records: list[dict[str, float]], panels: list[list[str]], path: Path) -> Path:
    """One panel per group of metric names, each plotted against the step."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, names in zip(axes[0], panels, strict=True):
        for name in names:
            points = [(r["step"], r[name]) for r in records if name in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_title(" / ".join(names))
        ax.grid(alpha=0.3)
        if any(name in r for r in records for name in names):
            ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """A PNG written atomically; the figure is closed."""
    with rundir.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
