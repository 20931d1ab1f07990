"""A conformance kit for strategy plugins: the engine's contract with a strategy, checked on a real model.

In a plugin's test suite::

    from hfprune.testing import StrategyConformance


    class TestMyMethod(StrategyConformance):
        strategy = "mymethod"                 # the name a recipe uses
        config = {"sparsity": 0.5}            # a valid ``config:`` for the tiny model
        distribution = "hfprune-mymethod"     # who must provide it (optional)

pytest then collects one test per check from the class. Every check runs the strategy the
way hfprune runs it: found through the ``hfprune`` entry-point group, attached by a recipe,
driven by :class:`hfprune.PruneCallback` in a stock ``transformers.Trainer`` on a random
2-layer BERT of width 32 (:func:`tiny_bert`, built in milliseconds on a CPU), checkpointed
and resumed by the Trainer. A failure says what is wrong and what to change.

The same checks are plain functions over a :class:`Case` (what is tested) and a
:class:`Run` (what a training run showed), for suites that do not use the class.
Needs pytest (in hfprune's ``test`` extra).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hfprune.callback import PruneCallback
from hfprune.compaction.compact import probe_batch
from hfprune.errors import PluginError, RecipeError, StateError
from hfprune.integrations.lora import SparseLora, keep_sparse, lora_layers
from hfprune.integrations.peft_names import model_view
from hfprune.masks import MaskingStrategy
from hfprune.plugins import ENTRY_POINT_GROUP, Registry, StrategyInfo, build_registry
from hfprune.pruner import EntryPlan, Pruner
from hfprune.recipe.schema import Recipe, load_recipe
from hfprune.schedule import Schedule, ScheduleSpec
from hfprune.state import STATE_FILE
from hfprune.strategy import Strategy, StrategyConfig

VOCAB = 100
FFN_TARGETS = (r"re:.*encoder\.layer\.\d+\.(intermediate|output)\.dense",)  # tiny_bert's 4 FFN matrices
DEFAULT_SCHEDULE = {"start": 0, "end": 4, "every": 2}
UNKNOWN_KEY = "not_a_config_key"
RESUME_POINTS = ("mid-schedule", "after-end")  # where the resume check restarts a run: see Case.resume_points


# --- the tiny model and data ------------------------------------------------------------------


def tiny_bert(seed: int = 0, layers: int = 2) -> BertForSequenceClassification:
    """A random BERT classifier (hidden 32, 2 heads, FFN 64, vocabulary 100, no dropout), the same for the
    same seed."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(config)


