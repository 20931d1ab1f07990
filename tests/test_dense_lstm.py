"""LD-Net's models (hfprune_ldnet.dense_lstm and .tagger), tiny and random: the dense LSTM language model,
the tagger over it, layer selection across both directions, and compaction of dense stacks."""

from __future__ import annotations

import copy

import pytest
import torch
from test_layer_lasso import settle_at
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForTokenClassification,
    Trainer,
    TrainingArguments,
)

from hfprune import PruneCallback, Pruner
from hfprune.callback import SaveWithoutDeletedLayers
from hfprune.compaction.compact import compact_model
from hfprune.errors import CompactionError
from hfprune.model_hooks import hook_save_pretrained
from hfprune.testing import VOCAB, TokenDataset
from hfprune_ldnet import DenseLSTMAdapter
from hfprune_ldnet.dense_lstm import (
    DenseLSTMConfig,
    DenseLSTMForLanguageModeling,
    DenseLSTMModel,
    reverse_padded,
)
from hfprune_ldnet.tagger import DenseLSTMForTokenClassification

STACKS = ("dense_lstm.forward_stack.layers", "dense_lstm.backward_stack.layers")
TASK_VOCAB = VOCAB + 20  # the tagger's words: the language model's, then 20 more
BOTH_STACKS = f"version: 1\npruners:\n  - strategy: layer-lasso\n    targets: [{', '.join(STACKS)}]\n"


def tiny_config(**overrides) -> DenseLSTMConfig:
    settings = dict(
        vocab_size=VOCAB, embedding_size=8, hidden_size=6, num_layers=3, dropout=0.0, layer_dropout=0.0
    )
    return DenseLSTMConfig(**{**settings, **overrides})


def tiny_lm(**overrides) -> DenseLSTMForLanguageModeling:
    torch.manual_seed(0)
    return DenseLSTMForLanguageModeling(tiny_config(**overrides)).eval()


def test_layer_i_reads_the_embedding_and_every_earlier_layer():
    model = DenseLSTMModel(tiny_config())
    assert [layer.lstm.input_size for layer in model.forward_stack.layers] == [8, 14, 20]
    output = model(torch.randint(1, VOCAB, (2, 5)))
    assert output.last_hidden_state.shape == (2, 5, 2 * (8 + 3 * 6))
    assert len(output.hidden_states) == 6


def test_the_forward_half_reads_the_past_and_the_backward_half_the_future():
    model = tiny_lm().dense_lstm
    ids = torch.randint(1, VOCAB, (1, 7))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] % (VOCAB - 1)) + 1
    width = model.config.stack_output_size("forward")
    before, after = model(ids).last_hidden_state, model(changed).last_hidden_state
    forward_moved = (before[0, :, :width] - after[0, :, :width]).abs().amax(dim=-1) > 0
    backward_moved = (before[0, :, width:] - after[0, :, width:]).abs().amax(dim=-1) > 0
    assert forward_moved.tolist() == [False] * 5 + [True] * 2
    assert backward_moved.tolist() == [True] * 6 + [False]


def test_right_padding_changes_nothing_at_real_positions():
    model = tiny_lm().dense_lstm
    ids = torch.randint(1, VOCAB, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    alone = model(ids).last_hidden_state
    with_padding = model(padded, attention_mask=mask).last_hidden_state[:, :5]
    torch.testing.assert_close(with_padding, alone, rtol=0, atol=1e-6)


def test_reverse_padded_reverses_within_each_length():
    sequences = torch.arange(8).view(2, 4)
    assert reverse_padded(sequences, torch.tensor([4, 2])).tolist() == [[3, 2, 1, 0], [5, 4, 6, 7]]


def test_layer_dropout_hides_a_layer_from_deeper_layers_but_not_from_the_output():
    model = DenseLSTMModel(tiny_config(layer_dropout=1.0)).train()
    seen = []
    model.forward_stack.layers[2].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    output = model(torch.randint(1, VOCAB, (2, 5)))
    assert seen[0][..., 8:].abs().max() == 0  # layers 0 and 1 dropped from layer 2's input
    assert output.hidden_states[0].abs().max() > 0 and output.last_hidden_state[..., 8:26].abs().max() > 0


def test_saves_and_loads_through_the_auto_classes(tmp_path):
    model = tiny_lm()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is DenseLSTMConfig
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, VOCAB, (2, 6))
    torch.testing.assert_close(loaded(ids).forward_log_probs, model(ids).forward_log_probs)
    torch.testing.assert_close(loaded(ids).backward_log_probs, model(ids).backward_log_probs)
    assert type(AutoModel.from_pretrained(tmp_path)) is DenseLSTMModel


def test_trains_with_the_stock_trainer(tmp_path):
    model = tiny_lm(dropout=0.1, layer_dropout=0.3).train()
    data = TokenDataset(size=64, causal_lm=True)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=5,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("stack", ["forward_stack", "backward_stack"])
