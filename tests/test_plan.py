"""The plan is what runs: every schedule ends within the run, every strategy fixes exactly the pattern
``hfprune check`` printed, and a recipe that cannot run as planned is refused before training.

The property tests (hypothesis, derandomized like tests/test_hostile.py) train a tiny BERT with
the stock Trainer for any run length, any start/end/every (steps or fractions) and any gradient
accumulation, and compare what each built-in strategy fixed with what ``hfprune check`` said.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from hfprune import PruneCallback, Pruner, RecipeError, StateError
from hfprune.cli import main
from hfprune.masks import MaskingStrategy
from hfprune.schedule import ScheduleSpec
from hfprune.testing import TokenDataset

from conftest import make_trainer, tiny_bert, tiny_llama, training_args

FFN = [r"re:.*encoder\.layer\.\d+\.(intermediate|output)\.dense"]
LAYERS = [r"re:.*encoder\.layer\.\d+"]
PLANNED = re.compile(r"will zero [\d.]+% \(([\d,]+) weights\)")

PROPERTY_SETTINGS = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def recipe_text(strategy: str, targets: list[str], config: dict, schedule: dict) -> str:
    entry = {"strategy": strategy, "targets": targets, "schedule": schedule, "config": config}
    return yaml.safe_dump({"version": 1, "pruners": [entry]}, sort_keys=False)


def train(tmp_path, text: str, steps: int, accumulation: int = 1, model=None):
    """Train ``model`` (a tiny BERT) for ``steps`` optimizer steps with the recipe; the callback."""
    callback = PruneCallback(text)
    trainer = make_trainer(
        tmp_path,
        model or tiny_bert(),
        [callback],
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        logging_steps=1000,
    )
    trainer.train()
    return callback.pruner


def masked_weights(strategy: MaskingStrategy) -> int:
    return sum(int((~keep).sum()) for keep in strategy.masks.keep())


def check_plan(tmp_path, text: str, steps: int, model_dir) -> str:
    """``hfprune check``'s output for the recipe at ``steps`` total steps."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["check", str(recipe), "--model", str(model_dir), "--total-steps", str(steps)]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(directory)
    return directory


# --- the schedule's end is inside the run -------------------------------------------------------

END_OF_RUN_CASES = {
    # the cases of the report: a 12-step run with the default `end: 1.0`
    "block-lasso heads": ("block-lasso", LAYERS, {"group": "head", "ratio": 0.5}, {}),
    "block-lasso neurons, large lam": (
        "block-lasso",
        LAYERS,
        {"group": "neuron", "ratio": 0.5, "lam": 50.0},
        {},
    ),
    "rpp": ("rpp", FFN, {"sparsity": 0.5}, {}),
    "magnitude every 5": ("magnitude", FFN, {"sparsity": 0.9}, {"every": 5}),
    "importance, end 0.96": ("importance", LAYERS, {"group": "neuron", "ratio": 0.5}, {"end": 0.96}),
}


@pytest.mark.parametrize("case", END_OF_RUN_CASES, ids=list(END_OF_RUN_CASES))
def test_a_schedule_ending_at_the_end_of_training_fixes_exactly_the_planned_pattern(tmp_path, case):
    strategy, targets, config, schedule = END_OF_RUN_CASES[case]
    pruner = train(tmp_path, recipe_text(strategy, targets, config, schedule), steps=12)
    plan, fixed = pruner.plans[0], pruner.strategies[0]
    assert fixed.masks.active, "the pattern was never fixed"
    assert masked_weights(fixed) == round(plan.planned_sparsity * plan.numel)
    assert pruner.sparsity()["sparsity"] == pytest.approx(plan.planned_sparsity, abs=0.5 / plan.numel)


def test_a_block_pattern_fixed_at_the_last_step_compacts(tmp_path):
    pruner = train(
        tmp_path, recipe_text("block-lasso", LAYERS, {"group": "head", "ratio": 0.5}, {}), steps=12
    )
    model = pruner._model
    smaller = pruner.compact(model)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())


def test_layer_lasso_settles_at_the_last_step_of_the_run(tmp_path):
    text = recipe_text("layer-lasso", ["bert.encoder.layer"], {"keep": 1, "gate_lr": 0.1}, {})
    pruner = train(tmp_path, text, steps=6)
    settled = pruner.strategies[0].settled
    assert settled is not None and sorted(float(g) for g in settled) == [0.0, 1.0]


# --- a schedule that cannot run as planned is refused before training ---------------------------