class TokenDataset(torch.utils.data.Dataset):
    """Deterministic random token sequences; label = parity of the first token (learnable, so the loss moves),
    or with ``causal_lm`` the sequence itself, for language models."""

    def __init__(self, size: int = 64, length: int = 16, causal_lm: bool = False):
        self.size, self.length, self.causal_lm = size, length, causal_lm

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        ids = torch.randint(0, VOCAB, (self.length,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids.clone() if self.causal_lm else int(ids[0] % 2)}


# --- what is tested, and what a run showed ------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One strategy under test: a one-entry recipe, the model it meets and how long it trains.

    ``steps`` must leave at least two optimizer steps after the schedule's ``end``, so the
    run shows the strategy both while its pattern changes and after it is fixed.
    """

    strategy: str
    config: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = FFN_TARGETS
    schedule: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    distribution: str | None = None
    steps: int = 8
    model_factory: Callable[[], nn.Module] = tiny_bert

    def __post_init__(self):
        if self.resolved_schedule.end + 2 > self.steps:
            raise ValueError(
                f"steps={self.steps} ends too soon for schedule {self.schedule}: the checks need at least "
                "two optimizer "
                f"steps after the schedule's end (step {self.resolved_schedule.end}); set steps to "
                f"{self.resolved_schedule.end + 2} or more"
            )

    @property
    def resolved_schedule(self) -> Schedule:
        return ScheduleSpec.model_validate(self.schedule).resolve(self.steps)

    @property
    def resume_points(self) -> dict[str, int]:
        """Checkpoints the resume check restarts from: the middle of the schedule (state that still changes)
        and after its end."""
        schedule = self.resolved_schedule
        return dict(zip(RESUME_POINTS, (max(1, (schedule.start + schedule.end) // 2), schedule.end + 1)))

    def recipe_data(self, **config_overrides: Any) -> dict:
        """The recipe as a mapping, as ``load_recipe`` reads it."""
        entry = {
            "strategy": self.strategy,
            "targets": list(self.targets),
            "schedule": dict(self.schedule),
            "config": {**self.config, **config_overrides},
        }
        return {"version": 1, "pruners": [entry]}

    def recipe(self, registry: Registry) -> Recipe:
        """The validated recipe; a bad ``config`` or ``schedule`` fails here with the recipe's own error."""
        try:
            return load_recipe(self.recipe_data(), registry)
        except RecipeError as exc:
            raise AssertionError(
                f"the conformance recipe for {self.strategy!r} does not load:\n{exc}\n"
                "Fix `config` or `schedule` on the conformance class (or the strategy's Config, if the "
                "config is valid)."
            ) from None


@dataclass(frozen=True)
class StepRecord:
    """What the strategy showed right after one optimizer step (``step`` counts from 0), copied so later steps
    cannot change it."""

    step: int
    metrics: Any
    state: Any
    plan: Any
    masks_active: bool | None  # None: not a MaskingStrategy
    masked_weights: list[str]  # "<count> weights of <name>" non-zero where the mask prunes
    masked_optimizer_state: list[str]  # "<key> of <name>" non-zero where the mask prunes


@dataclass
class Run:
    """A stock Trainer run of a Case: the model, the engine, a record per optimizer step and the final weights
    and state."""

    case: Case
    registry: Registry
    output_dir: Path
    model: nn.Module
    callback: PruneCallback
    loss: float  # the mean training loss over the run's steps, NaN if any step's was
    records: list[StepRecord]
    final_weights: dict[str, torch.Tensor]
    final_state: dict[str, Any]
    final_sparsity: dict[str, float]
    end_refusal: str | None = None  # the StateError the engine raised at the end of training, if any

    @property
    def strategy(self) -> Strategy:
        return self.callback.pruner.strategies[0]

    @property
    def plan(self) -> EntryPlan:
        return self.callback.pruner.plans[0]


def snapshot(value: Any) -> Any:
    """A copy of ``value`` whose tensors no longer share memory with the strategy's own."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(item) for item in value)
    return value


class _Recorder(TrainerCallback):
    """After every optimizer step, records what the strategy reports and whether its masks hold."""

    def __init__(self, callback: PruneCallback):
        self.callback = callback
        self.records: list[StepRecord] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        strategy = self.callback.pruner.strategies[0]
        masking = isinstance(strategy, MaskingStrategy)
        self.records.append(
            StepRecord(
                step=state.global_step - 1,
                metrics=snapshot(strategy.metrics()),
                state=snapshot(strategy.state_dict()),
                plan=snapshot(strategy.compaction_plan()),
                masks_active=strategy.masks.active if masking else None,
                masked_weights=_masked_weights(strategy) if masking else [],
                masked_optimizer_state=_masked_optimizer_state(strategy, optimizer) if masking else [],
            )
        )


def _masked_weights(strategy: MaskingStrategy) -> list[str]:
    if not strategy.masks.active:
        return []
    found = []
    for name, param, keep in zip(strategy.masks.names, strategy.masks.weights(), strategy.masks.keep()):
        count = int(param.detach()[~keep].count_nonzero())
        if count:
            found.append(f"{count} weights of {name}")
    return found


def _masked_optimizer_state(strategy: MaskingStrategy, optimizer: torch.optim.Optimizer) -> list[str]:
    if not strategy.masks.active:
        return []
    found = []
    for name, param, keep in zip(strategy.masks.names, strategy.masks.params, strategy.masks.keep()):
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.shape == param.shape and value[~keep].any():
                found.append(f"{key!r} of {name}")
    return found


class _SaveAt(TrainerCallback):
    """Has the Trainer write a full checkpoint (weights, optimizer, RNG, pruning state) after the given
    steps."""

    def __init__(self, steps: list[int]):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


@contextmanager
def one_thread():
    """Matrices of width 32 train fastest on one thread, and equal thread counts keep runs bit-for-bit
    comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(
    case: Case, registry: Registry, output_dir: str | os.PathLike, resume_from: Path | None = None
) -> Run:
    """Train ``case.model_factory()`` for ``case.steps`` steps with a stock Trainer and a PruneCallback.

    A fresh run saves checkpoints at ``case.resume_points``; with ``resume_from`` the run
    restarts from that checkpoint instead, as ``trainer.train(resume_from_checkpoint=...)`` does.
    """
    output_dir = Path(output_dir)
    model = case.model_factory()
    callback = PruneCallback(case.recipe(registry), resume_from=resume_from, registry=registry)
    recorder = _Recorder(callback)
    callbacks = [callback, recorder]
    if resume_from is None:
        callbacks.append(_SaveAt(sorted(case.resume_points.values())))
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=case.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        # One log, at the end, with no NaN filter: its loss is the mean of every step's. Logging only then
        # also keeps
        # a metrics() value the Trainer cannot serialize out of the checkpoints, so check_metrics reports it
        # instead.
        logging_steps=case.steps,
        logging_nan_inf_filter=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)
    end_refusal = None
    with one_thread():
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except StateError as exc:
            if trainer.state.global_step != case.steps:  # not the end-of-training check: a resume problem
                raise
            end_refusal = str(exc)  # reported by check_model_matches_state; the other checks still run
    return Run(
        case=case,
        registry=registry,
        output_dir=output_dir,
        model=model,
        callback=callback,
        loss=next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry),
        records=recorder.records,
        final_weights=snapshot(model.state_dict()),
        final_state=snapshot(callback.pruner.strategies[0].state_dict()),
        final_sparsity=callback.pruner.sparsity(),
        end_refusal=end_refusal,
    )


