"""The comparison chart: one bar per model and benchmark, with standard-error bars."""

from __future__ import annotations

import math

import matplotlib.axes

from alignkit.eval.report import bar_heights, plot_comparison


def test_every_bar_has_an_error_bar_of_one_standard_error(tmp_path, monkeypatch):
    results = [
        {
            "model": name,
            "limit": 8,
            "summary": {
                "arc": {"label": "ARC", "value": value, "stderr": 0.18},
                "gsm8k": {"label": "GSM8K", "value": 0.25},  # no standard error recorded
            },
        }
        for name, value in (("base", 0.375), ("final", 0.625))
    ]
    drawn = []
    errorbar = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, yerr=None, **kwargs):
        drawn.append((list(y), list(yerr)))
        return errorbar(self, x, y, *args, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    path = plot_comparison(results, tmp_path / "chart.png")
    assert path.stat().st_size > 5_000
    assert [values for values, _ in drawn] == [[37.5, 25.0], [62.5, 25.0]]
    assert [errors[0] for _, errors in drawn] == [18.0, 18.0]
    assert all(math.isnan(errors[1]) for _, errors in drawn)
    assert bar_heights(results, ["arc"]) == [([37.5], [18.0]), ([62.5], [18.0])]