@pytest.mark.parametrize("schedule", [{"end": 1000}, {"start": 500, "end": 1000}, {"end": 12}])
def test_a_step_schedule_beyond_the_run_is_a_located_error_before_any_step(tmp_path, schedule):
    text = recipe_text("magnitude", FFN, {"sparsity": 0.5}, schedule)
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RecipeError, match=r"pruners\[0\]\.schedule: .*this run's last optimizer step is 11"):
        train(tmp_path, text, steps=12, model=model)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_check_refuses_a_step_schedule_beyond_total_steps(tmp_path, bert_dir, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text("magnitude", FFN, {"sparsity": 0.5}, {"end": 1000}))
    assert main(["check", str(recipe), "--model", str(bert_dir), "--total-steps", "12"]) == 1
    err = capsys.readouterr().err
    assert "pruners[0].schedule" in err and "last optimizer step is 11" in err and "Traceback" not in err


# --- the printed plan is the plan that runs --------------------------------------------------------


def test_one_key_value_head_with_head_ratio_half_is_refused_as_pruning_nothing():
    model = tiny_llama()
    model.config.num_key_value_heads = 1
    for layer in model.model.layers:  # rebuild the attention with one key/value head
        attention = layer.self_attn
        attention.config.num_key_value_heads = 1
        attention.num_key_value_groups = 4
        head_dim = attention.head_dim
        attention.k_proj = torch.nn.Linear(32, head_dim, bias=False)
        attention.v_proj = torch.nn.Linear(32, head_dim, bias=False)
    text = recipe_text("block-lasso", [r"re:model\.layers\.\d+"], {"group": "head", "ratio": 0.5}, {})
    with pytest.raises(RecipeError, match=r"pruners\[0\]\.config: asks for 50% but would prune nothing"):
        PruneCallback(text).pruner.attach(model)


def test_check_prints_the_rounded_plan_and_training_reaches_it(tmp_path, bert_dir):
    # 2 heads per layer at ratio 0.3: round(0.6) = 1 head goes, half of the attention weights, not 30%
    text = recipe_text("block-lasso", LAYERS, {"group": "head", "ratio": 0.3}, {"end": 0.5})
    printed = PLANNED.search(check_plan(tmp_path, text, 8, bert_dir))
    pruner = train(tmp_path, text, steps=8)
    assert int(printed.group(1).replace(",", "")) == masked_weights(pruner.strategies[0])
    assert pruner.plans[0].planned_sparsity == 0.5


# --- property: any schedule, any accumulation ---------------------------------------------------


@st.composite
def schedules(draw):
    """A run length and a schedule for it, in steps, fractions or both."""
    steps = draw(st.integers(1, 9))
    end = draw(st.integers(0, steps - 1))
    start = draw(st.integers(0, end))

    def written(step: int):
        if draw(st.booleans()):
            return step
        return draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9, 1.0]))

    spec = {"start": written(start), "end": written(end), "every": draw(st.integers(1, 4))}
    try:
        ScheduleSpec.model_validate(spec).resolve(steps)
    except ValueError:  # fractions that put start after end: a mix no one means
        spec = {"start": start, "end": end, "every": spec["every"]}
    return steps, spec


UNSTRUCTURED_CONFIGS = st.fixed_dictionaries(
    {"sparsity": st.floats(0.05, 0.95), "scope": st.sampled_from(["layer", "global"])}
)
STRUCTURED_CONFIGS = st.fixed_dictionaries(
    {
        "group": st.sampled_from(["head", "neuron"]),
        "ratio": st.floats(0.3, 0.9),
        "multiple_of": st.sampled_from([1, 8]),
    }
)
PROPERTY_CASES = {
    "magnitude": (FFN, UNSTRUCTURED_CONFIGS),
    "rpp": (FFN, UNSTRUCTURED_CONFIGS),
    "block-lasso": (LAYERS, STRUCTURED_CONFIGS),
    "importance": (LAYERS, STRUCTURED_CONFIGS),
}


