"""One-shot pruning: the driver, calibration passes, and the mask-search and wanda strategies."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import hfprune
from hfprune.architecture import Member
from hfprune.calibration import Calibration, CalibrationError
from hfprune.calibration.conformance import OneShotConformance, calibration_batches
from hfprune.errors import RecipeError
from hfprune.pruner import Pruner
from hfprune.testing import tiny_bert
from hfprune_mask_search.search import rearrange, search
from hfprune_mask_search.tuning import BlockFit
from hfprune_wanda import WandaConfig, keep_mask

from conftest import tiny_llama

LAYERS = r"re:bert\.encoder\.layer\.\d+"


def mask_search_recipe(**config) -> str:
    settings = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in config.items())
    return f"""version: 1
pruners:
  - strategy: mask-search
    targets: ['{LAYERS}']
    config: {{{settings}}}
"""


class TestWandaConformance(OneShotConformance):
    strategy = "wanda"
    config = {"sparsity": 0.5}


class TestWanda24Conformance(OneShotConformance):
    strategy = "wanda"
    config = {"n_m": [2, 4]}


class TestMaskSearchConformance(OneShotConformance):
    strategy = "mask-search"
    config = {"keep": 0.6}
    targets = (LAYERS,)


# --- mask-search ---------------------------------------------------------------------------------


def test_fisher_importance_equals_a_hand_computation():
    """sum over batches of (dL/dm)^2, with m an explicit mask on each head's and neuron's output."""
    model, batches = tiny_bert(), calibration_batches()
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    masks, handles = [], []
    for layer in model.bert.encoder.layer:
        for consumer, groups, size in (
            (layer.attention.output.dense, config.num_attention_heads, head_size),
            (layer.output.dense, config.intermediate_size, 1),
        ):
            mask = torch.ones(groups, requires_grad=True)
            masks.append(mask)

            def scale(module, args, mask=mask, size=size):
                (x,) = args
                return (x * mask.repeat_interleave(size),)

            handles.append(consumer.register_forward_pre_hook(scale))
    expected = [torch.zeros(m.numel()) for m in masks]
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, masks)
        for total, grad in zip(expected, grads):
            total += grad.square()
    for handle in handles:
        handle.remove()

    pruner = Pruner(mask_search_recipe(keep=0.6))
    pruner.attach(model)
    pruner.start(total_steps=1, one_shot=True)
    (strategy,) = pruner.strategies
    gradients = strategy.gradients(Calibration(model, batches, progress=False))
    measured = [g.square().sum(0) for g in gradients]
    assert [s.unit.kind for s in strategy.sets] == ["head", "neuron"] * 2  # the hand order
    torch.testing.assert_close(measured, expected, rtol=1e-4, atol=1e-10)


def test_search_respects_the_budget_and_keeps_the_most_importance():
    """Checked against every subset: with one cost per kind, the search's pick is the best affordable one."""
    generator = torch.Generator().manual_seed(0)
    importances = [torch.rand(n, generator=generator) for n in (2, 3, 2, 3)]
    costs = [torch.full((n,), c, dtype=torch.float64) for n, c in ((2, 5.0), (3, 2.0), (2, 5.0), (3, 2.0))]
    is_head = [True, False, True, False]
    total = sum(float(c.sum()) for c in costs)
    for keep_fraction in (0.45, 0.6, 0.8):
        budget = keep_fraction * total
        keeps = search(importances, costs, is_head, budget)
        spent = sum(float(c[k].sum()) for c, k in zip(costs, keeps))
        value = sum(float(i[k].sum()) for i, k in zip(importances, keeps))
        assert spent <= budget
        assert all(k.any() for k in keeps)
        best = 0.0
        flat = [(b, g) for b, imp in enumerate(importances) for g in range(imp.numel())]
        for chosen in itertools.product((False, True), repeat=len(flat)):
            picked = [f for f, c in zip(flat, chosen) if c]
            if {b for b, _ in picked} != set(range(4)):
                continue
            if sum(float(costs[b][g]) for b, g in picked) <= budget:
                best = max(best, sum(float(importances[b][g]) for b, g in picked))
        assert value == pytest.approx(best)


def test_search_refuses_a_budget_below_one_group_per_block():
    with pytest.raises(ValueError, match="one head or neuron in every block"):
        search([torch.ones(2), torch.ones(2)], [torch.full((2,), 3.0)] * 2, [True, False], budget=5.0)