def test_layer_lasso_gates_a_dense_stack(stack):
    model = tiny_lm()
    ids = torch.randint(1, VOCAB, (2, 6))
    before = model(ids).forward_log_probs
    recipe = (
        f"version: 1\npruners:\n  - strategy: layer-lasso\n    targets: [dense_lstm.{stack}.layers]\n"
        "    config: {keep: 1, stack: dense}\n"
    )
    pruner = Pruner(recipe)
    pruner.attach(model)
    pruner.start(10)
    torch.testing.assert_close(model(ids).forward_log_probs, before)  # gates start at 1
    with torch.no_grad():
        pruner.strategies[0].gates.zero_()
    hidden = model.dense_lstm(ids).last_hidden_state
    width = model.config.stack_output_size("forward")
    half = hidden[..., :width] if stack == "forward_stack" else hidden[..., width:]
    assert half[..., 8:].abs().max() == 0  # every layer's output gated to zero, the embedding kept


# --- layer selection over both directions ----------------------------------------------------------


def selecting(model, keep: int, **schedule) -> Pruner:
    window = ", ".join(f"{k}: {v}" for k, v in schedule.items())
    pruner = Pruner(
        BOTH_STACKS
        + f"    schedule: {{{window}}}\n    config: {{keep: {keep}, stack: dense, train_layers: false}}\n"
    )
    pruner.attach(model)
    pruner.start(10)
    return pruner


@pytest.mark.parametrize(
    "keep, kept",
    [
        (
            2,
            [False, False, True, True, False, False],
        ),  # both largest are backward: the forward stack keeps its own largest
        (3, [False, False, True, True, True, False]),
    ],
)
def test_settling_keeps_exactly_keep_layers_and_one_per_direction(keep, kept):
    pruner = selecting(tiny_lm(), keep)
    settle_at(pruner, [0.1, 0.2, 0.3, 0.9, 0.8, 0.7])
    plan = pruner.strategies[0].compaction_plan()
    assert torch.cat([plan[name] for name in STACKS]).tolist() == kept


def test_a_dense_gate_settled_up_from_zero_moves_its_output_by_the_gate_change():
    model = tiny_lm().train()
    pruner = selecting(model, keep=2, start=0, end=0)  # the gates settle after step 0, on its batch
    with torch.no_grad():
        pruner.strategies[0].gates.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.4]))
    model(torch.randint(1, VOCAB, (2, 6)))  # the gated forward outputs are all zero here
    pruner.strategies[0].settle()
    assert pruner.strategies[0].settled == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert pruner.strategies[0].settle_shift == pytest.approx(
        1.0
    )  # gate 0 -> 1 and 1 -> 0: the whole output, no more


# --- compaction --------------------------------------------------------------------------------


def test_compaction_deletes_layers_and_their_columns_in_later_layers_and_the_projections(tmp_path):
    model = tiny_lm()
    pruner = selecting(model, keep=3)
    settle_at(pruner, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    ids = torch.randint(1, VOCAB, (2, 6))
    gated = model(ids)
    small = pruner.compact(model)
    assert [layer.lstm.input_size for layer in small.dense_lstm.forward_stack.layers] == [
        8,
        8 + 6,
    ]  # layer 2 lost layer 1's columns
    assert [layer.lstm.input_size for layer in small.dense_lstm.backward_stack.layers] == [8]
    assert (
        small.forward_projection.in_features == 8 + 2 * 6 and small.backward_projection.in_features == 8 + 6
    )
    assert (small.config.num_layers, small.config.num_backward_layers) == (2, 1)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    for direction in ("forward", "backward"):
        expected = getattr(gated, f"{direction}_log_probs")
        torch.testing.assert_close(getattr(small(ids), f"{direction}_log_probs"), expected, rtol=0, atol=1e-4)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).backward_log_probs, gated.backward_log_probs, rtol=0, atol=1e-4)
    assert (
        model.dense_lstm.forward_stack.layers[2].lstm.input_size == 20
    )  # the model compacted is left as it was


def test_a_language_model_with_layers_gated_off_saves_as_a_model_that_computes_as_it_does(tmp_path):
    model = tiny_lm()
    pruner = selecting(model, keep=3)
    settle_at(pruner, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    hook_save_pretrained(model, SaveWithoutDeletedLayers(pruner))  # as PruneCallback does when training ends

    model.save_pretrained(tmp_path)

    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, VOCAB, (2, 6))
    gated, result = model(ids), loaded(ids)
    for direction in ("forward", "backward"):
        expected = getattr(gated, f"{direction}_log_probs")
        torch.testing.assert_close(getattr(result, f"{direction}_log_probs"), expected, rtol=0, atol=1e-5)
    assert (loaded.config.num_layers, loaded.config.num_backward_layers) == (2, 1)


