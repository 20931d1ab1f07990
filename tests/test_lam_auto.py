"""``lam: auto``: the penalty weight derived from the weights and the run's own learning-rate schedule."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, get_linear_schedule_with_warmup

from hfprune import PruneCallback, RecipeError, load_recipe
from hfprune.learning_rates import future_learning_rates
from hfprune.strategy import StepContext

from conftest import TokenDataset, make_trainer, tiny_bert


def optimizer_and_scheduler(lr: float = 1e-3, steps: int = 20):
    weights, bias = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [weights]}, {"params": [bias], "lr": lr / 10}], lr=lr)
    return (
        optimizer,
        get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=steps),
        (weights, bias),
    )


def test_future_learning_rates_are_the_ones_the_scheduler_will_set():
    optimizer, scheduler, _ = optimizer_and_scheduler()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    ahead = future_learning_rates(optimizer, scheduler, 8)
    state = scheduler.state_dict()
    seen = []
    for _ in range(8):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert ahead == [list(column) for column in zip(*seen)]
    assert scheduler.state_dict()["last_epoch"] == state["last_epoch"] + 8  # reading ahead moved nothing real


def test_without_a_scheduler_the_current_rates_are_taken_to_hold():
    optimizer = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))]},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4},
        ],
        lr=1e-3,
    )
    assert future_learning_rates(optimizer, None, 3) == [[1e-3] * 3, [1e-4] * 3]


def test_summed_learning_rates_are_per_parameter_group_up_to_the_end():
    optimizer, scheduler, (weights, bias) = optimizer_and_scheduler(lr=1.0, steps=10)
    ctx = StepContext(
        step=0, optimizer=optimizer, group_of={id(weights): 0, id(bias): 1}, lr_scheduler=scheduler
    )
    # warm-up 0, 1/3, 2/3, then linear decay 7/7 .. over steps 0..9; summed over steps 0..4
    expected = 0 + 1 / 3 + 2 / 3 + 1 + 6 / 7
    assert ctx.summed_learning_rates([weights, bias], end=5) == pytest.approx([expected, expected / 10])


class QuantileNorms(TrainerCallback):
    """Block-lasso's block norm at the ratio quantile, when the lasso phase starts and when it ends."""

    def __init__(self, callback):
        self.callback, self.seen = callback, {}

    def on_step_end(self, args, state, control, **kwargs):
        strategy = self.callback.pruner.strategies[0]
        if strategy.alphas is not None:
            self.seen.setdefault("first", strategy.phase_quantile())
            self.seen["last"] = strategy.phase_quantile()


@pytest.mark.parametrize(("steps", "lr"), [(20, 1e-3), (100, 3e-5)])
def test_auto_shrinks_the_target_blocks_alike_in_short_fast_runs_and_long_slow_ones(tmp_path, steps, lr):
    """The summed learning rate of these two runs differs 7-fold; a fixed lam tuned for one either does
    nothing in
    the other or zeroes every block. lam: auto takes the quantile block most of the way in both."""
    recipe = (
        "version: 1\npruners:\n  - strategy: block-lasso\n    targets: [BertLayer]\n"
        "    schedule: {start: 0.1, end: 0.7}\n    config: {group: head, ratio: 0.5, reweight_every: 2}\n"
    )
    callback = PruneCallback(recipe)
    watch = QuantileNorms(callback)
    make_trainer(
        tmp_path,
        tiny_bert(),
        [callback, watch],
        max_steps=steps,
        learning_rate=lr,
        dataset=TokenDataset(size=256),
    ).train()
    strategy = callback.pruner.strategies[0]
    assert strategy.lam == pytest.approx(
        watch.seen["first"] ** 2 / (2 * expected_phase_lr_sum(steps, lr)), rel=0.05
    )
    assert 0.05 < watch.seen["last"] / watch.seen["first"] < 0.5
    assert callback.pruner.metrics()["lam/0.block-lasso"] == strategy.lam


def expected_phase_lr_sum(steps: int, lr: float) -> float:
    """The Trainer's linear decay summed over the lasso phase [0.1, 0.7) of ``steps``, from its first step
    on."""
    start, end = round(0.1 * steps), round(0.7 * steps)
    return sum(lr * (steps - step) / steps for step in range(start, end))


def test_reduce_on_plateau_holds_the_current_rate_with_a_warning(caplog):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with caplog.at_level("WARNING", logger="hfprune.learning_rates"):
        assert future_learning_rates(optimizer, scheduler, 4) == [[1e-3] * 4]
    assert "ReduceLROnPlateau" in caplog.text