def test_rearrangement_prunes_groups_whose_gradients_cancel():
    g1 = torch.tensor([1.0, -1.0, 1.0, -1.0])
    gradients = torch.stack([g1, -g1, torch.full((4,), 0.6), torch.full((4,), 2.0)], dim=1)
    keep = torch.tensor([False, True, False, True])  # by Fisher alone: groups 0 (4.0) and 2 (1.44) go
    result = rearrange(gradients, keep)
    assert result.tolist() == [False, False, True, True]  # 0 and 1 cancel: pruning both costs nothing


def test_least_squares_tuning_reduces_the_reconstruction_error():
    """The solved scales beat unit scales, and equal a direct least-squares fit of per-group contributions."""
    torch.manual_seed(0)
    consumer = nn.Linear(8, 5, bias=False)
    member = Member(consumer, "in", 0, 2)  # 4 groups of 2 inputs
    inputs = torch.randn(200, 8)
    # The pruned group 1 nearly repeats group 0 (inputs 0.8 times, same weights): group 0 can stand in for it.
    inputs[:, 2:4] = 0.8 * inputs[:, 0:2] + 0.05 * torch.randn(200, 2)
    with torch.no_grad():
        consumer.weight[:, 2:4] = consumer.weight[:, 0:2]
    targets = consumer(inputs).detach()
    kept = torch.tensor([True, False, True, True])
    fit = BlockFit(member, kept, 4)
    fit.add(inputs, targets)
    scales = fit.solve()

    def contributions(group):
        columns = slice(2 * group, 2 * group + 2)
        return (inputs[:, columns] @ consumer.weight[:, columns].t()).detach().flatten()

    design = torch.stack([contributions(g) for g in (0, 2, 3)], dim=1).double()
    direct = torch.linalg.lstsq(design, targets.flatten().double().unsqueeze(1)).solution.flatten()
    torch.testing.assert_close(scales, direct, rtol=1e-4, atol=1e-6)  # float32 products, float64 sums

    def error(values):
        return float((design @ values - targets.flatten().double()).square().sum())

    assert error(scales) < 0.05 * error(torch.ones(3, dtype=torch.float64))
    assert scales[0] == pytest.approx(1.8, abs=0.05)
    weight_before = consumer.weight.detach().clone()
    fit.fold(scales)
    torch.testing.assert_close(consumer.weight[:, 2:4], weight_before[:, 2:4])  # pruned: untouched
    torch.testing.assert_close(consumer.weight[:, 0:2], weight_before[:, 0:2] * scales[0].float())


def test_tuning_brings_the_pruned_model_closer_to_the_dense_one():
    """The encoder's output (a random model's logits hardly depend on it) is nearer the dense one, tuned."""
    batches = calibration_batches(64)
    dense = tiny_bert(layers=3)

    def encoded(model):
        with torch.no_grad():
            return torch.cat(
                [model.bert(b["input_ids"], b["attention_mask"]).last_hidden_state for b in batches]
            )

    errors = {}
    for tune in (False, True):
        model = copy.deepcopy(dense)
        hfprune.oneshot(model, batches, mask_search_recipe(keep=0.5, tune=tune), progress=False)
        errors[tune] = float((encoded(model) - encoded(dense)).square().mean())
    assert errors[True] < errors[False]  # random weights leave little to recover: a wrong fit makes it worse


def test_mask_search_on_a_grouped_query_llama_compacts():
    model = tiny_llama()
    batches = calibration_batches()
    for batch in batches:
        batch["labels"] = batch["input_ids"].clone()
    recipe = mask_search_recipe(keep=0.6).replace(LAYERS, r"re:model\.layers\.\d+")
    pruner = hfprune.oneshot(model, batches, recipe, progress=False)
    small = pruner.compact(model)  # outputs checked against the masked model
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


# --- wanda ------------------------------------------------------------------------------------------


def test_wanda_compares_scores_within_each_row():
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([1.0, 1.0, 1.0, 10.0])
    score = weights * norms
    rows = keep_mask(score, WandaConfig(sparsity=0.5))
    assert rows.tolist() == [[False, False, True, True], [True, False, False, True]]
    # one threshold over the matrix keeps row 0's 3 and 40, row 1's 4 and 10: not each row's half
    matrix = keep_mask(
        torch.tensor([[1.0, 2.0, 3.0, 40.0], [4.0, 3.5, 2.0, 10.0]]), WandaConfig(compare="matrix")
    )
    assert matrix.tolist() == [[False, False, False, True], [True, True, False, True]]
    two_four = keep_mask(torch.tensor([[1.0, 5.0, 3.0, 4.0, 9.0, 8.0, 7.0, 6.0]]), WandaConfig(n_m=[2, 4]))
    assert two_four.tolist() == [[False, True, False, True, True, True, False, False]]