@pytest.mark.parametrize("strategy", PROPERTY_CASES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_any_schedule_reaches_exactly_the_plan_check_printed(tmp_path, bert_dir, strategy, data):
    targets, configs = PROPERTY_CASES[strategy]
    steps, schedule = data.draw(schedules())
    config = data.draw(configs)
    if config.get("group") == "head":
        config["multiple_of"] = 1  # 2 heads per layer
    accumulation = data.draw(st.integers(1, 3))
    text = recipe_text(strategy, targets, config, schedule)
    note(f"{steps} steps, accumulation {accumulation}:\n{text}")
    printed = PLANNED.search(check_plan(tmp_path, text, steps, bert_dir))
    pruner = train(tmp_path, text, steps, accumulation)
    fixed = pruner.strategies[0]
    assert fixed.masks.active, "the schedule ended within the run, so the pattern is fixed"
    assert masked_weights(fixed) == int(printed.group(1).replace(",", ""))
    # exact zeros are at least the masked ones (a proximal phase may leave more it did not mask)
    assert pruner.sparsity()["sparsity"] >= pruner.plans[0].planned_sparsity - 0.5 / pruner.plans[0].numel


# --- the model at the end of training is the pruned one --------------------------------------------


class FirstIsBest:
    """A metric that only gets worse: the Trainer's best checkpoint is its first."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prediction):
        self.calls += 1
        return {"score": -self.calls}


def best_model_trainer(tmp_path, callback, **overrides):
    from transformers import Trainer

    args = training_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
        **overrides,
    )
    data = TokenDataset(size=16)
    return Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=TokenDataset(),
        eval_dataset=data,
        compute_metrics=FirstIsBest(),
        callbacks=[callback],
    )


BEST_MODEL_RECIPE = recipe_text("magnitude", FFN, {"sparsity": 0.75}, {"end": 0.5})


def test_a_best_checkpoint_from_before_the_pattern_was_fixed_is_refused(tmp_path):
    trainer = best_model_trainer(tmp_path, PruneCallback(BEST_MODEL_RECIPE))
    with pytest.raises(StateError, match=r"reloaded from a checkpoint saved after 2 optimizer steps"):
        trainer.train()


def test_a_best_checkpoint_from_after_the_pattern_was_fixed_is_the_pruned_model(tmp_path):
    callback = PruneCallback(BEST_MODEL_RECIPE)
    trainer = best_model_trainer(tmp_path, callback, eval_delay=7)  # the pattern is fixed after 7 steps
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-8")
    assert callback.pruner.sparsity()["sparsity"] == pytest.approx(0.75)


def test_weights_changed_behind_the_pruners_back_are_refused_at_the_end(tmp_path):
    pruner = train(tmp_path, BEST_MODEL_RECIPE, steps=8)
    pruner.finish()  # as trained: no complaint
    with torch.no_grad():
        pruner._model.bert.encoder.layer[0].intermediate.dense.weight.add_(1.0)
    with pytest.raises(StateError, match=r"no longer match the pruning state of pruners\[0\].*non-zero"):
        pruner.finish()


def test_a_run_stopped_before_the_schedule_ends_warns(tmp_path, caplog):
    from conftest import StopAt

    callback = PruneCallback(BEST_MODEL_RECIPE)
    make_trainer(tmp_path, tiny_bert(), [callback, StopAt(3)], max_steps=12).train()
    assert "training stopped after 3 optimizer steps, before pruners[0] (0.magnitude) fixed" in caplog.text


def test_a_skipped_last_step_still_fixes_the_pattern_when_training_ends():
    model = tiny_bert()
    pruner = Pruner(recipe_text("magnitude", FFN, {"sparsity": 0.5}, {}))
    pruner.attach(model)
    pruner.start(total_steps=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner.check_optimizer(optimizer)
    batch = TokenDataset()[0]
    for step in range(4):
        model(input_ids=batch["input_ids"][None], labels=torch.tensor([batch["labels"]])).loss.backward()
        pruner.before_optimizer_step(optimizer)
        last = step == 3
        if not last:  # the last step is one an fp16 GradScaler skipped: no weight changes
            optimizer.step()
        pruner.after_optimizer_step(optimizer, skipped=last)
        optimizer.zero_grad()
    assert pruner.sparsity()["sparsity"] < 0.49  # the ramp's value at step 2: the update at 3 was missed
    pruner.finish()
    assert pruner.sparsity()["sparsity"] == pytest.approx(0.5)


def test_an_entry_that_fixes_no_pattern_is_not_held_to_one_at_the_end(tmp_path, caplog):
    text = recipe_text("layer-lasso", ["bert.encoder.layer"], {"dropout": 0.5}, {"end": 0.5})
    pruner = train(tmp_path, text, steps=4)
    pruner.finish(reloaded_step=1)  # layer-wise dropout alone: any checkpoint is the model it trains
    assert "fixed its pattern" not in caplog.text


def test_a_trial_a_search_prunes_mid_run_is_not_taken_for_a_reloaded_best_model(tmp_path):
    from transformers import TrainerControl, TrainerState

    callback = PruneCallback(BEST_MODEL_RECIPE)
    from conftest import StopAt

    make_trainer(
        tmp_path, tiny_bert(), [callback, StopAt(2)], max_steps=12
    ).train()  # the pruning is fixed after 7
    state = TrainerState(max_steps=12, global_step=2, best_model_checkpoint=str(tmp_path / "checkpoint-2"))
    args = training_args(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
    callback.on_train_end(args, state, TrainerControl())  # as Trainer does before raising TrialPruned


def test_check_says_training_decides_a_global_block_plan(tmp_path, bert_dir):
    text = recipe_text("importance", LAYERS, {"group": "neuron", "ratio": 0.5, "scope": "global"}, {})
    out = check_plan(tmp_path, text, 8, bert_dir)
    assert "sparsity set by training" in out and "will zero" not in out
