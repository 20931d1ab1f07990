"""Tied weights (GPT-2's lm_head and transformer.wte, Llama with tie_word_embeddings): one tensor under two
names is claimed by one entry, counted once, and weighed once by global thresholds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from hfprune.callback import PruneCallback
from hfprune.cli import main
from hfprune.errors import RecipeError
from hfprune.pruner import Pruner

from conftest import TokenDataset, make_trainer, tiny_gpt2, tiny_llama


def tied_llama() -> LlamaForCausalLM:
    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


# model, the output embedding's name, the input embedding's name, the other matrices' class
TIED = {
    "gpt2": (tiny_gpt2, "lm_head", "transformer.wte", "Conv1D"),
    "llama": (tied_llama, "lm_head", "model.embed_tokens", "Linear"),
}


def two_entries(first: str, second: str) -> str:
    return (
        "version: 1\npruners:\n"
        f"  - strategy: magnitude\n    targets: [{first}]\n    config: {{sparsity: 0.5}}\n"
        f"  - strategy: magnitude\n    targets: [{second}]\n    config: {{sparsity: 0.8}}\n"
    )


def one_entry(targets: str) -> str:
    return (
        "version: 1\npruners:\n  - strategy: magnitude\n"
        f"    targets: [{targets}]\n    schedule: {{end: 0.5, every: 2}}\n"
        "    config: {sparsity: 0.5, scope: global}\n"
    )


@pytest.mark.parametrize("arch", TIED)
def test_two_entries_on_the_two_names_of_a_tied_tensor_are_refused_naming_both(arch):
    build, output, embedding, _ = TIED[arch]
    model = build()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(RecipeError) as info:
        Pruner(two_entries(output, embedding)).attach(model)
    assert (info.value.key, info.value.line) == ("pruners[1].targets", 7)
    assert (
        f"{embedding}.weight is the same tensor as {output}.weight (tied weights), which pruners[0] targets; "
        "each weight belongs to one entry"
    ) in str(info.value)


def test_separate_parameters_over_one_storage_are_tied_too():
    model = tiny_gpt2()
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.data)  # another object, the same memory
    assert model.lm_head.weight is not model.transformer.wte.weight
    with pytest.raises(RecipeError, match="lm_head.weight is the same tensor as transformer.wte.weight"):
        Pruner(two_entries("transformer.wte", "lm_head")).attach(model)


def test_two_entries_on_one_name_still_say_the_parameter_is_targeted_twice():
    with pytest.raises(RecipeError, match="parameter lm_head.weight is also targeted by pruners\\[0\\]"):
        Pruner(two_entries("lm_head", "lm_head")).attach(tiny_gpt2())


@pytest.mark.parametrize("arch", TIED)
def test_one_entry_selects_a_tied_tensor_once_and_global_scope_reaches_exactly_the_planned_sparsity(
    arch, tmp_path
):
    build, output, embedding, others = TIED[arch]
    model = build()
    tied = model.get_input_embeddings().weight
    with torch.no_grad():
        tied.mul_(4)  # unlike the other matrices, so weighing it twice would move the global threshold
    callback = PruneCallback(one_entry(f"{embedding}, {output}, {others}"))
    plan = callback.pruner.attach(model)[0]
    assert plan.tied == {f"{embedding}.weight": (f"{output}.weight",)}
    assert sum(p is tied for p in plan.parameters.values()) == 1
    distinct = {id(p): p for p in plan.parameters.values()}.values()
    assert plan.numel == sum(p.numel() for p in distinct)

    make_trainer(tmp_path, model, [callback], dataset=TokenDataset(causal_lm=True)).train()
    zeros = sum(int((p == 0).sum()) for p in distinct)
    assert zeros == round(0.5 * plan.numel)
    assert callback.pruner.sparsity()["sparsity"] == zeros / plan.numel
    masks = callback.pruner.state_dict()["entries"][0]
    assert f"mask.{embedding}.weight" in masks and f"mask.{output}.weight" not in masks


def test_check_counts_a_tied_tensor_once_in_the_entry_and_the_totals(tmp_path, capsys):
    model = tiny_gpt2()
    model.config.save_pretrained(tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(one_entry("transformer.wte, lm_head, Conv1D"))
    assert main(["check", str(recipe), "--model", str(tmp_path / "model"), "--task", "causal-lm"]) == 0
    out = capsys.readouterr().out
    embedding = model.transformer.wte.weight.numel()
    targeted = embedding + sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Conv1D")
    total = sum(p.numel() for p in model.parameters())  # a tied tensor once
    assert "    = lm_head.weight (tied weights: the same tensor, pruned and counted once)" in out
    assert f"9 parameters, {targeted:,} weights" in out
    assert f"recipe OK: 1 entry targets {targeted:,} of {total:,} model weights" in out