# --- checks before training ---------------------------------------------------------------------


def check_registered(case: Case, registry: Registry) -> StrategyInfo:
    """The strategy is found by name through the ``hfprune`` entry points, from the expected distribution.

    That is the only way a recipe can reach it: a strategy registered only in code works in
    its own tests and nowhere else. Returns the registry's record (plugin, distribution, version).
    """
    try:
        info = registry.get(case.strategy)
    except PluginError as exc:
        raise AssertionError(
            f"strategy {case.strategy!r} is not available through the {ENTRY_POINT_GROUP!r} entry points: "
            f"{exc}\n"
            f"Declare the plugin in pyproject.toml ([project.entry-points.{ENTRY_POINT_GROUP}] "
            f'{case.strategy} = "your_module"), '
            "register the class in your module's @hookimpl hfprune_register_strategies, and install the "
            "package "
            "(pip install -e .) so its entry point exists."
        ) from None
    if case.distribution is not None and info.plugin.distribution != case.distribution:
        raise AssertionError(
            f"strategy {case.strategy!r} comes from distribution {info.plugin.provenance} (plugin "
            f"{info.plugin.name!r}), "
            f"not {case.distribution!r}: another installed package registers that name, or these tests run "
            "against "
            "a different install than you think (pip show / hfprune plugins)."
        )
    if not info.description:
        raise AssertionError(
            f"{info.cls.__name__} has no docstring: `hfprune plugins` shows its first line as the "
            "strategy's description. "
            "Start the class with a one-line summary of the method."
        )
    return info


