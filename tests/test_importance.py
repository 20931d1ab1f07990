"""Importance-based structured pruning: the mask gradient is the true one, the least important groups go
first, gradually."""

from __future__ import annotations

import pytest
import torch

from hfprune import Pruner, RecipeError
from hfprune.blocks import build_block_sets
from hfprune.compaction.compact import probe_batch
from hfprune.compaction.conformance import train_steps
from hfprune.plugins import default_registry

from conftest import TokenDataset, tiny_bert

LAYER0 = "bert.encoder.layer.0"


def recipe(group: str, ratio: float = 0.5, end: int = 8, every: int = 2, **config) -> str:
    settings = ", ".join(
        f"{key}: {value}" for key, value in {"group": group, "ratio": ratio, **config}.items()
    )
    return (
        f"version: 1\npruners:\n  - strategy: importance\n    targets: [BertLayer]\n"
        f"    schedule: {{start: 0, end: {end}, every: {every}}}\n    config: {{{settings}}}\n"
    )


def inputs(size: int = 8) -> dict[str, torch.Tensor]:
    data = TokenDataset(size=size)
    ids = torch.stack([data[i]["input_ids"] for i in range(size)])
    return {"input_ids": ids, "labels": torch.tensor([data[i]["labels"] for i in range(size)])}


def train(model, pruner: Pruner, steps: int) -> None:
    train_steps(model, pruner, inputs(), steps, lr=0.01)


@pytest.mark.parametrize("group", ["head", "neuron"])
def test_the_mask_gradient_is_autograds_gradient_of_a_mask_on_each_group(group):
    """A mask variable scaling each head's (neuron's) input to the projection that consumes it, at 1: its
    gradient
    equals sum(W * dW) over the group's columns, which is what the strategy reads."""
    model = tiny_bert()
    layer = model.bert.encoder.layer[0]
    consumer = layer.attention.output.dense if group == "head" else layer.output.dense
    width = 16 if group == "head" else 1  # a head is 16 columns wide in the tiny BERT
    groups = consumer.in_features // width
    mask = torch.ones(groups, requires_grad=True)
    handle = consumer.register_forward_pre_hook(lambda module, args: args[0] * mask.repeat_interleave(width))
    model(**inputs()).loss.backward()
    handle.remove()

    (block_set,) = [
        s for s in build_block_sets({LAYER0: layer}, group, None, default_registry().architectures)
    ]
    torch.testing.assert_close(block_set.mask_gradient(), mask.grad, rtol=1e-4, atol=1e-7)


def test_the_least_important_head_goes_first():
    model = tiny_bert()
    with torch.no_grad():  # head 1 of layer 0 barely reaches the output: removing it moves the loss least
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 16:] *= 1e-4
    pruner = Pruner(recipe("head", scope="layer"))
    pruner.attach(model)
    pruner.start(10)
    train(model, pruner, 10)

    plan = pruner.compaction_plan()
    kept = plan[f"{LAYER0}.attention.output.dense.weight"].any(dim=0)
    assert kept[:16].all() and not kept[16:].any()
    compacted = pruner.compact(model)
    assert compacted.config.hfprune_layout["head"] == {
        f"{LAYER0}.attention": 1,
        "bert.encoder.layer.1.attention": 1,
    }
    probe = probe_batch(model)
    model.eval(), compacted.eval()
    with torch.no_grad():
        torch.testing.assert_close(compacted(**probe).logits, model(**probe).logits, atol=1e-4, rtol=0)


def test_neurons_are_pruned_along_the_cubic_ramp_and_stay_pruned():
    model = tiny_bert()
    pruner = Pruner(recipe("neuron", ratio=0.75, end=8, every=2))
    pruner.attach(model)
    pruner.start(10)
    strategy = pruner.strategies[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = inputs()
    pruned_before = torch.zeros(64, dtype=torch.bool)
    for step in range(10):
        model(**batch).loss.backward()
        pruner.before_optimizer_step(optimizer)
        optimizer.step()
        pruner.after_optimizer_step(optimizer)
        optimizer.zero_grad()
        due = strategy.schedule.last_update_step(step)
        expected = round(strategy.schedule.cubic_ramp(due, 0.75) * 64)
        pruned = ~model.bert.encoder.layer[0].output.dense.weight.detach().any(dim=0)
        assert int(pruned.sum()) == expected, step
        assert pruned[pruned_before].all(), step  # a pruned neuron never comes back
        pruned_before = pruned
        assert (strategy.compaction_plan() is not None) == (step >= 8)
    assert int(pruned_before.sum()) == 48


def test_multiple_of_rounds_what_each_block_keeps_and_never_brings_a_pruned_group_back():
    model = tiny_bert()
    pruner = Pruner(recipe("neuron", ratio=0.6, multiple_of=16))
    pruner.attach(model)
    pruner.start(10)
    down = model.bert.encoder.layer[0].output.dense.weight
    kept_before = torch.ones(64, dtype=torch.bool)
    for _ in range(10):
        train(model, pruner, 1)
        kept = down.detach().any(dim=0)
        assert not (kept & ~kept_before).any()  # rounding up never revives a pruned neuron
        assert int(kept.sum()) % 16 == 0
        kept_before = kept
    kept = pruner.compaction_plan()[f"{LAYER0}.output.dense.weight"].any(dim=0)
    assert int(kept.sum()) == 32  # 64 - round(0.6 * 64) = 26, rounded to a multiple of 16


def test_multiple_of_larger_than_a_block_is_refused():
    with pytest.raises(RecipeError, match="multiple_of 4 is more than the 2 heads of"):
        Pruner(recipe("head", multiple_of=4)).attach(tiny_bert())


def test_a_skipped_step_leaves_the_importance_alone():
    """fp16 overflow: the step is skipped after its gradients were read; they must not enter the average."""
    model = tiny_bert()
    pruner = Pruner(recipe("neuron"))
    pruner.attach(model)
    pruner.start(10)
    strategy = pruner.strategies[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(**inputs()).loss.backward()
    pruner.before_optimizer_step(optimizer)
    pruner.after_optimizer_step(optimizer, skipped=True)
    assert all(not score.any() for score in strategy.scores)
    train(model, pruner, 1)
    assert all(score.any() and score.dtype == torch.float32 for score in strategy.scores)


def test_frozen_weights_are_refused_before_training():
    model = tiny_bert()
    model.bert.encoder.layer[0].output.dense.weight.requires_grad_(False)
    with pytest.raises(RecipeError, match="measured from weight gradients"):
        Pruner(recipe("neuron")).attach(model)
