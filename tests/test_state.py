"""The pruning state file: exact round trip, atomic writes, and refusal of state that does not fit."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from hfprune import Pruner, StateError
from hfprune import state as state_module
from hfprune.state import STATE_FILE, load_state, save_state

from conftest import BERT_FFN_RECIPE, ffn_weights, tiny_bert


def pruned(step_count: int = 3, recipe: str = BERT_FFN_RECIPE):
    model = tiny_bert()
    pruner = Pruner(recipe)
    pruner.attach(model)
    pruner.start(total_steps=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(step_count):
        pruner.before_optimizer_step(optimizer)
        pruner.after_optimizer_step(optimizer)
    return model, pruner


def test_round_trip_restores_step_and_masks_exactly(tmp_path):
    model, pruner = pruned()
    pruner.save(tmp_path)
    fresh = Pruner(BERT_FFN_RECIPE)
    fresh.attach(model)
    fresh.start(total_steps=4)
    fresh.load(tmp_path)
    assert fresh.step == 3
    for a, b in zip(pruner.strategies[0].masks.masks, fresh.strategies[0].masks.masks):
        assert torch.equal(a, b) and b.dtype == torch.float32


def test_the_file_is_plain_safetensors_with_json_metadata(tmp_path):
    _, pruner = pruned()
    pruner.save(tmp_path)
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as handle:
        assert "hfprune" in handle.metadata()
        assert all(key.startswith("entries.0.mask.") for key in handle.keys())


def test_nested_values_round_trip(tmp_path):
    state = {"step": 7, "name": "x", "entries": [{"alpha": torch.arange(3.0), "flags": [True, None, 1.5]}]}
    save_state(tmp_path, state)
    loaded = load_state(tmp_path)
    assert loaded["step"] == 7 and loaded["entries"][0]["flags"] == [True, None, 1.5]
    assert torch.equal(loaded["entries"][0]["alpha"], torch.arange(3.0))


def test_a_failed_save_leaves_the_last_good_state_intact(tmp_path, monkeypatch):
    save_state(tmp_path, {"step": 1})

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_state(tmp_path, {"step": 2})
    assert load_state(tmp_path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


def test_missing_and_corrupt_files_are_state_errors(tmp_path):
    with pytest.raises(StateError, match="no pruning state"):
        load_state(tmp_path)
    (tmp_path / STATE_FILE).write_bytes(b"\x00" * 20)
    with pytest.raises(StateError, match="unreadable"):
        load_state(tmp_path)


def test_state_from_a_different_recipe_is_refused(tmp_path):
    model, pruner = pruned()
    pruner.save(tmp_path)
    other = Pruner(BERT_FFN_RECIPE.replace("sparsity: 0.75", "sparsity: 0.5"))
    other.attach(model)
    other.start(total_steps=4)
    with pytest.raises(StateError, match="different recipe"):
        other.load(tmp_path)


def test_masks_that_do_not_fit_the_weights_are_refused(tmp_path):
    _, pruner = pruned()
    pruner.save(tmp_path)
    dense_model = tiny_bert(seed=1)  # no zeros where the saved masks prune
    fresh = Pruner(BERT_FFN_RECIPE)
    fresh.attach(dense_model)
    fresh.start(total_steps=4)
    with pytest.raises(StateError, match="belongs to another checkpoint"):
        fresh.load(tmp_path)
    assert all((w != 0).all() for w in ffn_weights(dense_model).values())