def check_config_forbids_unknown_keys(case: Case, registry: Registry) -> None:
    """The strategy's Config rejects a key it does not define, so a misspelt setting in a recipe is an error,
    not a default."""
    config_cls = registry.get(case.strategy).cls.Config
    if not (isinstance(config_cls, type) and issubclass(config_cls, StrategyConfig)):
        raise AssertionError(
            f"{case.strategy!r}.Config is {config_cls!r}, not a hfprune.StrategyConfig subclass: derive it "
            "from "
            "StrategyConfig, which forbids unknown keys, freezes the config and gives `hfprune check` "
            "planned_sparsity()."
        )
    case.recipe(registry)  # the config itself must be valid, or the error below would be about something else
    try:
        load_recipe(case.recipe_data(**{UNKNOWN_KEY: 1}), registry)
    except RecipeError as exc:
        if any(
            p.key == f"pruners[0].config.{UNKNOWN_KEY}" and p.message == "unknown key" for p in exc.problems
        ):
            return
        raise AssertionError(
            f"adding the unknown key {UNKNOWN_KEY!r} to a valid config gave another error than 'unknown "
            f"key':\n{exc}"
        ) from None
    raise AssertionError(
        f"{config_cls.__name__} accepted the unknown key {UNKNOWN_KEY!r}: a misspelt setting in a recipe "
        "would be silently "
        "ignored. Do not override StrategyConfig's model_config (it sets extra='forbid')."
    )


def check_attaches(case: Case, registry: Registry) -> EntryPlan:
    """The recipe attaches to the model, and ``select_parameters`` names parameters exactly as the model does.

    The engine masks, saves and reports parameters by those names, and the optimizer and
    ``save_pretrained`` know them by the same ones.
    """
    model = case.model_factory()
    pruner = Pruner(case.recipe(registry), registry)
    try:
        [plan] = pruner.attach(model)
    except RecipeError as exc:
        raise AssertionError(
            f"the recipe does not attach to {type(model).__name__}:\n{exc}\n"
            "If the targets are wrong, set `targets` on the conformance class to modules of the model; if "
            "the message is a "
            "TargetError from your select_parameters, it must accept these modules or say precisely why not."
        ) from None
    named = model_view(model).parameters()
    for name, param in plan.parameters.items():
        if named.get(name) is not param:
            raise AssertionError(
                f"select_parameters returned {name!r}, which is not the model's parameter of that name: "
                "return the model's own "
                "parameters under their full names, as model.named_parameters() gives them (for a matched "
                "module called name: "
                '{f"{name}.weight": module.weight}).'
            )
    return plan


def check_describes_what_it_acts_on(case: Case, registry: Registry) -> None:
    """A strategy that selects no parameters (layer gates) says in ``describe()`` what it acts on: ``hfprune
    check`` prints it."""
    plan = check_attaches(case, registry)
    if plan.parameters:
        return
    lines = plan.strategy.cls.describe(plan.modules, plan.config)
    if (
        not isinstance(lines, list)
        or not lines
        or not all(isinstance(line, str) and line.strip() for line in lines)
    ):
        raise AssertionError(
            f"{plan.strategy.cls.__name__} selects no parameters, so `hfprune check` shows only what "
            "describe() returns, "
            f"and it returned {lines!r}: return a list of non-empty lines saying what the entry acts on "
            "(e.g. which layers)."
        )


# --- checks on a training run -------------------------------------------------------------------


def check_loss_finite(run: Run) -> None:
    """Training goes on with a finite loss at every step and finite weights at the end: the strategy breaks
    nothing numerically."""
    if not math.isfinite(run.loss):
        raise AssertionError(
            f"the mean training loss over {run.case.steps} steps is {run.loss}: the strategy made weights "
            "or gradients "
            "inf/NaN (look for divisions by norms or magnitudes that can be zero; clamp them)."
        )
    broken = [
        name
        for name, value in run.final_weights.items()
        if value.is_floating_point() and not value.isfinite().all()
    ]
    if broken:
        raise AssertionError(
            f"after training these weights hold inf/NaN: {broken[:5]}: the strategy's last steps broke them."
        )


