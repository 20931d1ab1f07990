"""Every built-in strategy under gradient accumulation, bf16 autocast and fp16 overflow.

Strategies act once per real optimizer step: a run that accumulates four micro-batches
per step ends as a run that takes the same 32 examples in one batch; under bf16 autocast
they train and reach what they plan; and a step the fp16 loss scaler skips for overflow
changes nothing, while the engine still counts it.

The strategies run with the configs ``tests/test_conformance.py`` holds every built-in to
(imported from there, not copied), on the conformance kit's tiny BERT, with its schedule
``{start: 0, end: 4, every: 2}`` and ``reweight_every: 2``; the tables below that name
steps assume that schedule.

Already covered elsewhere, so not repeated here: in tests/test_training.py the Trainer's
and accelerate's gradient accumulation step the pruner once per optimizer step (magnitude
only, step counts and final sparsity), and a GradScaler-skipped step leaves magnitude's
targets unchanged and still counts.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import test_conformance as conformance
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from hfprune import PruneCallback, PruneOptimizer, Pruner
from hfprune.masks import MaskingStrategy
from hfprune.plugins import Registry, build_registry
from hfprune.strategy import Strategy
from hfprune.testing import Case, TokenDataset, one_thread, snapshot

STEPS = 8  # optimizer steps per run: the schedule ends at step 4, so four steps follow with the pattern fixed

# The configs test_conformance.py runs every built-in with, by a name for test ids.
BUILT_INS: dict[str, type] = {
    "magnitude": conformance.TestMagnitude,
    "rpp": conformance.TestRPP,
    "block-lasso-head": conformance.TestBlockLassoHeads,  # proximal form
    "block-lasso-neuron": conformance.TestBlockLassoNeurons,  # penalty form
    "layer-lasso": conformance.TestLayerLasso,
    "importance-head": conformance.TestImportanceHeads,
    "importance-neuron": conformance.TestImportanceNeurons,  # fisher, global scope
}
STRUCTURED = {
    "block-lasso-head",
    "block-lasso-neuron",
    "layer-lasso",
    "importance-head",
    "importance-neuron",
}  # these fix a plan compaction can act on


def case_of(name: str, **config: Any) -> Case:
    """The conformance Case of built-in ``name``, with ``config`` overriding keys of its config."""
    cls = BUILT_INS[name]
    return Case(cls.strategy, {**cls.config, **config}, tuple(cls.targets), dict(cls.schedule), steps=STEPS)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return build_registry()


@pytest.fixture(scope="module", autouse=True)
def _frozen_garbage_collector() -> Iterator[None]:
    """Let the Trainer's gc.collect() skip the objects that exist before these tests: each train() ends with
    one
    (accelerate's free_memory), which otherwise walks everything the imports made, about half a second a run
    here."""
    gc.freeze()
    yield
    gc.unfreeze()


# --- comparing what runs left behind -------------------------------------------------------------


def differences(
    expected: Any, actual: Any, *, atol: float = 0.0, rtol: float = 0.0, path: str = ""
) -> list[str]:
    """Where two snapshots differ: bool and integer tensors and plain values exactly, floating values within
    atol/rtol.

    With the default tolerances of 0 every float must match bit for bit.
    """
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = [f"{path}.{key} (only in one)" for key in expected.keys() ^ actual.keys()]
        for key in expected.keys() & actual.keys():
            found += differences(expected[key], actual[key], atol=atol, rtol=rtol, path=f"{path}.{key}")
        return found
    if (
        isinstance(expected, list | tuple)
        and isinstance(actual, list | tuple)
        and len(expected) == len(actual)
    ):
        pairs = enumerate(zip(expected, actual))
        return [
            d for i, (a, b) in pairs for d in differences(a, b, atol=atol, rtol=rtol, path=f"{path}[{i}]")
        ]
    if torch.is_tensor(expected) and torch.is_tensor(actual):
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            return [f"{path}: {expected.dtype}{tuple(expected.shape)} vs {actual.dtype}{tuple(actual.shape)}"]
        if not expected.is_floating_point():
            return (
                []
                if torch.equal(expected, actual)
                else [f"{path}: {int((expected != actual).sum())} entries differ"]
            )
        if torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True):
            return []
        return [f"{path}: max |difference| {(actual - expected).abs().max().item():.3g}"]
    if isinstance(expected, float) and isinstance(actual, float):
        return (
            []
            if math.isclose(actual, expected, abs_tol=atol, rel_tol=rtol)
            else [f"{path}: {expected!r} vs {actual!r}"]
        )
    return [] if expected == actual else [f"{path}: {expected!r} vs {actual!r}"]


def masked_weights_nonzero(strategy: Strategy) -> list[str]:
    """The parameters of a MaskingStrategy with non-zero weights where its mask prunes."""
    if not isinstance(strategy, MaskingStrategy) or not strategy.masks.active:
        return []
    masks = strategy.masks
    return [name for name, param, keep in zip(masks.names, masks.params, masks.keep()) if param[~keep].any()]


def assert_ends_as_planned(pruner: Pruner, name: str) -> None:
    """After the schedule's end: masked weights exactly zero, planned sparsity reached, a compaction plan for
    structured strategies."""
    [plan], [strategy] = pruner.plans, pruner.strategies
    assert not masked_weights_nonzero(strategy), (
        f"non-zero where the mask prunes: {masked_weights_nonzero(strategy)}"
    )
    planned = plan.config.planned_sparsity()
    if planned is not None:
        reached = pruner.sparsity()[f"sparsity/{plan.label}"]
        assert reached == pytest.approx(planned, abs=0.01), (
            f"planned sparsity {planned}, reached {reached:.4f}"
        )
    if name in STRUCTURED:
        assert pruner.compaction_plan(), f"{name} offers no compaction plan after its schedule's end"
    if name == "layer-lasso":
        assert sum(strategy.settled) == plan.config.keep


# --- stock Trainer runs ----------------------------------------------------------------------------


@dataclass
class TrainerRun:
    trainer: Trainer
    callback: PruneCallback
    records: list[dict]  # one per optimizer step, from StepRecorder

    @property
    def pruner(self) -> Pruner:
        return self.callback.pruner

    @property
    def strategy(self) -> Strategy:
        return self.callback.pruner.strategies[0]

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.trainer.model.named_parameters()}

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.trainer.state.log_history if "loss" in entry]


class StepRecorder(TrainerCallback):
    """After every optimizer step: the Trainer's and the pruner's step counts, and a copy of what the strategy
    holds.

    Registered after the PruneCallback, so it sees each step after the pruner acted on it.
    """

    def __init__(self, callback: PruneCallback):
        self.callback = callback
        self.records: list[dict] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        strategy = self.callback.pruner.strategies[0]
        self.records.append(
            {
                "global_step": state.global_step,
                "pruner_step": self.callback.pruner.step,
                "skipped": bool(getattr(optimizer, "step_was_skipped", False)),
                "lr": optimizer.param_groups[0]["lr"],
                "scale": optimizer.scaler.get_scale()
                if getattr(optimizer, "scaler", None) is not None
                else None,  # after update()
                "state": snapshot(strategy.state_dict()),
                "plan": snapshot(strategy.compaction_plan()),
                "weights": snapshot(dict(model.named_parameters())),
            }
        )


def train_with_trainer(
    case: Case,
    registry: Registry,
    output_dir: Path,
    *,
    callbacks=(),
    before_train=None,
    **overrides,
) -> TrainerRun:
    """``case`` for STEPS optimizer steps in a stock Trainer with a PruneCallback; ``overrides`` go to
    TrainingArguments.

    Data comes in dataset order (sequential sampling), so runs that split the same examples
    into different micro-batches see the same examples at every optimizer step. The log
    keeps NaN and inf losses (logging_nan_inf_filter off) and logs every step.
    """
    callback = PruneCallback(case.recipe(registry), registry=registry)
    recorder = StepRecorder(callback)
    settings = dict(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
        train_sampling_strategy="sequential",
        dataloader_drop_last=True,
    )
    settings.update(overrides)
    trainer = Trainer(
        model=case.model_factory(),
        args=TrainingArguments(**settings),
        train_dataset=TokenDataset(size=64),
        callbacks=[callback, recorder, *callbacks],
    )
    if before_train is not None:
        before_train(trainer)
    with one_thread():
        trainer.train()
    return TrainerRun(trainer, callback, recorder.records)


# --- 1. gradient accumulation ---------------------------------------------------------------------

# Four micro-batches of 8 sum their gradients in another order than one batch of 32, so float32
# results differ in the last bits, and Adam's first steps (update about lr * sign(grad)) and the
# strategies' thresholds carry such differences forward a little: weights and float state agree to
# ACCUMULATION_TOL, not exactly. Masks and plans are booleans and must be equal, since no weight lies
# within that tolerance of a threshold in these runs. Fixed-step values (counts, flags) are exact.
ACCUMULATION_TOL = dict(atol=1e-5, rtol=1e-4)


def divide_loss_by_accumulation(trainer: Trainer) -> None:
    """Have the Trainer average the micro-batch losses, so an accumulated step's gradient is the large
    batch's.

    BertForSequenceClassification takes ``**kwargs``, so the Trainer assumes its loss is
    normalised by ``num_items_in_batch`` and does not divide it by the accumulation steps; but
    its loss is a plain mean that ignores that count, and four micro-batches would give four
    times the gradient of one batch. ``loss_is_scaled_for_ga`` is the Trainer's documented
    switch for this (a transformers matter, not hfprune's).
    """
    trainer.loss_is_scaled_for_ga = False


@pytest.mark.parametrize("name", BUILT_INS)
def test_gradient_accumulation_ends_as_one_large_batch_does(name, registry, tmp_path):
    """4 micro-batches of 8 per step end as 1 batch of 32 per step: same step counts, same firing steps, same
    result.

    Layer-lasso runs without layer-wise dropout here: dropout draws one random number per layer
    per forward pass, so four forward passes draw other layers to drop than one does (a
    different random process, not a different step count). Its ``settle_shift``, a report
    measured on the last forward pass, which is the last micro-batch (8 of the step's 32
    examples) when accumulating, is compared to 1%.
    """
    case = case_of(name, dropout=0.0) if name == "layer-lasso" else case_of(name)
    accumulated = train_with_trainer(
        case,
        registry,
        tmp_path / "accumulated",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        before_train=divide_loss_by_accumulation,
    )
    large_batch = train_with_trainer(
        case,
        registry,
        tmp_path / "large-batch",
        per_device_train_batch_size=32,
        gradient_accumulation_steps=1,
        before_train=divide_loss_by_accumulation,
    )
    assert accumulated.losses == pytest.approx(
        large_batch.losses, rel=1e-5
    )  # the same examples at every step

    for run in (accumulated, large_batch):
        # One pruner step per optimizer step, not per micro-batch: 8 steps, 32 forward passes in the
        # accumulated run.
        assert run.trainer.state.global_step == run.pruner.step == STEPS
        assert (
            [r["pruner_step"] for r in run.records]
            == [r["global_step"] for r in run.records]
            == list(range(1, STEPS + 1))
        )
        adam_steps = {int(state["step"]) for state in run.trainer.optimizer.state.values()}
        assert adam_steps == {STEPS}

    # The schedule fires at the same steps: what the state holds (alphas, masks, gates, flags) and when a plan
    # appears.
    for a, b in zip(accumulated.records, large_batch.records):
        step = a["global_step"] - 1
        if "settle_shift" in a["state"]:
            shifts = a["state"].pop("settle_shift"), b["state"].pop("settle_shift")
            assert shifts[0] == pytest.approx(shifts[1], rel=1e-2, abs=1e-6), (
                f"after step {step}: settle_shift {shifts}"
            )
        assert sorted(a["state"]) == sorted(b["state"]), (
            f"after step {step} the state holds different entries"
        )
        assert (a["plan"] is None) == (b["plan"] is None), (
            f"after step {step} only one run has a compaction plan"
        )
        assert not differences(b["state"], a["state"], **ACCUMULATION_TOL), (
            f"after step {step}: {differences(b['state'], a['state'], **ACCUMULATION_TOL)}"
        )
        assert not differences(b["plan"], a["plan"]), (
            f"after step {step}: {differences(b['plan'], a['plan'])}"
        )
    assert not differences(large_batch.weights, accumulated.weights, **ACCUMULATION_TOL), differences(
        large_batch.weights, accumulated.weights, **ACCUMULATION_TOL
    )
    assert not differences(large_batch.strategy.metrics(), accumulated.strategy.metrics(), **ACCUMULATION_TOL)
    assert_ends_as_planned(accumulated.pruner, name)


# --- 2. bf16 autocast -----------------------------------------------------------------------------


def bf16_autocast_on_cpu() -> bool:
    """Whether this torch build runs a matrix product in bfloat16 under CPU autocast."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


class OutputDtypes(TrainerCallback):
    """Records the dtype of the first encoder layer's FFN output on training forward passes: shows autocast is
    on."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            if module.training:
                self.dtypes.add(output.dtype)

        model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(hook)


@pytest.mark.skipif(not bf16_autocast_on_cpu(), reason="this torch build has no bfloat16 autocast on CPU")
@pytest.mark.parametrize("name", BUILT_INS)
def test_bf16_autocast_trains_every_strategy_to_its_plan(name, registry, tmp_path):
    """bf16 autocast on CPU: finite loss every step, masked weights exactly zero, planned sparsity and
    compaction plans reached.

    Autocast computes in bfloat16 but keeps the weights float32 (checked), so the masks'
    multiplications by 0 and 1 stay exact.
    """
    dtypes = OutputDtypes()
    run = train_with_trainer(case_of(name), registry, tmp_path, bf16=True, callbacks=[dtypes])
    assert dtypes.dtypes == {torch.bfloat16}, (
        f"the forward passes ran in {dtypes.dtypes}, not under bf16 autocast"
    )
    assert {p.dtype for p in run.trainer.model.parameters()} == {torch.float32}
    assert len(run.losses) == STEPS and all(math.isfinite(loss) for loss in run.losses), run.losses
    assert all(t.isfinite().all() for t in run.weights.values())
    assert run.pruner.step == STEPS
    assert_ends_as_planned(run.pruner, name)
    if name in STRUCTURED:
        run.pruner.compact(
            run.trainer.model
        )  # the plan removes what it names, and the smaller model computes the same


# --- 3. fp16 overflow -----------------------------------------------------------------------------
#
# A GradScaler skips the optimizer step when the scaled gradients hold inf or NaN, and accelerate's
# AcceleratedOptimizer then reports ``step_was_skipped``, which PruneCallback and PruneOptimizer pass
# to Pruner.after_optimizer_step. accelerate builds no GradScaler on a CPU, so these tests give it a
# real one, ``torch.amp.GradScaler("cpu")``, and cause the overflow by writing inf into one gradient
# (the classifier's, which no recipe here targets). Its initial scale is 1, so the steps that do run
# are those of plain float32 training; only whether a step runs depends on the scaler.

# The steps at which each strategy does after-step work with the shared schedule ({start: 0, end: 4,
# every: 2}, reweight_every 2): where an overflow must show that the engine held the strategy back.
ACTS_AFTER_THE_STEP = {
    "magnitude": (0, 2, 4),  # the ramp's mask updates, the one at 4 the final pattern
    "rpp": (
        0,
        1,
        3,
        4,
    ),  # proximal steps (reweighting at 1 and 3, proximal_sparsity at 3); the pattern fixed at 4
    "block-lasso-head": (
        0,
        1,
        3,
        4,
    ),  # alphas and a block threshold at 0; thresholds, reweighting at 1 and 3; hard prune at 4
    # Penalty form: at 0 it acts only before the step (alphas, penalty gradient), where no one knows yet
    # that the step will be skipped, and the gradient goes with it. Reweighting at 1 and 3, hard prune at 4.
    "block-lasso-neuron": (1, 3, 4),
    "layer-lasso": (0, 3),  # Adam steps of the gates, at 3 the last one and the settling
    # The step's mask gradients enter the importance average (0-3); the ramp prunes at 0, 2 and 4.
    "importance-head": (0, 1, 2, 3, 4),
    "importance-neuron": (0, 1, 2, 3, 4),
}
OVERFLOW_CASES = [
    pytest.param(name, step, id=f"{name}-step{step}")
    for name, steps in ACTS_AFTER_THE_STEP.items()
    for step in steps
]
# Layer-lasso's copy of the step count (which step its next forward pass belongs to). Like the engine's
# counter it may advance at a skipped step, so the no-change checks leave it out; the layer-lasso test
# below checks what it is for.
STEP_COUNTERS = {"next_step"}


class WithheldUpdateOptimizer(AcceleratedOptimizer):
    """An AcceleratedOptimizer without a scaler that withholds the update of one step and reports that step as
    run.

    The control of the overflow tests: the weights stay as a skipped step leaves them, but
    nothing tells the engine, which lets the strategies act as at any real step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, withhold_at: int):
        super().__init__(optimizer)
        self.withhold_at = withhold_at
        self.calls = 0

    def step(self, closure=None):
        call, self.calls = self.calls, self.calls + 1
        if call != self.withhold_at:
            super().step(closure)


@dataclass
class LoopRun:
    """A hand-written loop's run.

    ``states[k]``: everything that can change, taken just before step k's ``optimizer.step()``
    (``states[steps]``: after the last step). Per step: the loss scale it ran with, whether
    accelerate reported it skipped, the engine's count after it, and whether layer-lasso's
    gates got a gradient in its forward and backward pass.
    """

    pruner: Pruner
    optimizer: AcceleratedOptimizer
    states: list[dict]
    scales: list[float]
    reported_skipped: list[bool]
    pruner_steps: list[int]
    gates_had_grad: list[bool]

    @property
    def adam_steps(self) -> set[int]:
        return {int(state["step"]) for state in self.optimizer.state.values()}


def state_of(model: torch.nn.Module, pruner: Pruner, optimizer: torch.optim.Optimizer) -> dict:
    """Weights, optimizer state and each strategy's state (its masks, alphas, gates), without step
    counters."""
    entries = [
        {k: v for k, v in entry.items() if k not in STEP_COUNTERS} for entry in pruner.state_dict()["entries"]
    ]
    return snapshot(
        {
            "weights": dict(model.named_parameters()),
            "optimizer": optimizer.state_dict()["state"],
            "strategy": entries,
        }
    )


def train_through_overflow(
    case: Case,
    registry: Registry,
    overflow_at: int | None,
    *,
    steps: int = STEPS,
    withhold: bool = False,
    fused: bool = False,
    init_scale: float = 1.0,
) -> LoopRun:
    """``case`` in an accelerate-style loop, ``PruneOptimizer(AcceleratedOptimizer(AdamW, scaler))``; step
    ``overflow_at`` overflows.

    With ``withhold``, the control: no scaler and no overflow, but step ``overflow_at``'s
    update withheld (WithheldUpdateOptimizer). Batches of 8 in dataset order, and torch's
    generator seeded (layer-wise dropout draws from it), so two calls run the same steps up to
    where their arguments differ; at scale 1, with or without a scaler. No gradient clipping,
    as in accelerate's basic loop: nothing unscales the gradients before the step.
    """
    Accelerator(cpu=True)  # AcceleratedOptimizer reads accelerate's process state
    torch.manual_seed(0)
    model = case.model_factory()
    pruner = Pruner(case.recipe(registry), registry)
    pruner.attach(model)
    pruner.start(case.steps)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=not withhold)
    accelerated = (
        WithheldUpdateOptimizer(adamw, overflow_at)
        if withhold
        else AcceleratedOptimizer(adamw, scaler=scaler)
    )
    assert accelerated.gradient_state.sync_gradients, (
        "accelerate's shared state says this is an accumulation micro-step"
    )
    optimizer = PruneOptimizer(accelerated, pruner)
    dataset = TokenDataset(size=64)
    strategy = pruner.strategies[0]
    run = LoopRun(pruner, accelerated, [], [], [], [], [])
    model.train()
    with one_thread():
        for step in range(steps):
            batch = default_data_collator([dataset[(8 * step + i) % len(dataset)] for i in range(8)])
            scaler.scale(model(**batch).loss).backward()
            if step == overflow_at and not withhold:
                model.classifier.weight.grad[0, 0] = float("inf")
            run.gates_had_grad.append(getattr(getattr(strategy, "gates", None), "grad", None) is not None)
            run.states.append(state_of(model, pruner, accelerated))
            run.scales.append(scaler.get_scale())
            optimizer.step()
            optimizer.zero_grad()
            run.reported_skipped.append(accelerated.step_was_skipped)
            run.pruner_steps.append(pruner.step)
    run.states.append(state_of(model, pruner, accelerated))
    return run


