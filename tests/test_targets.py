"""Target matching, and the recipe errors raised when a recipe meets a model."""

from __future__ import annotations

import re

import pytest
from peft import LoraConfig, get_peft_model

from hfprune import Pruner, RecipeError
from hfprune.recipe.targets import match_targets, near_misses

from conftest import tiny_bert, tiny_gpt2


def names(model, targets, exclude=()):
    return list(match_targets(model, list(targets), list(exclude)).modules)


def test_exact_name_dotted_suffix_regex_and_class_name():
    model = tiny_bert()
    assert names(model, ["bert.pooler.dense"]) == ["bert.pooler.dense"]
    assert names(model, ["attention.output.dense"]) == [
        f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)
    ]
    assert names(model, [r"re:bert\.encoder\.layer\.1\.intermediate\.dense"]) == [
        "bert.encoder.layer.1.intermediate.dense"
    ]
    linear = names(model, ["Linear"])
    assert len(linear) == 2 * 6 + 2  # six per layer, pooler, classifier
    assert "classifier" in linear


def test_suffix_needs_a_whole_component_and_regex_a_full_match():
    model = tiny_bert()
    assert names(model, ["ense"]) == []
    assert names(model, [r"re:.*query"]) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
    ]
    assert names(model, [r"re:query"]) == []


def test_exclude_drops_the_module_and_everything_inside_it():
    model = tiny_bert()
    kept = names(model, ["Linear"], exclude=["classifier", "bert.encoder.layer.0"])
    assert "classifier" not in kept
    assert not any(n.startswith("bert.encoder.layer.0.") for n in kept)
    assert "bert.encoder.layer.1.attention.self.query" in kept


def test_unmatched_targets_are_reported_by_index():
    match = match_targets(tiny_bert(), ["Linear", "qeury", "re:nothing.*"], [])
    assert match.unmatched == [1, 2]


def test_near_misses_suggest_real_names():
    assert "query" in near_misses(tiny_bert(), "qeury")
    assert "Conv1D" in near_misses(tiny_gpt2(), "Conv1d")


RECIPE = """version: 1
pruners:
  - strategy: magnitude
    targets: [{targets}]
    config: {{sparsity: 0.5}}
"""


def test_target_matching_nothing_is_a_recipe_error_with_line_and_hint():
    pruner = Pruner(RECIPE.format(targets="Linear, attention.self.qeury"))
    with pytest.raises(RecipeError) as info:
        pruner.attach(tiny_bert())
    error = info.value
    assert (error.line, error.key) == (4, "pruners[0].targets[1]")
    assert "'attention.self.qeury' matches no module" in str(error)
    assert "did you mean" in error.hint and "attention.self.query" in error.hint


def test_a_target_close_to_no_name_is_answered_with_the_models_names():
    """Nothing looks like the target, so the hint lists module names (layer indices collapsed), most alike
    first: enough to write a working target without another command."""
    model = tiny_bert()
    with pytest.raises(RecipeError) as info:
        Pruner(RECIPE.format(targets=r"'re:.*attn\.q_proj'")).attach(model)
    hint = info.value.hint
    prefix = "no module name is close; modules with weights here (* is any index): "
    assert hint.startswith(prefix), hint
    shown = hint.removeprefix(prefix).split(", ")
    collapsed = {re.sub(r"\.\d+(?=\.|$)", ".*", name) for name, _ in model.named_modules()}
    assert 1 < len(shown) <= 8 and set(shown) <= collapsed, shown
    assert shown[0] == "bert.encoder.layer.*.attention.self.query", shown


def test_targets_naming_lora_adapters_are_told_to_target_the_wrapped_layer():
    """peft's lora_A/lora_B are never targets (the base weight is pruned): the hint says so and names the
    layers LoRA wraps in this model."""
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(RecipeError) as info:
        Pruner(RECIPE.format(targets="'re:.*lora_A.*'")).attach(model)
    assert "'re:.*lora_A.*' matches no module" in str(info.value)
    assert "target the wrapped layer by its own name (LoRA wraps query, value here)" in info.value.hint
    assert Pruner(RECIPE.format(targets="query")).attach(model)  # what the hint says works


def test_two_entries_claiming_one_parameter_is_an_error():
    text = (
        RECIPE.format(targets="Linear")
        + "  - strategy: magnitude\n    targets: [intermediate.dense]\n    config: {sparsity: 0.3}\n"
    )
    with pytest.raises(RecipeError) as info:
        Pruner(text).attach(tiny_bert())
    assert info.value.key == "pruners[1].targets" and info.value.line == 7
    assert "also targeted by pruners[0]" in str(info.value)


def test_modules_without_prunable_weights_are_an_error():
    with pytest.raises(RecipeError, match="none of them has a weight matrix to prune"):
        Pruner(RECIPE.format(targets="LayerNorm")).attach(tiny_bert())


def test_gpt2_conv1d_weights_are_targets_too():
    plans = Pruner(RECIPE.format(targets="Conv1D")).attach(tiny_gpt2())
    assert len(plans[0].parameters) == 2 * 4
    assert all(p.dim() == 2 for p in plans[0].parameters.values())