def check_masked_weights_stay_zero(run: Run) -> None:
    """A MaskingStrategy's pruned weights are exactly zero after every optimizer step, whatever the optimizer
    did."""
    if not isinstance(run.strategy, MaskingStrategy):
        return
    if not any(record.masks_active for record in run.records):
        raise AssertionError(
            f"self.masks was never set in {run.case.steps} steps with schedule {run.case.schedule}: a "
            "MaskingStrategy installs "
            "its masks with self.masks.set(masks, ctx.optimizer), usually in on_step_end on the schedule's "
            "update steps. "
            "If yours start later, give the conformance class a `schedule` that acts within `steps`."
        )
    for record in run.records:
        if record.masked_weights:
            raise AssertionError(
                f"after optimizer step {record.step}, {', '.join(record.masked_weights[:3])} are non-zero "
                "where the mask prunes them. "
                "MaskingStrategy zeroes gradients in before_optimizer_step and weights in "
                "after_optimizer_step: if you "
                "override either, call super() (or self.masks.apply_to_grads() / "
                "self.masks.apply_to_weights())."
            )


def check_masked_optimizer_state_stays_zero(run: Run) -> None:
    """Where a mask prunes, the optimizer's per-weight state (momentum, Adam moments) is zero, so nothing can
    regrow a weight."""
    if not isinstance(run.strategy, MaskingStrategy):
        return
    for record in run.records:
        if record.masked_optimizer_state:
            raise AssertionError(
                f"after optimizer step {record.step}, the optimizer state "
                f"{', '.join(record.masked_optimizer_state[:3])} is non-zero "
                "where the mask prunes: install masks with self.masks.set(masks, ctx.optimizer), which "
                "zeroes that state, "
                "not with optimizer None or by assigning self.masks.masks."
            )


def check_reaches_planned_sparsity(run: Run) -> None:
    """After the schedule's end the targets are as sparse as the strategy's ``planned_sparsity`` told
    ``hfprune check``, to the weight."""
    planned = run.plan.planned_sparsity
    if planned is None:
        return
    reached = run.final_sparsity[f"sparsity/{run.plan.label}"]
    numel = run.plan.numel
    if round(reached * numel) != round(planned * numel):  # to the weight: the plan is what training does
        raise AssertionError(
            f"{run.plan.strategy.cls.__name__}.planned_sparsity() is {planned:.4f} ({round(planned * numel)} "
            "weights), which `hfprune check` promises, but "
            f"{run.case.steps - run.case.resolved_schedule.end} steps after the schedule's end the targets "
            f"are {reached:.4f} zeros ({round(reached * numel)} weights): make "
            "the strategy reach it, or planned_sparsity() return what it reaches (None when it cannot be "
            "known up front)."
        )


def check_model_matches_state(run: Run) -> None:
    """At the end of training the engine finds the model's weights as the strategy's state says
    (:meth:`Strategy.disagreement`): a saved model is what the logs report."""
    if run.end_refusal:
        raise AssertionError(
            f"at the end of training the engine refused the model: {run.end_refusal}. A MaskingStrategy "
            "keeps its masked weights exactly zero (self.masks.apply_to_weights() after every step)."
        )


def check_metrics(run: Run) -> None:
    """``metrics()`` returns ``{str: float}`` at every step: the Trainer logs and serializes them as they
    are."""
    for record in run.records:
        if not isinstance(record.metrics, dict):
            raise AssertionError(
                f"metrics() after step {record.step} returned a {type(record.metrics).__name__}: return a "
                f"dict, {{}} when there is nothing to log"
            )
        bad = [
            (key, value)
            for key, value in record.metrics.items()
            if not isinstance(key, str) or not isinstance(value, float)
        ]
        if bad:
            raise AssertionError(
                f"metrics() after step {record.step} has {_describe_items(bad)}: keys are str names and "
                "values Python floats "
                "(float(...) of a tensor or an int)."
            )