def test_accelerates_wrapper_is_stepped_as_often_as_it_steps_the_scheduler():
    from accelerate import Accelerator
    from accelerate.scheduler import AcceleratedScheduler

    from hfprune.learning_rates import _unwrapped

    Accelerator(cpu=True)  # the process state the wrapper reads
    optimizer, scheduler, _ = optimizer_and_scheduler()
    per_process = AcceleratedScheduler(scheduler, optimizer, split_batches=False)
    assert _unwrapped(per_process) == (scheduler, 1)  # one process here; one step per process in general
    assert _unwrapped(AcceleratedScheduler(scheduler, optimizer, split_batches=True)) == (scheduler, 1)
    assert _unwrapped(scheduler) == (scheduler, 1)


def _one_rpp_step(model, optimizer, lr_scheduler=None):
    recipe = (
        "version: 1\npruners:\n  - strategy: rpp\n    targets: ['re:.*intermediate\\.dense']\n"
        "    schedule: {start: 0, end: 5}\n    config: {sparsity: 0.5}\n"
    )
    callback = PruneCallback(recipe)
    callback.pruner.attach(model)
    callback.pruner.start(10, lr_scheduler)
    model(**{"input_ids": torch.arange(1, 9).view(2, 4), "labels": torch.tensor([0, 1])}).loss.backward()
    callback.pruner.before_optimizer_step(optimizer)
    optimizer.step()
    callback.pruner.after_optimizer_step(optimizer)
    return callback.pruner.strategies[0]


def test_parameter_groups_with_their_own_rates_share_the_mean_of_their_sums(caplog):
    """Layer 0's FFN at lr 0.01, layer 1's at 0.03, no scheduler: lam is derived from the mean sum, 0.02 per
    step over the 5 phase steps, not from whichever parameter comes first."""
    from hfprune.masks import auto_lam

    model = tiny_bert()
    layer0, layer1 = (model.bert.encoder.layer[i].intermediate.dense.weight for i in (0, 1))
    optimizer = torch.optim.SGD([{"params": [layer0], "lr": 0.01}, {"params": [layer1], "lr": 0.03}])
    quantile = torch.cat([layer0.detach().abs().flatten(), layer1.detach().abs().flatten()]).quantile(0.5)
    with caplog.at_level("WARNING", logger="hfprune.masks"):
        strategy = _one_rpp_step(model, optimizer)
    expected = auto_lam(float(quantile), 0.02 * 5, strategy.config.lam_scale)
    assert strategy.lam == pytest.approx(expected, rel=0.02)
    assert "none was given" in caplog.text  # no scheduler: said as a warning, not in the debug log


def test_auto_lam_is_saved_with_the_state_and_restored():
    recipe = (
        "version: 1\npruners:\n  - strategy: rpp\n    targets: ['re:.*intermediate\\.dense']\n"
        "    schedule: {start: 0, end: 5}\n    config: {sparsity: 0.5}\n"
    )
    callback = PruneCallback(recipe)
    model = tiny_bert()
    callback.pruner.attach(model)
    callback.pruner.start(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(**{"input_ids": torch.arange(1, 9).view(2, 4), "labels": torch.tensor([0, 1])}).loss.backward()
    callback.pruner.before_optimizer_step(optimizer)
    optimizer.step()
    callback.pruner.after_optimizer_step(optimizer)
    state = callback.pruner.state_dict()
    lam = callback.pruner.strategies[0].lam
    assert state["entries"][0]["lam"] == lam > 0
    again = PruneCallback(recipe)
    again.pruner.attach(tiny_bert())
    again.pruner.start(10)
    again.pruner.load_state_dict(state)
    assert again.pruner.strategies[0].lam == lam


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{group: head, ratio: 0.5, form: penalty}", "lam: auto follows the proximal step"),
        ("{group: head, ratio: 0.5, squared: true}", "lam: auto follows the proximal step"),
        ("{group: head, ratio: 0.5, lam: 3.0, lam_scale: 0.3}", "lam_scale scales lam: auto"),
    ],
)
def test_settings_lam_auto_cannot_serve_are_recipe_errors(config, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(
            "version: 1\npruners:\n  - strategy: block-lasso\n    targets: [BertLayer]\n    config: "
            f"{config}\n"
        )
