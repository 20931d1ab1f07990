"""The engine under a stock Trainer and under a hand-written accelerate loop."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainerCallback, default_data_collator, get_linear_schedule_with_warmup

from hfprune import CompactionError, PruneCallback, PruneOptimizer, Pruner, RecipeError, Strategy, hookimpl
from hfprune.plugins import build_registry

from conftest import (
    BERT_FFN_RECIPE,
    TokenDataset,
    ffn_weights,
    make_trainer,
    tiny_bert,
    tiny_gpt2,
    training_args,
)


def zeros_fraction(tensor: torch.Tensor) -> float:
    return (tensor == 0).float().mean().item()


def test_trainer_reaches_target_sparsity_on_targets_only(tmp_path):
    model = tiny_bert()
    callback = PruneCallback(BERT_FFN_RECIPE)
    trainer = make_trainer(tmp_path, model, [callback])
    trainer.train()
    for name, weight in ffn_weights(model).items():
        assert zeros_fraction(weight) == pytest.approx(0.75, abs=1 / weight.numel()), name
    assert zeros_fraction(model.bert.encoder.layer[0].attention.self.query.weight) == 0.0
    assert callback.pruner.step == trainer.state.global_step == 12


def test_sparsity_is_in_the_trainer_logs_at_each_logging_step(tmp_path):
    callback = PruneCallback(BERT_FFN_RECIPE)
    trainer = make_trainer(tmp_path, tiny_bert(), [callback])
    trainer.train()
    training_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in training_logs] == [4, 8, 12]
    assert all("sparsity" in h and "sparsity/0.magnitude" in h for h in training_logs)
    ramp = [h["sparsity"] for h in training_logs]
    assert 0 < ramp[0] < ramp[1] <= ramp[2] == pytest.approx(0.75, abs=1e-3)


class ZeroWatch(TrainerCallback):
    """After every optimizer step: masked weights and their Adam moments are exactly zero."""

    def __init__(self, prune_callback: PruneCallback):
        self.prune_callback = prune_callback
        self.history: list[list[torch.Tensor]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        mask_set = self.prune_callback.pruner.strategies[0].masks
        keep = mask_set.keep()
        for param, kept in zip(mask_set.params, keep):
            assert not param[~kept].any()
            for key in ("exp_avg", "exp_avg_sq"):
                assert not optimizer.state[param][key][~kept].any(), key
        self.history.append(keep)


def test_masked_weights_and_optimizer_state_stay_zero_every_step(tmp_path):
    callback = PruneCallback(BERT_FFN_RECIPE)
    watch = ZeroWatch(callback)
    make_trainer(tmp_path, tiny_bert(), [callback, watch], max_steps=16).train()
    assert len(watch.history) == 16  # masks exist from step 0, the schedule's start
    # The schedule ends at step 8 (0.5 of 16): from then on the pattern is fixed.
    assert all(all(torch.equal(a, b) for a, b in zip(watch.history[8], later)) for later in watch.history[8:])
    # A pruned weight never comes back while the ramp raises sparsity.
    for before, after in zip(watch.history, watch.history[1:]):
        assert not any((~a & b).any() for a, b in zip(before, after))


def test_gradient_accumulation_acts_once_per_optimizer_step(tmp_path):
    callback = PruneCallback(BERT_FFN_RECIPE)
    trainer = make_trainer(
        tmp_path, tiny_bert(), [callback], per_device_train_batch_size=2, gradient_accumulation_steps=4
    )
    trainer.train()
    assert trainer.state.global_step == callback.pruner.step == 12


def test_gpt2_causal_lm_trains_with_class_name_targets(tmp_path):
    recipe = (
        "version: 1\npruners:\n  - strategy: magnitude\n    targets: [Conv1D]\n    schedule: {end: 0.5, "
        "every: 2}\n    config: {sparsity: 0.5, scope: global}\n"
    )
    model = tiny_gpt2()
    callback = PruneCallback(recipe)
    make_trainer(tmp_path, model, [callback], dataset=TokenDataset(causal_lm=True)).train()
    assert callback.pruner.sparsity()["sparsity"] == pytest.approx(0.5, abs=1e-3)


class RecordingStrategy(Strategy):
    """Records what the engine shows it, to test the engine itself."""

    calls: list[tuple[str, int, list[float]]] = []

    def before_optimizer_step(self, ctx):
        self.calls.append(("before", ctx.step, ctx.learning_rates(list(self.parameters.values()))))

    def after_optimizer_step(self, ctx):
        self.calls.append(("after", ctx.step, ctx.learning_rates(list(self.parameters.values()))))


class RecordingPlugin:
    @hookimpl
    def hfprune_register_strategies(self, register):
        register("recording", RecordingStrategy)


def test_strategies_read_each_param_groups_lr_before_the_scheduler_moves_it(tmp_path):
    RecordingStrategy.calls = []
    registry = build_registry(extra_plugins={"recording": RecordingPlugin()})
    recipe = (
        "version: 1\npruners:\n  - strategy: recording\n    targets: "
        "[bert.encoder.layer.0.intermediate.dense, classifier]\n"
    )
    model = tiny_bert()
    head = list(model.classifier.parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": body, "lr": 1e-3}, {"params": head, "lr": 1e-2}])
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 4)
    trainer = make_trainer(tmp_path, model, [PruneCallback(recipe, registry=registry)], max_steps=4)
    trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
    trainer.train()
    expected = [lr * (4 - k) / 4 for k in range(4) for lr in (1e-3, 1e-2)]
    assert [c[:2] for c in RecordingStrategy.calls] == [(w, k) for k in range(4) for w in ("before", "after")]
    assert [lr for c in RecordingStrategy.calls if c[0] == "after" for lr in c[2]] == pytest.approx(expected)


def test_an_fp16_step_skipped_for_overflow_changes_nothing_but_still_counts():
    Accelerator(cpu=True)  # accelerate's state must exist; CPU fp16 has no scaler, so build one by hand
    model = tiny_bert()
    scaler = torch.amp.GradScaler("cpu")
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    pruner = Pruner(BERT_FFN_RECIPE)
    pruner.attach(model)
    pruner.start(total_steps=10)
    optimizer = PruneOptimizer(optimizer, pruner)
    inputs = TokenDataset()[0]
    inputs = {"input_ids": inputs["input_ids"][None], "labels": torch.tensor([inputs["labels"]])}

    before = {n: w.clone() for n, w in ffn_weights(model).items()}
    scaler.scale(model(**inputs).loss).backward()
    model.classifier.weight.grad[0, 0] = float("inf")
    optimizer.step()
    assert optimizer.optimizer.step_was_skipped
    assert pruner.step == 1 and not pruner.strategies[0].masks.active
    assert all(torch.equal(before[n], w) for n, w in ffn_weights(model).items())

    for _ in range(2):  # the schedule's next update step is step 2 (every: 2)
        optimizer.zero_grad()
        scaler.scale(model(**inputs).loss).backward()
        optimizer.step()
        assert not optimizer.optimizer.step_was_skipped
    assert pruner.step == 3 and pruner.strategies[0].masks.active


def test_compact_says_nothing_can_be_compacted_and_leaves_the_model_alone(tmp_path):
    model = tiny_bert()
    callback = PruneCallback(BERT_FFN_RECIPE)
    make_trainer(tmp_path, model, [callback], max_steps=4).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompactionError, match="nothing to compact"):
        callback.compact(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_trainer_callback_and_accelerate_loop_give_the_same_weights(tmp_path):
    steps, batch = 10, 8
    dataset = TokenDataset(size=batch * steps // 2)

    def optimizer_and_scheduler(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        return optimizer, get_linear_schedule_with_warmup(optimizer, 2, steps)

    trained_by_trainer = tiny_bert()
    callback = PruneCallback(BERT_FFN_RECIPE)
    trainer = make_trainer(
        tmp_path,
        trained_by_trainer,
        [callback],
        dataset=dataset,
        max_steps=steps,
        per_device_train_batch_size=batch,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
    )
    trainer.optimizer, trainer.lr_scheduler = optimizer_and_scheduler(trained_by_trainer)
    trainer.train()

    trained_by_loop = tiny_bert()
    accelerator = Accelerator(cpu=True)
    optimizer, scheduler = optimizer_and_scheduler(trained_by_loop)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=default_data_collator)
    model, optimizer, loader, scheduler = accelerator.prepare(trained_by_loop, optimizer, loader, scheduler)
    pruner = Pruner(BERT_FFN_RECIPE)
    pruner.attach(model)
    pruner.start(total_steps=steps)
    optimizer = PruneOptimizer(optimizer, pruner)
    model.train()
    for _ in range(math.ceil(steps / len(loader))):
        for inputs in loader:
            accelerator.backward(model(**inputs).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    assert pruner.step == callback.pruner.step == steps
    for (name, a), b in zip(trained_by_trainer.named_parameters(), trained_by_loop.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for a, b in zip(callback.pruner.strategies[0].masks.masks, pruner.strategies[0].masks.masks):
        assert torch.equal(a, b)


def test_accelerate_gradient_accumulation_steps_the_pruner_once_per_real_step():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        TokenDataset(size=32), batch_size=2, collate_fn=default_data_collator
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    pruner = Pruner(BERT_FFN_RECIPE)
    pruner.attach(model)
    pruner.start(total_steps=4)
    optimizer = PruneOptimizer(optimizer, pruner)
    for inputs in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**inputs).loss)
            optimizer.step()
            optimizer.zero_grad()
    assert pruner.step == 4
    assert pruner.sparsity()["sparsity"] == pytest.approx(0.75, abs=1e-3)


# The classifier's magnitude entry reads no learning rate; rpp steps every FFN weight at its group's rate.
RPP_ON_FFN = r"""version: 1
pruners:
  - strategy: magnitude
    targets: [classifier]
    config: {sparsity: 0.5}
  - strategy: rpp
    targets: ['re:.*encoder\.layer\.\d+\.(intermediate|output)\.dense']
    schedule: {start: 0, end: 4}
    config: {sparsity: 0.5, lam: 0.1}