def check_state_dict(run: Run) -> None:
    """``state_dict()`` has flat str keys and tensor or JSON values at every step: the checkpoint file stores
    exactly that."""
    for record in run.records:
        state = record.state
        if not isinstance(state, dict):
            raise AssertionError(
                f"state_dict() after step {record.step} returned a {type(state).__name__}, not a dict"
            )
        bad = [
            (key, value)
            for key, value in state.items()
            if not isinstance(key, str) or not _tensor_or_json(value)
        ]
        if bad:
            raise AssertionError(
                f"state_dict() after step {record.step} has {_describe_items(bad)}: keys are str and each "
                "value is a tensor "
                "(saved in the safetensors body) or a JSON value (int, float, str, bool, None, or lists and "
                "dicts of them, "
                "with no tensor inside)."
            )


def _tensor_or_json(value: Any) -> bool:
    if torch.is_tensor(value):
        return True
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _describe_items(items: list[tuple]) -> str:
    return ", ".join(f"{key!r}: {type(value).__name__}" for key, value in items[:5])


def check_resume_is_exact(run: Run, where: str, output_dir: str | os.PathLike) -> None:
    """Restarting the Trainer from the run's checkpoint at ``run.case.resume_points[where]`` ends exactly as
    the run did.

    Same weights, same strategy state and same metrics, bit for bit: everything the
    strategy needs to continue must be in ``state_dict()`` and restored by ``load_state_dict()``.
    """
    step = run.case.resume_points[where]
    checkpoint = run.output_dir / f"checkpoint-{step}"
    if not (checkpoint / STATE_FILE).is_file():
        raise AssertionError(
            f"the run wrote no {STATE_FILE} in {checkpoint}: PruneCallback.on_save did not save the pruning "
            "state"
        )
    resumed = train(run.case, run.registry, output_dir, resume_from=checkpoint)
    problems = []
    for what, expected, actual in (
        ("weights", run.final_weights, resumed.final_weights),
        ("state_dict() entries", run.final_state, resumed.final_state),
        ("metrics", run.records[-1].metrics, resumed.records[-1].metrics),
    ):
        differing = _differing_keys(expected, actual)
        if differing:
            problems.append(f"{what} {differing[:5]}")
    if problems:
        raise AssertionError(
            f"resuming from the checkpoint after step {step} ({where}) does not end as the uninterrupted "
            "run did: "
            f"{'; '.join(problems)} differ. Everything the strategy needs to go on exactly (masks, "
            "coefficients, counters, "
            "anything computed at an earlier step and read later) belongs in state_dict(), and "
            "load_state_dict() must restore it."
        )


def _differing_keys(expected: dict, actual: dict) -> list[str]:
    return sorted(
        str(key)
        for key in expected.keys() | actual.keys()
        if key not in expected or key not in actual or not _same(expected[key], actual[key])
    )


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    return a == b


def check_compaction_plan_fits_the_model(run: Run) -> None:
    """``compaction_plan()`` is None or bool keep-masks named and shaped like parameters (or one bool per
    layer of a stack)."""
    view = model_view(run.model)  # the user's names, also in a model peft wrapped
    parameters, modules = view.parameters(), view.modules
    for record in run.records:
        if record.plan is None:
            continue
        if not isinstance(record.plan, dict):
            raise AssertionError(
                f"compaction_plan() after step {record.step} returned a {type(record.plan).__name__}: "
                "return None or a dict"
            )
        for name, mask in record.plan.items():
            if name in parameters:
                expected = tuple(parameters[name].shape)
            elif isinstance(modules.get(name), nn.ModuleList):
                expected = (len(modules[name]),)
            else:
                raise AssertionError(
                    f"compaction_plan() after step {record.step} names {name!r}, which is neither a "
                    "parameter of the model nor a "
                    "layer stack (nn.ModuleList): use full names as model.named_parameters() / "
                    "named_modules() give them."
                )
            if not (torch.is_tensor(mask) and mask.dtype == torch.bool and tuple(mask.shape) == expected):
                found = (
                    f"{mask.dtype} tensor of shape {tuple(mask.shape)}"
                    if torch.is_tensor(mask)
                    else type(mask).__name__
                )
                raise AssertionError(
                    f"compaction_plan()[{name!r}] after step {record.step} is a {found}: it must be a bool "
                    "tensor of shape "
                    f"{expected} (True = keep; one per layer for a stack)."
                )


