"""Benchmark tables: every figure with its standard error, whole or partial runs named,
and a change between models weighed against twice its combined standard error."""

from __future__ import annotations

from alignkit.eval.tables import change, change_table, comparison_table, coverage, figure


def result(model: str, limit: int | None = None, **figures) -> dict:
    """A results dict: figures are name=(value, stderr, items, total)."""
    summary = {
        name: {
            "label": name.upper(),
            "metric": "acc",
            "value": value,
            "stderr": stderr,
            "items": items,
            "total_items": total,
        }
        for name, (value, stderr, items, total) in figures.items()
    }
    return {"model": model, "limit": limit, "summary": summary}


def test_a_figure_carries_its_standard_error():
    assert figure({"value": 0.625, "stderr": 0.183}) == "62.5 ± 18.3"
    assert figure({"value": 0.625, "stderr": 0.183}, bold=True) == "**62.5** ± 18.3"
    assert figure({"value": 0.625}) == "62.5"  # results written before standard errors


def test_coverage_says_whole_or_partial():
    whole, partial = (
        result("m", arc=(0.5, 0.01, 1172, 1172)),
        result("m", 8, arc=(0.5, 0.2, 8, 1172)),
    )
    assert coverage(whole, whole["summary"]["arc"]) == "all 1172 items"
    assert coverage(partial, partial["summary"]["arc"]) == "partial: 8 of 1172 items"
    old = {"model": "m", "limit": 8, "summary": {"arc": {"value": 0.5, "items": 8}}}
    assert coverage(old, old["summary"]["arc"]) == "partial: 8 items"


def test_the_table_shows_values_with_standard_errors_and_the_items_scored():
    table = comparison_table(
        [
            result("base", 8, arc=(0.375, 0.183, 8, 1172), mmlu=(0.25, 0.15, 8, 14042)),
            result("final", 8, arc=(0.625, 0.183, 8, 1172), mmlu=(0.25, 0.15, 8, 14042)),
        ]
    )
    assert "| benchmark | base | final | items |" in table
    assert "| ARC | 37.5 ± 18.3 | **62.5** ± 18.3 | partial: 8 of 1172 items |" in table
    assert "| MMLU | **25.0** ± 15.0 | **25.0** ± 15.0 | partial: 8 of 14042 items |" in table
    assert "± is the standard error" in table and "at most 8 items per benchmark" in table


def test_the_table_names_weights_scored_in_another_dtype_than_float32():
    base, final = result("base", arc=(0.5, 0.01, 10, 10)), result("final", arc=(0.6, 0.01, 10, 10))
    assert "Weights scored in" not in comparison_table([base, final])
    table = comparison_table([{**base, "dtype": "bfloat16"}, {**final, "dtype": "float32"}])
    assert "Weights scored in bfloat16 (base), float32 (final)." in table
    # results written before the dtype was recorded (on a GPU, `auto` was bfloat16)
    table = comparison_table([base, {**final, "dtype": "float32"}])
    assert "Weights scored in a dtype not recorded (base), float32 (final)." in table


def test_a_change_beyond_twice_the_combined_standard_error_and_one_within():
    # 30.0 -> 50.0: +20 points; combined SE = sqrt(2^2 + 2^2) = 2.83, 2 SE = 5.7 < 20
    assert change({"value": 0.3, "stderr": 0.02}, {"value": 0.5, "stderr": 0.02}) == (
        "+20.0 ± 2.8: **beyond 2 SE**"
    )
    # 30.0 -> 40.0: +10 points; combined SE = sqrt(10^2 + 10^2) = 14.1, 2 SE = 28.3 > 10
    assert change({"value": 0.3, "stderr": 0.1}, {"value": 0.4, "stderr": 0.1}) == (
        "+10.0 ± 14.1: within 2 SE"
    )
    # a drop counts the same way: -20 points against 2 SE = 5.7
    assert "beyond 2 SE" in change({"value": 0.5, "stderr": 0.02}, {"value": 0.3, "stderr": 0.02})
    assert change({"value": 0.3}, {"value": 0.5, "stderr": 0.02}) == "+20.0 (no standard error)"


def test_the_change_table_compares_each_later_model_with_the_first():
    table = change_table(
        [
            result("base", arc=(0.3, 0.02, 10, 10), gsm=(0.3, 0.1, 10, 10)),
            result("sft", arc=(0.35, 0.02, 10, 10), gsm=(0.3, 0.1, 10, 10)),
            result("final", arc=(0.5, 0.02, 10, 10)),
        ]
    )
    assert "| benchmark | base → sft | base → final |" in table
    assert "| ARC | +5.0 ± 2.8: within 2 SE | +20.0 ± 2.8: **beyond 2 SE** |" in table
    assert "| GSM | +0.0 ± 14.1: within 2 SE | – |" in table