def test_wanda_input_norms_leave_padding_out():
    """Real-token activations decide: the same data with garbage in the padded positions prunes the same."""
    recipe = """version: 1
pruners:
  - strategy: wanda
    targets: ['re:bert\\.encoder\\.layer\\.\\d+\\.output\\.dense']
    config: {sparsity: 0.5}
"""
    batches = calibration_batches()
    noisy = copy.deepcopy(batches)
    for batch in noisy:
        batch["input_ids"][:, -2:] = 7
    keeps = []
    for data in (batches, noisy):
        model = tiny_bert()
        pruner = hfprune.oneshot(model, data, recipe, progress=False)
        keeps.append(pruner.strategies[0].masks.keep())
    assert all(torch.equal(a, b) for a, b in zip(*keeps))


def wanda_recipe(layers: str, sequential: bool) -> str:
    return f"""version: 1
pruners:
  - strategy: wanda
    targets: ['re:bert\\.encoder\\.layer\\.({layers})\\.(intermediate|output)\\.dense']
    config: {{sparsity: 0.5, sequential: {str(sequential).lower()}}}
"""


def test_wanda_layer_by_layer_measures_each_layer_after_the_ones_below_are_pruned():
    """Sequential Wanda on layers 0 and 1 equals pruning layer 0, then measuring layer 1 on that model."""
    batches = calibration_batches()
    together = tiny_bert()
    pruner = hfprune.oneshot(together, batches, wanda_recipe("0|1", sequential=True), progress=False)
    chosen = dict(zip(pruner.strategies[0].masks.names, pruner.strategies[0].masks.keep()))

    by_hand, masks = tiny_bert(), {}
    for layer in ("0", "1"):  # one dense pass each, on the model as the layers before left it
        step = hfprune.oneshot(by_hand, batches, wanda_recipe(layer, sequential=False), progress=False)
        masks |= dict(zip(step.strategies[0].masks.names, step.strategies[0].masks.keep()))
    assert chosen.keys() == masks.keys() and len(chosen) == 4
    assert all(torch.equal(chosen[name], masks[name]) for name in chosen)

    dense_norms = tiny_bert()  # every norm from the dense model: layer 1 chooses differently
    pruner = hfprune.oneshot(dense_norms, batches, wanda_recipe("0|1", sequential=False), progress=False)
    unaware = dict(zip(pruner.strategies[0].masks.names, pruner.strategies[0].masks.keep()))
    assert any(not torch.equal(unaware[name], chosen[name]) for name in chosen if ".1." in name)


# --- the driver and bad input ---------------------------------------------------------------------


def test_too_few_examples_is_a_clear_error_and_the_model_is_unchanged():
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="at least 16 calibration examples.*has 8"):
        hfprune.oneshot(model, calibration_batches(8), mask_search_recipe(keep=0.6), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_calibration_without_labels_is_a_clear_error():
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in calibration_batches()]
    with pytest.raises(CalibrationError, match="no labels"):
        hfprune.oneshot(tiny_bert(), batches, mask_search_recipe(keep=0.6), progress=False)


def test_data_of_another_task_is_a_clear_error_and_the_model_is_unchanged():
    """Token-level labels given to a sequence classifier: the loss cannot be computed."""
    batches = calibration_batches()
    for batch in batches:
        batch["labels"] = batch["input_ids"] % 2
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="this model's task"):
        hfprune.oneshot(model, batches, mask_search_recipe(keep=0.6), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_training_strategy_is_refused_with_its_location():
    recipe = """version: 1
pruners:
  - strategy: magnitude
    targets: ['re:bert\\.encoder\\.layer\\.\\d+\\.output\\.dense']
    config: {sparsity: 0.5}
"""
    with pytest.raises(RecipeError, match=r"pruners\[0\]\.strategy.*prunes during training"):
        hfprune.oneshot(tiny_bert(), calibration_batches(), recipe, progress=False)


def test_layer_replay_reproduces_the_full_forward():
    """Running the captured inputs through every layer gives the model's own last hidden states."""
    for model, stack in ((tiny_bert(), "bert.encoder.layer"), (tiny_llama(), "model.layers")):
        model.eval()
        batches = calibration_batches()
        calibration = Calibration(model, batches, progress=False)
        layers = model.get_submodule(stack)
        replay = calibration.replay(layers)
        hidden = replay.inputs()
        for layer in layers:
            hidden = replay.run(layer, hidden)
        with torch.no_grad():
            for batch, states in zip(batches, hidden):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                expected = model(**inputs, output_hidden_states=True).hidden_states[-1]
                if stack == "model.layers":  # Llama's last hidden state is after the final norm
                    states = model.model.norm(states)
                torch.testing.assert_close(states, expected)