def check_compaction_plan_is_fixed(run: Run) -> None:
    """Once ``compaction_plan()`` returns a plan, it never changes: compaction may happen at any later
    moment."""
    first = next((record for record in run.records if record.plan is not None), None)
    if first is None:
        return
    for record in run.records[run.records.index(first) + 1 :]:
        if record.plan is None or _differing_keys(first.plan, record.plan):
            raise AssertionError(
                f"compaction_plan() after step {record.step} differs from the one after step {first.step}: "
                "return None while "
                "the pattern can still change, and a plan only once it is fixed for good."
            )


def check_close_restores_the_model(run: Run) -> None:
    """After ``close()`` the trained model computes what a model the strategy never touched computes with the
    same weights.

    The engine closes a strategy before it replaces it (a second ``train()``); hooks left
    behind would act twice, or on a model the user has since taken elsewhere. This closes
    the run's strategy: the run's model is no longer pruned afterwards. LoRA layers over
    pruned weights keep masking their update (the engine's doing, not the strategy's, and
    what keeps a later merge sparse), so the fresh model's LoRA layers are made to as well.
    """
    run.strategy.close()
    fresh = run.case.model_factory()
    keep_sparse(
        fresh,
        [
            name
            for name, layer in lora_layers(run.model).items()
            if any(isinstance(v, SparseLora) for v in layer.lora_variant.values())
        ],
    )
    try:
        fresh.load_state_dict(run.model.state_dict())
    except RuntimeError as exc:
        raise AssertionError(
            f"after close(), the model's parameters and buffers are not those of a fresh model: {exc}\n"
            "A strategy must not register parameters or buffers on the model; keep its own tensors on the "
            "strategy."
        ) from None
    leftover = [
        name
        for name, module in run.model.named_modules()
        if _hook_count(module) != _hook_count(fresh.get_submodule(name))
    ]
    if leftover:
        raise AssertionError(
            f"after close(), modules {leftover[:5]} still have hooks a fresh model does not: keep every "
            "handle "
            "register_forward_hook / register_forward_pre_hook returns, and call handle.remove() in close()."
        )
    run.model.eval()
    fresh.eval()
    batch = probe_batch(fresh)
    with torch.no_grad():
        ours, theirs = (
            run.model(**batch, output_hidden_states=True),
            fresh(**batch, output_hidden_states=True),
        )
    if not (
        torch.equal(ours.logits, theirs.logits)
        and all(map(torch.equal, ours.hidden_states, theirs.hidden_states))
    ):
        raise AssertionError(
            "after close(), the model's outputs differ from a fresh model's with the same weights: close() "
            "must undo "
            "everything the constructor did to the model (hooks, patched attributes or forward methods)."
        )


def _hook_count(module: nn.Module) -> int:
    return (
        len(module._forward_hooks)
        + len(module._forward_pre_hooks)
        + len(module._backward_hooks)
        + len(module._backward_pre_hooks)
    )


# --- the pytest class ---------------------------------------------------------------------------


