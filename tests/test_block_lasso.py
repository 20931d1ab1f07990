"""block-lasso: group norms, the proximal and penalty forms, reweighting, the hard prune, masks, state."""

from __future__ import annotations

import pytest
import torch

from hfprune import Pruner, RecipeError

from conftest import TokenDataset, make_trainer, tiny_bert, tiny_gpt2, tiny_llama

LAYER = "bert.encoder.layer.0.intermediate.dense"


def recipe(group: str, targets: str, *, start=0, end=4, extra="") -> str:
    return f"""
version: 1
pruners:
  - strategy: block-lasso
    targets: [{targets}]
    schedule: {{start: {start}, end: {end}}}
    config: {{group: {group}, ratio: 0.5, lam: 0.5, {extra}}}
"""


def sgd_step(model, pruner, optimizer, seed=0):
    batch = TokenDataset(size=4)
    ids = torch.stack([batch[i + seed]["input_ids"] for i in range(4)])
    labels = torch.tensor([batch[i + seed]["labels"] for i in range(4)])
    model(input_ids=ids, labels=labels).loss.backward()
    pruner.before_optimizer_step(optimizer)
    optimizer.step()
    pruner.after_optimizer_step(optimizer)
    optimizer.zero_grad()


def attached(model, text, total_steps=10):
    pruner = Pruner(text)
    pruner.attach(model)
    pruner.start(total_steps)
    return pruner


def test_proximal_step_is_the_block_soft_threshold_on_every_tile():
    model = tiny_bert()
    weight = model.get_submodule(LAYER).weight
    pruner = attached(model, recipe("tile", LAYER, extra="block: [4, 8]"))
    before = weight.detach().clone()
    strategy = pruner.strategies[0]
    strategy.after_optimizer_step(_context(pruner, lr=0.3))
    expected = before.clone()
    for i in range(0, 64, 4):
        for j in range(0, 32, 8):
            block = before[i : i + 4, j : j + 8]
            alpha = 1 / (block.norm().item() + 1e-3)  # set from the weights at the phase's first step
            expected[i : i + 4, j : j + 8] = block * max(0.0, 1 - 0.3 * 0.5 * alpha / block.norm().item())
    torch.testing.assert_close(weight.detach(), expected)


def test_squared_proximal_step_shrinks_without_zeroing():
    model = tiny_bert()
    weight = model.get_submodule(LAYER).weight
    pruner = attached(model, recipe("row", LAYER, extra="squared: true"))
    before = weight.detach().clone()
    pruner.strategies[0].after_optimizer_step(_context(pruner, lr=0.2))
    alpha = 1 / (before.norm(dim=1, keepdim=True) ** 2 + 1e-3)
    torch.testing.assert_close(weight.detach(), before / (1 + 2 * 0.2 * 0.5 * alpha))


def test_penalty_form_adds_the_group_lasso_gradient():
    model = tiny_bert()
    weight = model.get_submodule(LAYER).weight
    pruner = attached(model, recipe("column", LAYER, extra="form: penalty"))
    weight.grad = torch.zeros_like(weight)
    pruner.strategies[0].before_optimizer_step(_context(pruner, lr=0.1))
    norms = weight.detach().norm(dim=0, keepdim=True)
    expected = weight.detach() * 0.5 / ((norms + 1e-3) * norms)
    torch.testing.assert_close(weight.grad, expected)


