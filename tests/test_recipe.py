"""Recipes: loading from every source, and errors that name file, line and key."""

from __future__ import annotations

import textwrap

import pytest

from hfprune import RecipeError, load_recipe
from hfprune.recipe.schema import Recipe

GOOD = textwrap.dedent(r"""
    version: 1
    pruners:
      - strategy: magnitude
        targets: ['re:.*encoder\.layer\.\d+\.(intermediate|output)\.dense', 'Linear']
        exclude: ["classifier"]
        schedule: {start: 0, end: 0.7, every: 10}
        config: {sparsity: 0.8}
""").lstrip()


def error_of(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    return info.value


def test_loads_from_path_string_dict_and_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    from_path = load_recipe(path)
    from_str_path = load_recipe(str(path))
    from_text = load_recipe(GOOD)
    from_dict = load_recipe(from_text.model_dump(mode="json"))
    assert len({r.fingerprint() for r in (from_path, from_str_path, from_text, from_dict)}) == 1
    assert from_path.model_dump() == from_dict.model_dump()
    assert load_recipe(from_path) is from_path
    assert from_path.source == str(path)
    assert from_text.source == "<string>"


def test_defaults_are_filled_and_types_kept():
    recipe = load_recipe(GOOD)
    entry = recipe.pruners[0]
    assert entry.schedule.start == 0 and isinstance(entry.schedule.start, int)
    assert entry.schedule.end == 0.7 and isinstance(entry.schedule.end, float)
    config = recipe.strategy_config(0)
    assert config.sparsity == 0.8 and config.initial_sparsity == 0.0 and config.scope == "layer"


def test_round_trips_through_yaml():
    recipe = load_recipe(GOOD)
    again = load_recipe(recipe.to_yaml())
    assert again.model_dump() == recipe.model_dump() and again.fingerprint() == recipe.fingerprint()


def test_yaml_exponent_without_dot_is_still_a_number():
    # PyYAML reads `1e-1` as a string (YAML 1.1); strategy configs accept it as the number users meant.
    recipe = load_recipe(GOOD.replace("sparsity: 0.8", "sparsity: 1e-1"))
    assert recipe.strategy_config(0).sparsity == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("old", "new", "line", "key", "message"),
    [
        (
            "config: {sparsity: 0.8}",
            "config: {sparsity: 1.5}",
            7,
            "pruners[0].config.sparsity",
            "must be < 1.0",
        ),
        (
            "config: {sparsity: 0.8}",
            "config: {sparsity: 0.8, scop: layer}",
            7,
            "pruners[0].config.scop",
            "unknown key",
        ),
        (
            "config: {sparsity: 0.8}",
            "config: {sparsity: high}",
            7,
            "pruners[0].config.sparsity",
            "valid number",
        ),
        ("config: {sparsity: 0.8}", "config: {}", 7, "pruners[0].config.sparsity", "required key is missing"),
        ("every: 10}", "every: 0}", 6, "pruners[0].schedule.every", "must be >= 1"),
        ("end: 0.7", "end: 1.5", 6, "pruners[0].schedule", "must be in [0, 1]"),
        (
            "start: 0, end: 0.7",
            "start: 0.8, end: 0.7",
            6,
            "pruners[0].schedule",
            "start (0.8) is after end (0.7)",
        ),
        ("schedule: {", "schedule: {when: 3, ", 6, "pruners[0].schedule.when", "unknown key"),
        ("strategy: magnitude", "strategy: magnitud", 3, "pruners[0].strategy", "did you mean 'magnitude'"),
        ('exclude: ["classifier"]', 'exclude: "classifier"', 5, "pruners[0].exclude", "valid list"),
        ("'Linear'", "'re:(bad'", 4, "pruners[0].targets[1]", "invalid regular expression"),
        ("version: 1", "version: 2", 1, "version", "Input should be 1"),
        ("    exclude", "    exlude", 5, "pruners[0].exlude", "unknown key"),
    ],
)
def test_errors_name_line_and_key(old, new, line, key, message):
    assert old in GOOD
    error = error_of(GOOD.replace(old, new))
    assert (error.line, error.key) == (line, key), str(error)
    assert message in str(error)
    assert str(error).startswith(f"<string>:{line}: {key}: ")


def test_unknown_key_hint_lists_allowed_keys():
    error = error_of(GOOD.replace("config: {sparsity: 0.8}", "config: {sparsity: 0.8, scop: layer}"))
    assert error.hint == "allowed keys here: sparsity, initial_sparsity, scope"


def test_unknown_strategy_lists_installed_ones_and_their_distribution():
    error = error_of(GOOD.replace("strategy: magnitude", "strategy: lottery"))
    assert "unknown strategy 'lottery'" in str(error)
    assert (
        "installed strategies: " in str(error)
        and "magnitude (hfprune " in str(error)
        and "block-lasso (hfprune " in str(error)
    )


def test_every_problem_is_reported_at_once_in_line_order():
    text = GOOD.replace("every: 10}", "every: 10, foo: 1}").replace("sparsity: 0.8", "sparsity: 2")
    text += "  - strategy: nope\n    targets: [Linear]\n"
    error = error_of(text)
    assert [p.key for p in error.problems] == [
        "pruners[0].schedule.foo",
        "pruners[0].config.sparsity",
        "pruners[1].strategy",
    ]
    assert [p.line for p in error.problems] == [6, 7, 8]


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD.replace("sparsity: 0.8", "sparsity: -1"))
    error = error_of(str(path))
    assert str(error).startswith(f"{path}:7: pruners[0].config.sparsity: must be >= 0.0")
    for absent in ("absent.yaml", "absent-recipe"):
        missing = error_of(str(tmp_path / absent))
        assert "cannot read recipe" in str(missing) and missing.source.endswith(absent)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 1, "recipe is empty"),
        ("- just\n- a list\n", 1, "a recipe is a mapping"),
        ("version: 1\npruners: [\n", 3, "invalid YAML"),
        ("version: 1\npruners: []\n", 2, "at least 1 item"),
        (
            "pruners:\n  - strategy: magnitude\n    targets: [Linear]\n    config: {sparsity: 0.5}\n",
            1,
            "required key is missing",
        ),
        ("version: 1\nversion: 1\npruners: []\n", 2, "key appears twice"),
    ],
)
def test_malformed_documents(text, line, message):
    error = error_of(text) if text else error_of("\n")
    assert error.line == line and message in str(error), str(error)


def test_python_object_tags_are_refused_not_constructed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"version: 1\npruners: !!python/object/apply:os.system ['touch {marker}']\n"
    error = error_of(text)
    assert "could not determine a constructor" in str(error) and error.line == 2
    assert not marker.exists()


def test_alias_bombs_are_refused():
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 7)
    ]
    error = error_of("\n".join(lines) + "\npruners: []\n")
    assert "YAML nodes" in str(error)


def test_recipe_class_is_the_validated_type():
    assert isinstance(load_recipe(GOOD), Recipe)
    with pytest.raises(TypeError, match="a recipe is a path"):
        load_recipe(42)