@pytest.mark.parametrize(("name", "step"), OVERFLOW_CASES)
def test_an_overflow_step_changes_nothing_but_is_counted(name, step, registry):
    """The step the scaler skips leaves weights, optimizer state and strategy state (masks, alphas, gates)
    exactly as they were.

    The engine still counts it (pruner.step follows the optimizer.step() calls, as the
    Trainer's global step does), and the next step runs normally. The control: the same run
    with that step's update withheld but the step reported as run changes something at it,
    so a pruner that ignored the skip would fail here.
    """
    case = case_of(name)
    run = train_through_overflow(case, registry, overflow_at=step, steps=step + 2)
    assert run.reported_skipped == [s == step for s in range(step + 2)], (
        "the scaler did not skip exactly the overflowing step"
    )
    assert run.pruner_steps == list(range(1, step + 3))
    changed = differences(run.states[step], run.states[step + 1])
    assert not changed, f"the skipped step {step} changed {changed[:5]}"
    # The next step is a real one: AdamW steps (one step fewer than the engine counted) and the strategy's
    # masks hold.
    assert run.adam_steps == {step + 1}
    assert differences(run.states[step + 1]["weights"], run.states[step + 2]["weights"])
    assert not masked_weights_nonzero(run.pruner.strategies[0])

    control = train_through_overflow(case, registry, overflow_at=step, steps=step + 1, withhold=True)
    assert not differences(run.states[step], control.states[step]), (
        "the control run differs before the overflow"
    )
    assert differences(control.states[step], control.states[step + 1]), (
        f"told that step {step} ran, {name} still changed nothing: this step cannot show whether the engine "
        "honours the flag"
    )