def test_alpha_is_set_at_the_phase_start_and_every_reweight_every_steps():
    model = tiny_bert()
    weight = model.get_submodule(LAYER).weight
    pruner = attached(model, recipe("row", LAYER, start=1, extra="reweight_every: 2"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    strategy = pruner.strategies[0]
    sgd_step(model, pruner, optimizer)  # step 0: before the phase
    assert torch.equal(strategy.alphas[0], torch.ones(64, 1))
    optimizer.step = _recording(optimizer.step, lambda: weight.detach().norm(dim=1).clone())
    sgd_step(
        model, pruner, optimizer, seed=1
    )  # step 1: the phase starts from the weights after the optimizer step
    torch.testing.assert_close(strategy.alphas[0].flatten(), 1 / (optimizer.step.seen + 1e-3))
    first = strategy.alphas[0].clone()
    sgd_step(
        model, pruner, optimizer, seed=2
    )  # step 2: (2 - 1 + 1) % 2 == 0, reweighted after the proximal step
    assert not torch.equal(strategy.alphas[0], first)
    torch.testing.assert_close(strategy.alphas[0].flatten(), 1 / (weight.detach().norm(dim=1) + 1e-3))


def test_head_blocks_span_q_k_v_rows_and_output_columns():
    model = tiny_bert()
    pruner = attached(model, recipe("head", "BertLayer"))
    first = pruner.strategies[0].sets[0]
    attention = model.bert.encoder.layer[0].attention
    expected = sum(
        attention.self.query.weight[h * 16 : (h + 1) * 16].norm() ** 2
        + attention.self.key.weight[h * 16 : (h + 1) * 16].norm() ** 2
        + attention.self.value.weight[h * 16 : (h + 1) * 16].norm() ** 2
        + attention.output.dense.weight[:, h * 16 : (h + 1) * 16].norm() ** 2
        for h in [1]
    ).sqrt()
    assert first.name == "bert.encoder.layer.0.attention"
    torch.testing.assert_close(first.norms()[1], expected.detach())


def test_gpt2_heads_cover_their_slices_of_the_fused_qkv_matrix():
    model = tiny_gpt2()
    pruner = attached(model, recipe("head", "GPT2Attention"))
    attention = model.transformer.h[0].attn
    width, size = 32, 16
    w, proj = attention.c_attn.weight.detach(), attention.c_proj.weight.detach()
    expected = torch.stack(
        [
            sum(w[:, o + h * size : o + (h + 1) * size].norm() ** 2 for o in (0, width, 2 * width))
            + proj[h * size : (h + 1) * size].norm() ** 2
            for h in range(2)
        ]
    ).sqrt()
    torch.testing.assert_close(pruner.strategies[0].sets[0].norms(), expected)


def test_grouped_query_attention_blocks_are_key_value_groups():
    model = tiny_llama()  # 4 query heads of size 8 share 2 key/value heads
    pruner = attached(model, recipe("head", "LlamaAttention"))
    attention = model.model.layers[0].self_attn
    block = pruner.strategies[0].sets[0]
    assert block.norms().shape == (2,)
    q, k, v, o = (getattr(attention, n).weight.detach() for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    group1 = q[16:32].norm() ** 2 + k[8:16].norm() ** 2 + v[8:16].norm() ** 2 + o[:, 16:32].norm() ** 2
    torch.testing.assert_close(block.norms()[1], group1.sqrt())


def test_hard_prune_removes_the_ratio_of_blocks_per_layer_and_keeps_them_zero_under_adamw(tmp_path):
    model = tiny_bert()
    callback_recipe = recipe("neuron", "BertLayer", start=2, end=6).replace("lam: 0.5", "lam: 0.05")
    from hfprune.callback import PruneCallback

    callback = PruneCallback(callback_recipe)
    make_trainer(tmp_path, model, [callback], weight_decay=0.1).train()
    for layer in model.bert.encoder.layer:
        up, down = layer.intermediate.dense.weight, layer.output.dense.weight
        pruned_rows = (up == 0).all(dim=1)
        assert int(pruned_rows.sum()) == 32  # half of 64 neurons in every layer
        assert torch.equal(pruned_rows, (down == 0).all(dim=0))
    strategy = callback.pruner.strategies[0]
    assert strategy.metrics()["zero_blocks"] == 0.5
    plan = strategy.compaction_plan()
    assert set(plan) == set(strategy.masks.names)


def test_global_scope_keeps_one_block_in_every_set():
    model = tiny_bert()
    pruner = attached(
        model, recipe("head", "BertLayer", end=0, extra="scope: global").replace("ratio: 0.5", "ratio: 0.9")
    )
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(
            100
        )  # layer 0 dominates every global threshold
    pruner.strategies[0].fix_pattern(None)
    keeps = [m.bool() for m in pruner.strategies[0].masks.masks]
    per_layer = [int(keeps[i * 4].all(dim=1).view(2, 16).all(dim=1).sum()) for i in range(2)]
    assert per_layer[1] == 1 and per_layer[0] >= 1


def test_state_round_trip_restores_alphas_then_masks():
    model = tiny_bert()
    text = recipe("row", LAYER, end=3, extra="reweight_every: 1")
    pruner = attached(model, text)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sgd_step(model, pruner, optimizer)
    restored = attached(model, text)
    restored.load_state_dict(pruner.state_dict())
    torch.testing.assert_close(restored.strategies[0].alphas[0], pruner.strategies[0].alphas[0])
    for seed in range(1, 4):
        sgd_step(model, pruner, optimizer, seed)
    again = attached(model, text)
    again.load_state_dict(pruner.state_dict())
    assert again.strategies[0].alphas is None
    assert all(
        torch.equal(a, b) for a, b in zip(again.strategies[0].masks.masks, pruner.strategies[0].masks.masks)
    )


@pytest.mark.parametrize(
    ("group", "targets", "extra", "message"),
    [
        ("tile", LAYER, "", "group 'tile' needs block"),
        ("row", LAYER, "block: [2, 2]", "block is only for group 'tile'"),
        ("tile", LAYER, "block: [5, 8]", "cannot be tiled into 5x8 blocks"),
        ("head", LAYER, "", "contains no attention block"),
        ("neuron", "BertSelfAttention", "", "contains no feed-forward block"),
    ],
)
def test_recipe_errors_name_the_key_before_training(group, targets, extra, message):
    with pytest.raises(RecipeError, match=message) as error:
        Pruner(recipe(group, targets, extra=extra)).attach(tiny_bert())
    assert error.value.key.startswith("pruners[0]")
    assert error.value.line is not None


def _recording(step, measure):
    """``optimizer.step`` that records ``measure()`` right after stepping (before any strategy acts)."""

    def wrapped(*args, **kwargs):
        result = step(*args, **kwargs)
        wrapped.seen = measure()
        return result

    return wrapped


def _context(pruner, lr):
    from hfprune.strategy import StepContext

    params = [p for plan in pruner.plans for p in plan.parameters.values()]
    optimizer = torch.optim.SGD(params, lr=lr)
    return StepContext(step=0, optimizer=optimizer, group_of={id(p): 0 for p in params})


def test_resume_in_the_lasso_phase_is_exact(tmp_path):
    """Interrupted at step 8, resumed from the step-5 checkpoint: mid lasso phase, alphas already
    reweighted."""
    from hfprune.callback import PruneCallback

    from conftest import StopAt

    text = (
        recipe("head", "BertLayer", start=1, end=9, extra="reweight_every: 2")
        + recipe("neuron", "BertLayer", start=1, end=9).split("pruners:\n")[1]
    )

    def run(output_dir, *extra, resume=None):
        model = tiny_bert()
        callback = PruneCallback(text)
        make_trainer(
            output_dir, model, [callback, *extra], max_steps=12, save_strategy="steps", save_steps=5
        ).train(resume_from_checkpoint=resume)
        return model, callback

    full_model, full = run(tmp_path / "full")
    run(tmp_path / "cut", StopAt(8))
    resumed_model, resumed = run(tmp_path / "cut", resume=True)
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for entry in (0, 1):
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                full.pruner.strategies[entry].masks.keep(), resumed.pruner.strategies[entry].masks.keep()
            )
        )


def test_multiple_of_rounds_the_blocks_each_layer_keeps():
    model = tiny_bert()  # 64 neurons per layer; ratio 0.6 keeps 26, rounded to a multiple of 8: 24
    pruner = attached(
        model,
        recipe("neuron", "BertLayer", end=0, extra="multiple_of: 8").replace("ratio: 0.5", "ratio: 0.6"),
    )
    pruner.strategies[0].fix_pattern(None)
    for layer in model.bert.encoder.layer:
        assert int((layer.intermediate.dense.weight != 0).any(dim=1).sum()) == 24
    with pytest.raises(
        RecipeError, match="multiple_of rounds each set's kept blocks, so it needs scope 'layer'"
    ):
        Pruner(recipe("neuron", "BertLayer", extra="multiple_of: 8, scope: global"))