class StrategyConformance:
    """Subclass in a plugin's tests; pytest collects a test per check (name the subclass ``Test...``).

    Set ``strategy`` (the recipe name) and ``config`` (valid for the model); optionally
    ``targets`` (default: tiny_bert's FFN matrices), ``schedule`` (default ``{start: 0, end: 4,
    every: 2}``, in optimizer steps), ``steps`` (default 8; at least the schedule's end + 2),
    ``distribution`` (the distribution that must provide the strategy) and ``model_factory``
    (a function returning a fresh model; default :func:`tiny_bert`). The Trainer feeds
    :class:`TokenDataset`, so another model must be a sequence classifier over a vocabulary of
    at least 100 tokens. One training run per class is shared by the checks that read it, and
    each resume check trains once more from a checkpoint: a class takes a second or two.
    """

    strategy: ClassVar[str]
    config: ClassVar[dict[str, Any]] = {}
    targets: ClassVar[tuple[str, ...]] = FFN_TARGETS
    schedule: ClassVar[dict[str, Any]] = DEFAULT_SCHEDULE
    steps: ClassVar[int] = 8
    distribution: ClassVar[str | None] = None
    model_factory: ClassVar[Callable[[], nn.Module]] = staticmethod(tiny_bert)

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_case(cls) -> Case:
        if not getattr(cls, "strategy", None):
            pytest.fail(
                f'{cls.__name__}: set `strategy = "name"`, the name a recipe uses for your strategy',
                pytrace=False,
            )
        return Case(
            cls.strategy,
            dict(cls.config),
            tuple(cls.targets),
            dict(cls.schedule),
            cls.distribution,
            cls.steps,
            cls.model_factory,
        )

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_registry(cls) -> Registry:
        """Built from the installed entry points, as in any process that reads a recipe."""
        return build_registry()

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_run(cls, conformance_case, conformance_registry, tmp_path_factory) -> Run:
        check_attaches(
            conformance_case, conformance_registry
        )  # a bad recipe fails with the clear message, not inside the Trainer
        return train(conformance_case, conformance_registry, tmp_path_factory.mktemp("conformance"))

    def test_found_through_entry_points(self, conformance_case, conformance_registry):
        check_registered(conformance_case, conformance_registry)

    def test_config_forbids_unknown_keys(self, conformance_case, conformance_registry):
        check_config_forbids_unknown_keys(conformance_case, conformance_registry)

    def test_attaches_to_the_model(self, conformance_case, conformance_registry):
        check_attaches(conformance_case, conformance_registry)

    def test_describes_what_it_acts_on(self, conformance_case, conformance_registry):
        if check_attaches(conformance_case, conformance_registry).parameters:
            pytest.skip(
                "selects parameters, which `hfprune check` lists itself; describe() is for strategies that "
                "select none"
            )
        check_describes_what_it_acts_on(conformance_case, conformance_registry)

    def test_trains_with_finite_loss(self, conformance_run):
        check_loss_finite(conformance_run)

    def test_masked_weights_stay_zero(self, conformance_run):
        _skip_unless_masking(conformance_run)
        check_masked_weights_stay_zero(conformance_run)

    def test_masked_optimizer_state_stays_zero(self, conformance_run):
        _skip_unless_masking(conformance_run)
        check_masked_optimizer_state_stays_zero(conformance_run)

    def test_reaches_planned_sparsity(self, conformance_run):
        if conformance_run.plan.planned_sparsity is None:
            pytest.skip("planned_sparsity() is None: nothing promised")
        check_reaches_planned_sparsity(conformance_run)

    def test_model_matches_state_at_the_end(self, conformance_run):
        check_model_matches_state(conformance_run)

    def test_metrics_are_floats(self, conformance_run):
        check_metrics(conformance_run)

    def test_state_dict_is_tensors_and_json(self, conformance_run):
        check_state_dict(conformance_run)

    @pytest.mark.parametrize("where", RESUME_POINTS)
    def test_resume_is_exact(self, conformance_run, where, tmp_path):
        check_resume_is_exact(conformance_run, where, tmp_path)

    def test_compaction_plan_fits_the_model(self, conformance_run):
        check_compaction_plan_fits_the_model(conformance_run)

    def test_compaction_plan_is_fixed(self, conformance_run):
        check_compaction_plan_is_fixed(conformance_run)

    def test_close_restores_the_model(self, conformance_run):
        check_close_restores_the_model(conformance_run)


def _skip_unless_masking(run: Run) -> None:
    if not isinstance(run.strategy, MaskingStrategy):
        pytest.skip(f"{type(run.strategy).__name__} is not a hfprune.masks.MaskingStrategy")
