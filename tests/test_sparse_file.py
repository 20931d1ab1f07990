"""The bitmask-plus-values file: exact round trip, tied weights, and smaller than the dense checkpoint."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from hfprune.compaction.sparse_file import load_sparse, pack_bits, save_sparse, unpack_bits
from hfprune.masks import largest_magnitude_masks

from conftest import tiny_bert, tiny_gpt2


def test_bits_round_trip_at_lengths_that_are_not_multiples_of_eight():
    for numel in (1, 7, 8, 9, 61):
        keep = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
        packed = pack_bits(keep)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
        assert torch.equal(unpack_bits(packed, (numel,)), keep)


def prune_linears(model, sparsity):
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for weight, keep in zip(weights, largest_magnitude_masks(weights, sparsity)):
            weight.mul_(keep)
    return model


def test_pruned_model_is_an_ordinary_checkpoint_and_its_sparse_file_is_exact_and_smaller(tmp_path):
    model = prune_linears(tiny_bert(), 0.8)
    model.save_pretrained(tmp_path / "dense")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
    state = model.state_dict()
    assert all(torch.equal(value, reloaded.state_dict()[name]) for name, value in state.items())

    path = save_sparse(state, tmp_path / "sparse.safetensors")
    restored = load_sparse(path)
    assert restored.keys() == state.keys()
    assert all(
        torch.equal(value, restored[name]) and value.dtype == restored[name].dtype
        for name, value in state.items()
    )
    dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert (
        path.stat().st_size < 0.75 * dense_size
    )  # the Linear weights (most of this model) shrink to 1/32 + 0.2


def test_tied_weights_are_stored_once(tmp_path):
    model = prune_linears(tiny_gpt2(), 0.5)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    restored = load_sparse(save_sparse(state, tmp_path / "gpt2.safetensors"))
    assert torch.equal(restored["lm_head.weight"], state["lm_head.weight"])
    assert restored["lm_head.weight"].data_ptr() == restored["transformer.wte.weight"].data_ptr()