def test_gates_between_zero_and_one_are_folded_into_the_weights_that_read_them():
    model = tiny_tagger()
    small = copy.deepcopy(model)  # before the gates: the copy folds them instead
    gates = {STACKS[0]: torch.tensor([0.5, 0.0, 0.3]), STACKS[1]: torch.tensor([0.0, 0.8, 0.0])}
    for name, values in gates.items():
        for layer, gate in zip(model.get_submodule(name), values.tolist()):
            layer.register_forward_hook(lambda module, args, output, gate=gate: gate * output)
    ids = torch.randint(1, TASK_VOCAB, (2, 7))
    assert small.delete_stack_layers(gates) == [0, 2, 4]
    torch.testing.assert_close(small(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert small.projection.in_features == 2 * 8 + 3 * 6


def test_compaction_refuses_what_it_cannot_do():
    with pytest.raises(CompactionError, match="compact the model with a head"):
        compact_model(
            DenseLSTMModel(tiny_config()),
            {"forward_stack.layers": torch.tensor([True, False, True])},
            [DenseLSTMAdapter()],
        )
    with pytest.raises(CompactionError, match="no dense stack named encoder.layer"):
        tiny_lm().delete_stack_layers({"encoder.layer": torch.tensor([True, False, True])})
    with pytest.raises(CompactionError, match="must keep one"):
        compact_model(tiny_lm(), {STACKS[0]: torch.tensor([False, False, False])}, [DenseLSTMAdapter()])
    with pytest.raises(
        CompactionError, match="the model's config states None"
    ):  # without its adapter, a dense stack is not residual
        compact_model(tiny_lm(), {STACKS[0]: torch.tensor([True, False, True])}, [])


def test_flops_per_token_count_every_lstm_matrix_and_fall_with_the_layers():
    model = tiny_lm()
    per_layer = [2 * (4 * 6 * (8 + 6 * i) + 4 * 6 * 6 + 2 * 4 * 6) for i in range(3)]
    assert model.dense_lstm.flops_per_token() == 2 * sum(per_layer)
    pruner = selecting(model, keep=2)
    settle_at(pruner, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert (
        pruner.compact(model).dense_lstm.flops_per_token() == 2 * per_layer[0]
    )  # a lone layer reads the embedding only


# --- the tagger --------------------------------------------------------------------------------


def tiny_tagger() -> DenseLSTMForTokenClassification:
    torch.manual_seed(0)
    config = tiny_config(
        task_vocab_size=TASK_VOCAB,
        num_labels=3,
        word_embedding_size=5,
        tagger_hidden_size=4,
        tagger_dropout=0.0,
    )
    return DenseLSTMForTokenClassification(config).eval()


def test_a_tagger_loaded_from_a_language_model_keeps_its_weights_and_starts_its_own(tmp_path):
    lm = tiny_lm()
    lm.save_pretrained(tmp_path)
    tagger = DenseLSTMForTokenClassification.from_pretrained(
        tmp_path, task_vocab_size=VOCAB + 5, num_labels=3
    )
    language_model = dict(lm.dense_lstm.named_parameters())
    for name, parameter in tagger.dense_lstm.named_parameters():
        assert torch.equal(parameter, language_model[name]), name
    assert (
        tagger.lm_ids.tolist() == list(range(VOCAB)) + [1] * 5
    )  # task words beyond the language model's read as <unk>
    assert all(torch.isfinite(p).all() for p in tagger.parameters())


def test_the_tagger_ignores_padding():
    model = tiny_tagger()
    ids = torch.randint(1, TASK_VOCAB, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    alone = model(ids).logits
    with_padding = model(padded, attention_mask=torch.tensor([[1] * 5 + [0] * 3])).logits[:, :5]
    torch.testing.assert_close(with_padding, alone, rtol=0, atol=1e-6)


class TaggingDataset(torch.utils.data.Dataset):
    """Random sentences of 6 words tagged by a rule the tagger can learn (label = word id mod 3)."""

    def __init__(self, size: int = 64):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, TASK_VOCAB, (size, 6), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {
            "input_ids": self.ids[index],
            "attention_mask": torch.ones(6, dtype=torch.long),
            "labels": self.ids[index] % 3,
        }


def test_the_tagger_selects_layers_over_a_frozen_language_model_with_the_stock_trainer(tmp_path):
    model = tiny_tagger().train()
    model.dense_lstm.requires_grad_(False)
    frozen = {name: p.clone() for name, p in model.dense_lstm.named_parameters()}
    callback = PruneCallback(
        BOTH_STACKS + "    schedule: {start: 0.0, end: 0.5}\n"
        "    config: {keep: 2, stack: dense, train_layers: false, gate_lr: 0.1}\n"
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=TaggingDataset(), callbacks=[callback])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in model.dense_lstm.named_parameters())
    strategy = callback.pruner.strategies[0]
    assert sum(strategy.settled) == 2 and strategy.gates.grad is None
    ids = TaggingDataset().ids[:4]
    small = callback.compact(model.eval())
    torch.testing.assert_close(small(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    small.save_pretrained(tmp_path / "small")
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "small").eval()
    assert (
        type(loaded) is DenseLSTMForTokenClassification and len(loaded.dense_lstm.forward_stack.layers) == 1
    )
    torch.testing.assert_close(loaded(ids).logits, small(ids).logits, rtol=0, atol=0)