"""
NO_GROUP = r"(?s)intermediate\.dense\.weight is in no param group of the optimizer, and strategy 'rpp'.*hint:"


def test_a_proximal_strategy_on_weights_the_optimizer_lacks_is_refused_before_any_step(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RPP_ON_FFN)
    model = tiny_bert()
    before = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    classifier_only = torch.optim.SGD(model.classifier.parameters(), lr=0.1)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "run"),
        train_dataset=TokenDataset(),
        callbacks=[PruneCallback(recipe)],
        optimizers=(classifier_only, None),
    )
    with pytest.raises(RecipeError, match=NO_GROUP) as caught:
        trainer.train()
    assert (caught.value.key, caught.value.line) == ("pruners[1].targets", 7)
    assert str(caught.value).startswith(f"{recipe}:7: pruners[1].targets:")
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[name], weight) for name, weight in model.named_parameters())


def test_wrapping_an_optimizer_checks_it_against_the_strategies():
    model = tiny_bert()
    pruner = Pruner(RPP_ON_FFN)
    pruner.attach(model)
    pruner.start(total_steps=8)
    with pytest.raises(RecipeError, match=NO_GROUP):
        PruneOptimizer(torch.optim.SGD(model.classifier.parameters(), lr=0.1), pruner)
    pruner = Pruner(BERT_FFN_RECIPE)  # magnitude reads no learning rate: its weights need no group
    pruner.attach(model)
    pruner.start(total_steps=8)
    PruneOptimizer(torch.optim.SGD(model.classifier.parameters(), lr=0.1), pruner)


def test_every_optimizer_hook_registered_on_the_wrapper_fires():
    model = tiny_bert()
    pruner = Pruner(BERT_FFN_RECIPE)
    pruner.attach(model)
    pruner.start(total_steps=4)
    optimizer = PruneOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pruner)
    fired = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: fired.append("step pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: fired.append("step post"))
    optimizer.register_state_dict_pre_hook(lambda opt: fired.append("state_dict pre"))
    optimizer.register_state_dict_post_hook(lambda opt, state: fired.append("state_dict post"))
    optimizer.register_load_state_dict_pre_hook(lambda opt, state: fired.append("load_state_dict pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: fired.append("load_state_dict post"))
    inputs = TokenDataset()[0]
    model(input_ids=inputs["input_ids"][None], labels=torch.tensor([inputs["labels"]])).loss.backward()

    optimizer.step()
    optimizer.load_state_dict(optimizer.state_dict())

    assert fired == [
        "step pre",
        "step post",
        "state_dict pre",
        "state_dict post",
        "load_state_dict pre",
        "load_state_dict post",
    ]
    assert pruner.step == 1