@pytest.mark.parametrize("name", BUILT_INS)
@pytest.mark.parametrize("step", [0, 3, 4], ids=["phase-start", "last-phase-step", "schedule-end"])
def test_training_after_an_overflow_step_ends_as_planned(name, step, registry):
    """An overflow at the schedule's start, its last phase step or its end delays the strategy's work; it
    loses none of it.

    Scalers skip steps at any point (and often the first ones, while the scale calibrates):
    the masks, sparsity, layers and compaction plan the schedule promises are still there
    when training ends.
    """
    run = train_through_overflow(case_of(name), registry, overflow_at=step)
    assert (
        run.reported_skipped.count(True) == 1
        and run.pruner_steps[-1] == STEPS
        and run.adam_steps == {STEPS - 1}
    )
    assert_ends_as_planned(run.pruner, name)


@pytest.mark.parametrize("name", ["rpp", "block-lasso-head", "block-lasso-neuron"])
def test_a_penalty_phase_whose_first_step_overflows_begins_at_the_next_real_step(name, registry):
    """Skipping the phase's first step is as if the phase began one step later: the first real step acts as a
    first step does.

    Block-lasso computes its alphas (1 / block norm) from the weights at the phase's first
    step: if that step overflows, the next real one must do it, not go on with alphas of 1.
    The reference run's schedule starts at step 1 and its step 0 overflows too, so both runs
    enter step 1 with the same weights; after it their weights must be identical. (Only
    weights: the state may differ, as each run reweights at its own later steps, and the
    penalty form sets its alphas before a step, when no one knows yet that it will be skipped.)
    """
    case = case_of(name)
    skipped_start = train_through_overflow(case, registry, overflow_at=0, steps=2)
    later_start = train_through_overflow(
        replace(case, schedule={**case.schedule, "start": 1, "end": 5}), registry, overflow_at=0, steps=2
    )
    assert not differences(
        later_start.states[1]["weights"], skipped_start.states[1]["weights"]
    )  # the same weights going into step 1
    changed = differences(later_start.states[2]["weights"], skipped_start.states[2]["weights"])
    assert not changed, (
        f"the first real step of the phase acted otherwise than a phase's first step: {changed[:5]}"
    )


