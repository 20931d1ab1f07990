"""layer-lasso: gates on whole layers, LD-Net's regularizer, layer-wise dropout, and compaction that deletes
layers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from torch import nn

from hfprune import CompactionError, HfpruneError, Pruner, RecipeError
from hfprune.callback import PruneCallback, SaveWithoutDeletedLayers
from hfprune.compaction.compact import LAYOUT_KEY, probe_batch
from hfprune.compaction.loading import load_compacted
from hfprune.model_hooks import ModelHook, hook_save_pretrained

from conftest import TINY_MODELS, TokenDataset, make_trainer, tiny_albert, tiny_bert

STACKS = {
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
    "distilbert": "distilbert.transformer.layer",
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "phi3": "model.layers",
    "gemma3": "model.layers",
    "vit": "vit.layers",
}


def lasso_recipe(target: str = "encoder.layer", start=0, end=1.0, **config) -> str:
    settings = ", ".join(f"{k}: {v}" for k, v in ({"keep": 2} | config).items() if v is not None)
    return (
        f"version: 1\npruners:\n  - strategy: layer-lasso\n    targets: [{target}]\n    schedule: {{start: "
        f"{start}, end: {end}}}\n    config: {{{settings}}}\n"
    )


def started(model, text: str, steps: int = 100) -> Pruner:
    pruner = Pruner(text)
    pruner.attach(model)
    pruner.start(steps)
    return pruner


def hidden_states(model, train: bool = False) -> tuple[torch.Tensor, ...]:
    model.train(train)
    with torch.set_grad_enabled(train):
        return model(**probe_batch(model), output_hidden_states=True).hidden_states


def settle_at(pruner: Pruner, gates: list[float]) -> None:
    strategy = pruner.strategies[0]
    with torch.no_grad():
        strategy.gates.copy_(torch.tensor(gates))
    strategy.settle()


# --- the regularizer and the gate update --------------------------------------------------------


@pytest.mark.parametrize(
    "keep, expected",
    [
        # R's gradient l0 (1 - 2g) + l0 [more than keep gates > 0] [g > 0]; Adam's first step moves each gate
        # by
        # gate_lr against its sign (0 where it is 0), then the clamp to [0, 1].
        (
            2,
            [1.0, 0.8 - 0.1, 0.3 - 0.1, 0.0],
        ),  # 3 live gates > keep: the L1 part acts; at g = 1 the two parts cancel
        (
            3,
            [1.0, 0.8 + 0.1, 0.3 - 0.1, 0.0],
        ),  # 3 live gates = keep: only the 0/1 part, which pushes away from 0.5
    ],
)
def test_one_gate_step_follows_ld_nets_regularizer_and_the_clamp(keep, expected):
    model = tiny_bert(layers=4)
    pruner = started(model, lasso_recipe(keep=keep, l0=0.05, gate_lr=0.1))
    strategy = pruner.strategies[0]
    with torch.no_grad():
        strategy.gates.copy_(torch.tensor([1.0, 0.8, 0.3, 0.0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.before_optimizer_step(optimizer)  # no forward pass: no task gradient, only R's
    pruner.after_optimizer_step(optimizer)
    torch.testing.assert_close(strategy.gates.detach(), torch.tensor(expected), atol=1e-6, rtol=0)


def test_the_task_gradient_reaches_the_gates_through_the_residual_gate():
    model = tiny_bert(layers=3).double()
    strategy = started(model, lasso_recipe()).strategies[0]
    with torch.no_grad():
        strategy.gates.copy_(torch.tensor([0.9, 0.5, 0.7]))
    probe = probe_batch(model)
    labels = torch.tensor([0, 1])

    def loss() -> torch.Tensor:
        return model(**probe, labels=labels).loss

    model.eval()
    loss().backward()
    for i in range(3):
        with torch.no_grad():
            strategy.gates[i] += 1e-3
            up = loss().item()
            strategy.gates[i] -= 2e-3
            down = loss().item()
            strategy.gates[i] += 1e-3
        assert strategy.gates.grad[i].item() == pytest.approx((up - down) / 2e-3, rel=1e-2, abs=1e-6)


def test_a_gate_at_zero_makes_its_layer_the_identity_and_one_leaves_it_alone():
    model = tiny_bert(layers=4)
    reference = hidden_states(model)
    pruner = started(model, lasso_recipe(keep=3))
    settle_at(pruner, [1.0, 0.0, 1.0, 0.6])
    gated = hidden_states(model)
    torch.testing.assert_close(gated[1], reference[1], rtol=0, atol=0)  # layer 0 untouched
    torch.testing.assert_close(gated[2], gated[1], rtol=0, atol=0)  # layer 1 skipped: exactly its input
    assert not torch.equal(gated[4], gated[3])  # 0.6 settled to 1


# --- settling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settle, gates, kept",
    [
        ("round", [0.9, 0.2, 0.6, 0.4], [True, False, True, False]),
        (
            "round",
            [0.9, 0.7, 0.6, 0.0],
            [True, True, False, False],
        ),  # three round to 1, keep 2: the largest two
        (
            "round",
            [0.1, 0.2, 0.3, 0.4],
            [False, False, False, True],
        ),  # none reaches 0.5: the stack keeps its largest
        ("top", [0.1, 0.2, 0.3, 0.4], [False, False, True, True]),
    ],
)
def test_settling_fixes_gates_at_zero_or_one(settle, gates, kept):
    pruner = started(tiny_bert(layers=4), lasso_recipe(settle=settle))
    settle_at(pruner, gates)
    plan = pruner.strategies[0].compaction_plan()
    assert list(plan) == ["bert.encoder.layer"] and plan["bert.encoder.layer"].tolist() == kept
    assert pruner.strategies[0].gates.tolist() == [float(k) for k in kept]


def test_a_gate_settled_from_between_zero_and_one_is_logged_with_how_far_the_output_moves(caplog):
    model = tiny_bert(layers=4)
    pruner = started(model, lasso_recipe(keep=3, end=0))  # the gates settle after step 0, on its batch
    with torch.no_grad():
        pruner.strategies[0].gates.copy_(torch.tensor([1.0, 0.7, 0.0, 1.0]))
    model.train()
    model(**probe_batch(model))  # on the last step's batch the hooks measure each layer's branch
    with caplog.at_level(logging.WARNING, logger="hfprune.layer_lasso"):
        pruner.strategies[0].settle()
    assert "bert.encoder.layer.1 settled from 0.700 to 1" in caplog.text and "% of its norm" in caplog.text
    assert "layer.0" not in caplog.text  # gates already at an end are not reported
    assert 0 < pruner.strategies[0].settle_shift < 1


# --- in a stock Trainer ---------------------------------------------------------------------------


def test_with_the_trainer_gates_stay_in_range_are_logged_and_at_most_keep_survive(tmp_path):
    model = tiny_bert(layers=4)
    callback = PruneCallback(lasso_recipe(end=0.75, keep=2, l0=0.5, gate_lr=0.1))
    trainer = make_trainer(tmp_path, model, [callback], max_steps=16, logging_steps=2)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "live_layers/0.layer-lasso" in log]
    gates = [[log[f"gate/bert.encoder.layer.{i}/0.layer-lasso"] for i in range(4)] for log in logs]
    assert len(logs) >= 8 and all(0.0 <= g <= 1.0 for row in gates for g in row)
    assert any(0.0 < g < 1.0 for row in gates[:5] for g in row)  # they moved while learning
    assert logs[-1]["live_layers/0.layer-lasso"] <= 2 and all(g in (0.0, 1.0) for g in gates[-1])
    compacted = callback.compact(model)
    assert compacted.config.num_hidden_layers == logs[-1]["live_layers/0.layer-lasso"]


def trained_until_the_gates_settle(tmp_path, **overrides):
    """A tiny BERT trained 8 steps while layer-lasso keeps 1 of its 2 layers (gates settled halfway): its
    Trainer and callback."""
    model = tiny_bert()
    callback = PruneCallback(lasso_recipe(end=0.5, keep=1, l0=0.5, gate_lr=0.2))
    trainer = make_trainer(tmp_path / "run", model, [callback], max_steps=8, **overrides)
    trainer.train()
    assert sorted(callback.pruner.strategies[0].settled) == [0.0, 1.0]
    return trainer, callback


def assert_same_logits(model, reference, atol=1e-5):
    probe = probe_batch(reference)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, reference(**probe).logits, atol=atol, rtol=0)


def test_the_model_saved_after_training_loads_with_plain_transformers_and_computes_as_trained(tmp_path):
    trainer, _ = trained_until_the_gates_settle(tmp_path)

    trainer.save_model(tmp_path / "saved")

    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert_same_logits(loaded, trainer.model)
    assert loaded.config.num_hidden_layers == 1  # the layer gated off is not in the saved model
    assert len(trainer.model.bert.encoder.layer) == 2  # the trained model keeps its layers and gates


def test_checkpoints_written_while_training_keep_every_layer_for_resuming(tmp_path):
    trainer, _ = trained_until_the_gates_settle(tmp_path, save_strategy="steps", save_steps=8)

    checkpoint = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "run" / "checkpoint-8"
    )
    assert checkpoint.config.num_hidden_layers == 2
    torch.testing.assert_close(checkpoint.state_dict(), trainer.model.state_dict(), atol=0, rtol=0)


def test_a_later_trainer_checkpoint_of_the_trained_model_keeps_every_layer_to_resume_into(tmp_path):
    trainer, _ = trained_until_the_gates_settle(tmp_path)
    trainer.model.save_pretrained(tmp_path / "later" / "checkpoint-3")  # a fine-tune without the callback
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "later" / "checkpoint-3"
    )
    assert loaded.config.num_hidden_layers == 2


def test_a_copy_of_the_trained_model_saves_its_own_weights_without_the_gated_off_layers(tmp_path):
    trainer, _ = trained_until_the_gates_settle(tmp_path)
    copy_of_model = copy.deepcopy(trainer.model)
    with torch.no_grad():
        copy_of_model.classifier.bias.add_(1.0)

    copy_of_model.save_pretrained(tmp_path / "copy")

    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "copy")
    assert loaded.config.num_hidden_layers == 1
    assert_same_logits(loaded, copy_of_model)


def test_compacting_the_trained_model_gives_a_model_that_saves_as_it_is(tmp_path):
    trainer, callback = trained_until_the_gates_settle(tmp_path)
    compacted = callback.compact(trainer.model)

    compacted.save_pretrained(tmp_path / "small")

    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "small")
    assert_same_logits(loaded, trainer.model, atol=1e-4)


def test_frozen_layers_do_not_train_while_the_gates_and_the_head_do(tmp_path):
    model = tiny_bert(layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = PruneCallback(lasso_recipe(train_layers="false", gate_lr=0.1))
    make_trainer(tmp_path, model, [callback], max_steps=6).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith("bert.encoder.layer.") for n in changed)
    assert "classifier.weight" in changed
    assert (callback.pruner.strategies[0].gates < 1).any()


def test_gates_resume_exactly_from_a_checkpoint_in_the_middle_of_selection(tmp_path):
    def run(output_dir, resume: bool = False, stop: int | None = None):
        from conftest import StopAt

        torch.manual_seed(0)
        model = tiny_bert(layers=4)
        callback = PruneCallback(lasso_recipe(end=0.75, l0=0.5, gate_lr=0.1, dropout=0.3))
        extra = [StopAt(stop)] if stop else []
        trainer = make_trainer(
            output_dir, model, [callback, *extra], max_steps=16, save_strategy="steps", save_steps=6
        )
        trainer.train(resume_from_checkpoint=resume or None)
        return model, callback.pruner.strategies[0]

    full_model, full = run(tmp_path / "full")
    run(tmp_path / "resumed", stop=8)
    resumed_model, resumed = run(tmp_path / "resumed", resume=True)
    assert torch.equal(full.gates, resumed.gates) and full.settled == resumed.settled
    assert all(torch.equal(a, b) for a, b in zip(full_model.parameters(), resumed_model.parameters()))


def test_restarting_the_pruner_does_not_hook_a_layer_twice():
    model = tiny_bert(layers=4)
    pruner = started(model, lasso_recipe())
    pruner.start(100)
    assert all(len(layer._forward_hooks) == 1 for layer in model.bert.encoder.layer)
    pruner.close()
    assert all(len(layer._forward_hooks) == 0 for layer in model.bert.encoder.layer)


# --- layer-wise dropout -------------------------------------------------------------------------


def test_layer_wise_dropout_alone_skips_whole_layers_in_training_only():
    model = tiny_bert(layers=4)
    pruner = started(model, lasso_recipe(keep=None, dropout=0.5))
    assert pruner.strategies[0].compaction_plan() is None and pruner.strategies[0].metrics() == {}
    torch.manual_seed(0)
    skipped = []
    for _ in range(30):
        states = hidden_states(model, train=True)
        skipped += [torch.equal(states[i + 1], states[i]) for i in range(4)]
    assert 0.35 < sum(skipped) / len(skipped) < 0.65
    evaluated = hidden_states(model)
    assert not any(torch.equal(evaluated[i + 1], evaluated[i]) for i in range(4))


def test_layer_wise_dropout_acts_only_inside_its_schedule():
    model = tiny_bert(layers=4)
    started(model, lasso_recipe(keep=None, dropout=0.9, start=5, end=10))
    torch.manual_seed(0)
    states = hidden_states(model, train=True)
    assert not any(torch.equal(states[i + 1], states[i]) for i in range(4))


# --- densely connected stacks ---------------------------------------------------------------------


class DenseStack(nn.Module):
    """Each layer reads the input and every earlier layer's output; the stack's output is all of them."""

    def __init__(self, width: int = 4, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width * (i + 1), width), nn.Tanh()) for i in range(depth)
        )
        self.head = nn.Linear(width * (depth + 1), 1)

    def forward(self, x):
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(torch.cat(outputs, dim=-1)))
        return self.head(torch.cat(outputs, dim=-1))


def test_a_dense_stack_gates_each_layer_output_everywhere_it_is_consumed():
    torch.manual_seed(0)
    model = DenseStack()
    x = torch.randn(5, 4)
    pruner = started(model, lasso_recipe(target="layers", keep=1, stack="dense"))
    strategy = pruner.strategies[0]
    with torch.no_grad():
        strategy.gates.copy_(torch.tensor([1.0, 0.5, 0.0]))
    gated = model(x)
    gated.sum().backward()
    assert strategy.gates.grad[1] != 0
    pruner.close()

    def by_hand(x):
        outputs = [x]
        for layer, gate in zip(model.layers, (1.0, 0.5, 0.0)):
            outputs.append(gate * layer(torch.cat(outputs, dim=-1)))
        return model.head(torch.cat(outputs, dim=-1))

    torch.testing.assert_close(gated, by_hand(x))


# --- compaction ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_compaction_deletes_gated_off_layers_into_a_stock_checkpoint(family, tmp_path):
    model = TINY_MODELS[family]()
    pruner = started(model, lasso_recipe(target=STACKS[family], keep=1))
    settle_at(pruner, [0.0, 1.0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    compacted = pruner.compact(model)

    assert compacted.config.num_hidden_layers == 1 and len(compacted.get_submodule(STACKS[family])) == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the gated model is untouched
    assert not any(
        isinstance(hook, ModelHook) for m in compacted.modules() for hook in m._forward_hooks.values()
    )
    compacted.save_pretrained(tmp_path)
    loaded = getattr(transformers, type(model).__name__).from_pretrained(tmp_path)  # plain transformers
    probe = probe_batch(model)
    model.eval(), loaded.eval()
    with torch.no_grad():
        reference, result = (
            model(**probe, output_hidden_states=True),
            loaded(**probe, output_hidden_states=True),
        )
    torch.testing.assert_close(result.logits, reference.logits, atol=1e-4, rtol=0)
    assert len(result.hidden_states) == 2


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_a_model_with_layers_gated_off_saves_as_a_stock_model_that_computes_as_it_does(family, tmp_path):
    model = TINY_MODELS[family]()
    pruner = started(model, lasso_recipe(target=STACKS[family], keep=1))
    settle_at(pruner, [0.0, 1.0])
    hook_save_pretrained(model, SaveWithoutDeletedLayers(pruner))  # as PruneCallback does when training ends

    model.save_pretrained(tmp_path)

    loaded = getattr(transformers, type(model).__name__).from_pretrained(tmp_path)  # plain transformers
    assert_same_logits(loaded, model)
    assert loaded.config.num_hidden_layers == 1 and len(model.get_submodule(STACKS[family])) == 2


def test_saving_a_model_with_layers_gated_off_from_a_given_state_dict_is_refused():
    model = tiny_bert()
    pruner = started(model, lasso_recipe(keep=1))
    settle_at(pruner, [0.0, 1.0])
    hook_save_pretrained(model, SaveWithoutDeletedLayers(pruner))
    with pytest.raises(HfpruneError, match="given a state dict"):
        model.save_pretrained("unused", state_dict=model.state_dict())


def test_found_stacks_and_layer_indices_are_renumbered_for_the_cache():
    model = TINY_MODELS["llama"]()
    pruner = started(model, lasso_recipe(target="model", keep=1))  # the strategy finds model.layers itself
    assert list(pruner.strategies[0].stacks) == ["model.layers"]
    settle_at(pruner, [0.0, 1.0])
    compacted = pruner.compact(model)
    assert compacted.model.layers[0].self_attn.layer_idx == 0
    out = compacted.generate(probe_batch(model)["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_layers_heads_and_neurons_compact_together_and_load_in_one_call(tmp_path):
    model = tiny_bert(layers=4)
    text = lasso_recipe(keep=2) + (
        "  - strategy: block-lasso\n    targets: [BertAttention]\n    schedule: {start: 0, end: 1}\n"
        "    config: {group: head, ratio: 0.5, lam: 0.01}\n"
    )
    pruner = started(model, text, steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.stack([TokenDataset(size=4)[i]["input_ids"] for i in range(4)])
    for _ in range(2):
        model(input_ids=ids, labels=ids[:, 0] % 2).loss.backward()
        pruner.before_optimizer_step(optimizer)
        optimizer.step()
        pruner.after_optimizer_step(optimizer)
        optimizer.zero_grad()
    settle_at(pruner, [1.0, 0.0, 0.0, 1.0])

    compacted = pruner.compact(model)
    compacted.save_pretrained(tmp_path)

    layout = getattr(compacted.config, LAYOUT_KEY)
    assert layout == {
        "head": {"bert.encoder.layer.0.attention": 1, "bert.encoder.layer.1.attention": 1}
    }  # renumbered
    loaded = load_compacted(tmp_path)
    probe = probe_batch(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, model(**probe).logits, atol=1e-4, rtol=0)


def test_gpt2_scaling_attention_by_layer_position_refuses_to_move_a_layer_down():
    model = TINY_MODELS["gpt2"]()
    model.config.scale_attn_by_inverse_layer_idx = True
    pruner = started(model, lasso_recipe(target="transformer.h", keep=1))
    settle_at(pruner, [0.0, 1.0])
    with pytest.raises(CompactionError, match="scale_attn_by_inverse_layer_idx"):
        pruner.compact(model)


def test_layers_of_a_stack_the_config_does_not_describe_cannot_be_deleted():
    model = DenseStack()
    pruner = started(model, lasso_recipe(target="layers", keep=1, stack="dense"))
    settle_at(pruner, [1.0, 0.0, 0.0])
    with pytest.raises(CompactionError, match="only the stack the config describes"):
        pruner.compact(model, probe={"x": torch.randn(2, 4)})


def test_compaction_before_the_gates_settle_says_so():
    model = tiny_bert(layers=4)
    pruner = started(model, lasso_recipe())
    with pytest.raises(CompactionError, match="layer-lasso its layers"):
        pruner.compact(model)


# --- recipe errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, message",
    [
        (lasso_recipe(keep=4), "pruners[0].targets", "keep is 4, but the targeted stacks have 4 layers"),
        (lasso_recipe(target="attention.self"), "pruners[0].targets", "none is a layer stack"),
        (lasso_recipe(keep=None), "pruners[0].config", "set keep (layers to select) or dropout"),
        (lasso_recipe(stack="dense", dropout=0.5), "pruners[0].config", "the model must do it"),
    ],
)
def test_bad_layer_lasso_entries_fail_before_training_with_their_key(text, key, message):
    with pytest.raises(RecipeError) as info:
        Pruner(text).attach(tiny_bert(layers=4))
    assert info.value.key.startswith(key) and message in str(info.value)
    assert info.value.line is not None


@pytest.mark.parametrize("target", ["albert.encoder", "albert.encoder.albert_layer_groups.0.albert_layers"])
def test_albert_layers_are_refused_with_why_since_one_layer_serves_every_position(target):
    with pytest.raises(RecipeError) as info:
        Pruner(lasso_recipe(target=target, keep=1)).attach(tiny_albert())
    assert info.value.key.startswith("pruners[0].targets")
    assert "ALBERT runs every position through one shared layer" in str(info.value)
    assert "Prune the shared layer's heads and neurons instead" in str(info.value)


def test_compact_command_deletes_the_layers_of_a_trainer_checkpoint(tmp_path, capsys):
    from hfprune.cli import main

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(lasso_recipe(end=0.5, keep=2, l0=0.5, gate_lr=0.2))
    model = tiny_bert(layers=4)
    make_trainer(
        tmp_path / "run", model, [PruneCallback(str(recipe_file))], save_strategy="steps", save_steps=12
    ).train()

    assert (
        main(
            [
                "compact",
                str(tmp_path / "run" / "checkpoint-12"),
                "--recipe",
                str(recipe_file),
                "--output",
                str(tmp_path / "small"),
            ]
        )
        == 0
    )
    assert "from_pretrained" in capsys.readouterr().out
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "small")
    assert loaded.config.num_hidden_layers <= 2
    probe = probe_batch(model)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, model(**probe).logits, atol=1e-4, rtol=0)
