from __future__ import annotations

import pytest

from alignkit.config import (
    DataSource,
    Recipe,
    apply_overrides,
    dump_yaml,
    help_text,
    load_recipe,
    parse_overrides,
    save_recipe,
)
from alignkit.errors import AlignkitError


def test_yaml_then_overrides_in_both_syntaxes(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "model:\n  name_or_path: some/model\n  adapter: lora\n"
        "lora:\n  r: 8\n  target_modules: [q_proj, v_proj]\n"
        "data:\n  sources:\n    - path: a.jsonl\n      weight: 0.5\n    - b.jsonl\n  max_length: 256\n"
    )
    overrides = parse_overrides(["--lora.r", "32", "data.max_length=128", "--data.strict"])
    recipe = load_recipe(recipe_file, overrides)
    assert recipe.model.name_or_path == "some/model"
    assert recipe.lora.r == 32
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.max_length == 128
    assert recipe.data.strict is True
    assert recipe.data.sources == [
        DataSource(path="a.jsonl", weight=0.5),
        DataSource(path="b.jsonl"),
    ]


def test_values_are_coerced_to_field_types(tmp_path):
    # YAML 1.1 reads 1e-5 as a string; the schema makes it a float.
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("generation:\n  temperature: 1e-5\n  top_k: '7'\n")
    recipe = load_recipe(
        recipe_file, [("lora.target_modules", "q_proj,k_proj"), ("data.sources", "x.jsonl")]
    )
    assert recipe.generation.temperature == pytest.approx(1e-5)
    assert recipe.generation.top_k == 7
    assert recipe.lora.target_modules == ["q_proj", "k_proj"]
    assert recipe.data.sources == [DataSource(path="x.jsonl")]


def test_unknown_override_names_closest_key():
    with pytest.raises(AlignkitError) as err:
        load_recipe(None, parse_overrides(["--lora.rank", "4"]))
    message = str(err.value)
    assert "Unknown config key 'lora.rank'" in message
    assert "Did you mean 'lora.r'?" in message
    assert "data.max_length" in message  # the valid keys are listed


def test_unknown_yaml_key_names_file_and_closest_key(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("data:\n  max_lenght: 10\n")
    with pytest.raises(
        AlignkitError, match=r"'data.max_lenght' in '.*r.yaml'.*Did you mean 'data.max_length'"
    ):
        load_recipe(recipe_file)
    recipe_file.write_text("modle:\n  dtype: auto\n")
    with pytest.raises(AlignkitError, match="Did you mean 'model"):
        load_recipe(recipe_file)


def test_bad_values_explain_the_expected_type():
    with pytest.raises(AlignkitError, match="'model.dtype' must be one of auto, float32"):
        load_recipe(None, [("model.dtype", "fp8")])
    with pytest.raises(AlignkitError, match="'data.max_length' must be an integer"):
        load_recipe(None, [("data.max_length", "long")])
    with pytest.raises(AlignkitError, match="must be true or false"):
        load_recipe(None, [("data.strict", "maybe")])


def test_override_syntax_errors():
    with pytest.raises(AlignkitError, match="Unexpected argument 'stray'"):
        parse_overrides(["stray"])
    assert parse_overrides(["--a.b=1", "--c-d.e", "2"]) == [("a.b", "1"), ("c_d.e", "2")]


def test_overrides_do_not_mutate_input():
    data = {"data": {"max_length": 5}}
    out = apply_overrides(data, [("data.max_length", "7")])
    assert data["data"]["max_length"] == 5 and out["data"]["max_length"] == "7"


def test_resolved_config_round_trips_through_saved_yaml(tmp_path):
    recipe = load_recipe(None, [("lora.r", "4"), ("data.sources", "a.jsonl,b.jsonl")])
    path = save_recipe(recipe, tmp_path)
    assert load_recipe(path) == recipe
    assert dump_yaml(recipe) == path.read_text()


def test_every_field_has_help_and_appears_in_help_text():
    text = help_text(Recipe)
    for key in ["model.name_or_path", "lora.alpha", "data.truncation", "generation.top_p"]:
        assert f"--{key}" in text
    assert "(default: " in text and ":  (default" not in text  # no field without help