def test_layer_lasso_gates_the_first_forward_pass_of_its_phase_after_an_overflow(registry):
    """The step before the phase overflows: the gates still take part in the phase's first forward pass.

    The gates act through forward hooks, which ask the strategy which step the forward
    pass belongs to; after a skipped step that must be the engine's next step, or the phase
    loses its first step's task gradient (and layer-wise dropout starts a step late).
    """
    case = case_of("layer-lasso")
    run = train_through_overflow(
        replace(case, schedule={**case.schedule, "start": 1, "end": 5}), registry, overflow_at=0, steps=2
    )
    assert run.reported_skipped == [True, False]
    assert run.gates_had_grad == [False, True], (
        "the gates sat out the forward pass of step 1, the first of their phase"
    )


def test_an_overflow_is_seen_when_a_fused_optimizer_skips_it(registry):
    """With a fused AdamW the GradScaler hands the skipping to the optimizer, and accelerate reports no
    skipped step.

    The scaler still halves its scale, as it does exactly when it found inf or NaN: the
    engine must treat the step as skipped all the same (rpp, whose proximal step would
    otherwise shrink the weights at it). Fused AdamW is the Trainer's default optimizer with
    this torch (see the Trainer test below).
    """
    step = 1
    run = train_through_overflow(case_of("rpp"), registry, overflow_at=step, steps=step + 2, fused=True)
    assert run.scales[step + 1] == run.scales[step] / 2, "the scaler found no overflow"
    assert run.adam_steps == {step + 1}, "the fused AdamW did not skip the overflowing step"
    changed = differences(run.states[step], run.states[step + 1])
    assert not changed, (
        f"accelerate reported skipped={run.reported_skipped[step]}; the skipped step changed {changed[:5]}"
    )
    assert run.pruner_steps == list(range(1, step + 3))


