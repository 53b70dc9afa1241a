"""Reading what runs wrote: JSON, metrics, eval results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.rundir.names import RESULTS


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The records of a metrics.jsonl (a missing file has none). A last line cut off
    mid-write (a run killed or a full disk) is left out; damage elsewhere is named."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise AlignkitError(
                f"{path} line {number} is not a JSON record; the metrics log is damaged. "
                "Delete that line (or the file, losing the curves) and run again."
            ) from None
    return records


def metric_values(records: list[dict[str, float]], key: str) -> list[float]:
    """Every logged value of one metric, in step order."""
    return [r[key] for r in records if key in r]


def last_value(records: list[dict[str, float]], key: str) -> float | None:
    values = metric_values(records, key)
    return values[-1] if values else None


def first_last(records: list[dict[str, float]], key: str) -> tuple[float, float] | None:
    """The first and last logged value of one metric (None when it was never logged)."""
    values = metric_values(records, key)
    return (values[0], values[-1]) if values else None


# what a training run's result line and summary show of its held-out figures
EVAL_FIGURES = (
    ("eval_loss", "eval loss"),
    ("eval_rewards/accuracies", "eval reward accuracy"),
    ("eval_rewards/margins", "eval margin"),
    ("reward", "reward"),
    ("eval_reward", "held-out reward"),
)


# held-out figures that are a share of pairs, shown with their binomial standard error
PROPORTIONS = ("eval_rewards/accuracies",)


def training_figures(records: list[dict[str, float]]) -> str:
    """The final loss and each held-out figure (first eval -> last eval when it changed);
    a share of held-out pairs with its standard error."""
    parts = []
    if (loss := last_value(records, "loss")) is not None:
        parts.append(f"final loss {loss:.4f}")
    for key, name in EVAL_FIGURES:
        values = metric_values(records, key)
        if not values:
            continue
        digits = 4 if len(values) == 1 else 3
        shown = f"{values[0]:.{digits}f}"
        if len(values) > 1:
            shown += f" → {values[-1]:.{digits}f}"
        if key in PROPORTIONS:
            shown += proportion_error(values[-1], last_value(records, "eval_units"), digits)
        parts.append(f"{name} {shown}")
    return ", ".join(parts) or "no metrics"


def proportion_error(share: float, units: float | None, digits: int) -> str:
    """` ± se (n pairs)`: the binomial standard error sqrt(p (1 - p) / n) of a share of n
    pairs; empty when n was not logged."""
    if not units:
        return ""
    se = math.sqrt(share * (1 - share) / units)
    return f" ± {se:.{digits}f} ({int(units)} pairs)"


# ---------------------------------------------------------------- eval results


def results_files(paths: list[Path], expand: bool = True) -> list[Path]:
    """results.json files: a file as given, a dir's own, or (with `expand`) those of its
    model subdirs, in name order."""
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif (path / RESULTS).is_file():
            found.append(path / RESULTS)
        elif expand and path.is_dir() and (subs := sorted(path.glob(f"*/{RESULTS}"))):
            found.extend(subs)
        else:
            raise AlignkitError(
                f"No eval results at '{path}': pass a {RESULTS}, a model's eval dir, or the "
                "--output-dir of an `alignkit eval` run."
            )
    return found


def load_results(paths: list[Path], expand: bool = True) -> list[dict[str, Any]]:
    """The `alignkit eval` results behind `paths` (see `results_files`), checked."""
    results = []
    for file in results_files(paths, expand):
        try:
            data = read_json(file)
        except json.JSONDecodeError as exc:
            raise AlignkitError(
                f"'{file}' is not valid JSON ({exc}); re-run alignkit eval."
            ) from None
        if not isinstance(data, dict) or "summary" not in data or "model" not in data:
            raise AlignkitError(f"'{file}' is not an alignkit eval {RESULTS} (no summary/model).")
        results.append(data)
    return results