@pytest.mark.parametrize("name", BUILT_INS)
def test_strategies_act_on_gradients_whatever_the_loss_scale(name, registry):
    """Scaling the loss by a power of two changes no float32 result but the gradients' scale; strategies must
    not see it.

    A GradScaler multiplies the loss (2**16 at first) and divides the model's gradients back
    inside its step. Strategies that read gradients before that step, or own parameters the
    optimizer does not know (layer-lasso's gates), must work on unscaled ones: otherwise a
    penalty added to the gradients shrinks by the scale, and a regularizer added to the gates'
    gradients drowns in it. Runs at scale 1 and 2**10, with no overflow, end bit for bit alike.
    """
    unscaled = train_through_overflow(case_of(name), registry, overflow_at=None)
    scaled = train_through_overflow(case_of(name), registry, overflow_at=None, init_scale=2.0**10)
    assert scaled.scales == [2.0**10] * STEPS and not any(scaled.reported_skipped)
    changed = differences(unscaled.states[-1], scaled.states[-1])
    assert not changed, f"a loss scale of 2**10 changed what {name} did: {changed[:5]}"


class OverflowAt(TrainerCallback):
    """Writes inf into the classifier's gradient during the backward pass of one optimizer step, as an fp16
    overflow does."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            handle = model.classifier.weight.register_hook(
                lambda grad: (handle.remove(), torch.full_like(grad, float("inf")))[1]
            )


def install_grad_scaler(trainer: Trainer) -> None:
    """Give the Trainer's accelerator the GradScaler it builds for fp16 on a GPU, so its optimizer skips
    overflowing steps.

    Set before ``train()``: accelerate wraps the optimizer with the accelerator's scaler there,
    and scales every loss with it. The forward passes stay float32 (fp16 autocast is not
    switched on): loss scaling and the overflow check are all of fp16 the engine sees, and
    scale 1 keeps the steps that run those of float32 training.
    """
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)


def assert_trainer_step_changed_nothing(run: TrainerRun, step: int) -> None:
    """The records after ``step`` and after the step before it hold the same weights, strategy state and
    plan."""
    before, after = run.records[step - 1], run.records[step]
    changed = differences(
        {k: before[k] for k in ("weights", "state", "plan")},
        {k: after[k] for k in ("weights", "state", "plan")},
    )
    changed = [c for c in changed if not any(c.startswith(f".state.{counter}") for counter in STEP_COUNTERS)]
    assert not changed, f"the skipped step {step} changed {changed[:5]}"


@pytest.mark.parametrize("name", BUILT_INS)
def test_an_overflow_step_in_a_stock_trainer_changes_nothing_but_is_counted(name, registry, tmp_path):
    """The same through PruneCallback: the Trainer's optimizer skips one step, the strategy does nothing at
    it, the counts agree.

    The step is the last of ACTS_AFTER_THE_STEP[name], where the loop test's control shows
    that the strategy acts when the step is reported as run; both paths reach the engine
    through the same Pruner.after_optimizer_step(optimizer, skipped=optimizer.step_was_skipped).
    Non-fused AdamW, whose skips accelerate reports (the fused default: the next test).
    """
    step = ACTS_AFTER_THE_STEP[name][-1]
    run = train_with_trainer(
        case_of(name),
        registry,
        tmp_path,
        callbacks=[OverflowAt(step)],
        before_train=install_grad_scaler,
        optim="adamw_torch",
    )
    assert [r["skipped"] for r in run.records] == [s == step for s in range(STEPS)]
    assert (
        [r["pruner_step"] for r in run.records]
        == [r["global_step"] for r in run.records]
        == list(range(1, STEPS + 1))
    )
    assert run.records[step]["lr"] == run.records[step - 1]["lr"], (
        "the LR scheduler moved at the skipped step"
    )
    assert_trainer_step_changed_nothing(run, step)
    assert len(run.losses) == STEPS and all(
        math.isfinite(loss) for loss in run.losses
    )  # the inf was in a gradient only


def test_an_overflow_step_in_a_stock_trainer_with_its_default_optimizer_changes_nothing(registry, tmp_path):
    """The Trainer's default optimizer (fused AdamW with this torch) skips an overflowing step without
    accelerate saying so.

    The engine must hold the strategy back all the same (rpp at step 1, a proximal step).
    """
    step = 1
    run = train_with_trainer(
        case_of("rpp"), registry, tmp_path, callbacks=[OverflowAt(step)], before_train=install_grad_scaler
    )
    inner = run.trainer.optimizer.optimizer
    if not inner.defaults.get("fused"):
        pytest.skip(
            f"the Trainer's default optimizer here is {type(inner).__name__} without fused: the test above "
            "covers it"
        )
    assert run.records[step]["scale"] == run.records[step - 1]["scale"] / 2, "the scaler found no overflow"
    assert [r["pruner_step"] for r in run.records] == list(range(1, STEPS + 1))
    assert_trainer_step_changed_nothing(run, step)
