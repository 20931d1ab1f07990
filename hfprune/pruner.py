"""The engine: one object that owns the strategies, the step counter and all pruning state.

Drivers (the Trainer callback, the optimizer wrapper) call the same four moments:
``attach`` (model known: match targets), ``start`` (run length known: build strategies),
``before_optimizer_step`` and ``after_optimizer_step``.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
import torch.distributed as dist
from torch import nn

from hfprune.compaction.compact import compact_model, layer_stacks_of
from hfprune.distill import DistillationConfig, Distiller, load_teacher, teacher_mismatch
from hfprune.errors import CompactionError, HfpruneError, Problem, StateError, TargetError
from hfprune.integrations.lora import (
    adapter_weights_of_bases,
    keep_sparse,
    lora_layers,
    merge_lora,
    why_not_maskable,
)
from hfprune.integrations.peft_names import ModelView, model_view
from hfprune.integrations.sharding import (
    Layout,
    UnsupportedSharding,
    count_zeros,
    fsdp1_wrapped,
    is_sharded,
    layout_of,
    shard_group,
    unsharded_copy,
)
from hfprune.plugins import Registry, StrategyInfo, default_registry
from hfprune.recipe.schema import Recipe, RecipeSource, load_recipe
from hfprune.recipe.targets import match_targets, unmatched_hint
from hfprune.state import load_state, save_state
from hfprune.strategy import OneShotStrategy, StepContext, Strategy, StrategyConfig, Targets
from hfprune.tied import distinct_parameters, tensor_identity

STATE_FORMAT = 1
FROZEN_KEY = "frozen_weights"
logger = logging.getLogger("hfprune.pruner")


@dataclass(frozen=True)
class EntryPlan:
    """What one recipe entry will act on once attached to a model.

    ``parameters`` holds each tensor once (:mod:`hfprune.tied`); ``tied`` maps a name kept there to the
    other names of its tensor that the entry's targets also selected.
    """

    index: int
    label: str
    strategy: StrategyInfo
    config: StrategyConfig
    modules: Targets
    parameters: dict[str, nn.Parameter]
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """How many weights this entry targets (a tied tensor once)."""
        return sum(p.numel() for p in self.parameters.values())

    @cached_property
    def planned_sparsity(self) -> float | None:
        """The fraction of the targeted weights zero once the schedule has ended (None: training decides):
        what ``hfprune check`` prints and training reaches (:meth:`Strategy.planned_sparsity`)."""
        if not self.parameters:
            return None
        return self.strategy.cls.planned_sparsity(self.modules, self.parameters, self.config)

    @cached_property
    def layouts(self) -> list[Layout]:
        """How each targeted parameter lies across processes (attach has refused the layouts hfprune cannot
        prune)."""
        return [layout_of(p) for p in self.parameters.values()]


Claim = tuple[int, tuple[str, ...]]  # an entry's index and the names it selected one tensor by


def _claimed_twice(names: tuple[str, ...], earlier: Claim) -> str:
    """Why an entry may not select a tensor (by ``names``) that an earlier entry selected: under a name both
    selected, or tied (hfprune.tied) under different names."""
    earlier_index, earlier_names = earlier
    shared = [name for name in names if name in earlier_names]
    if shared:
        return (
            f"parameter {shared[0]} is also targeted by pruners[{earlier_index}]; each parameter belongs to "
            "one entry"
        )
    return (
        f"{names[0]} is the same tensor as {earlier_names[0]} (tied weights), which pruners[{earlier_index}] "
        "targets; each weight belongs to one entry"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, DataParallel and torch.compile wrappers, so names match the
    recipe; HfpruneError for a model FSDP1 wraps, which has no parameter hfprune could prune."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            break
    wrapped = fsdp1_wrapped(model)
    if wrapped is not None:
        raise HfpruneError(
            f"{'the model' if not wrapped else wrapped} is wrapped in FSDP1 (torch.distributed.fsdp."
            "FullyShardedDataParallel), which flattens and shards its parameters: hfprune cannot prune them. "
            "Shard with FSDP2 instead (the Trainer's default: leave fsdp_config's 'version' at 2; in your "
            "own loop: torch.distributed.fsdp.fully_shard) or train with DDP; docs/distributed.md says what "
            "is supported"
        )
    return model


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is torch.compile's wrapper (an OptimizedModule, the model in ``_orig_mod``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # torch.compile imports it
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def _compactable(model: nn.Module) -> nn.Module:
    """The plain model compaction copies: unwrapped, LoRA merged into a copy, FSDP2 shards gathered into a
    copy (collective)."""
    model = unwrap_model(model)
    if lora_layers(model):
        model = merge_lora(copy.deepcopy(model))
    if is_sharded(model):
        model = unsharded_copy(model)
    return model


def _grad_scaler(optimizer: torch.optim.Optimizer):
    """The enabled fp16 GradScaler an (accelerate) optimizer steps with, or None."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _wrapped(parameters: dict[str, nn.Parameter], view: ModelView) -> list[str]:
    """The layers peft wrapped whose weights are among ``parameters``, by name."""
    return sorted({layer for name in parameters if (layer := view.wrapped_layer(name))})


def kind_problems(recipe: Recipe, registry: Registry, one_shot: bool) -> list[Problem]:
    """One per entry of the other kind than its driver (one-shot in training, or the reverse), and per
    one-shot entry given a schedule.

    The drivers ask when they start; ``hfprune prune`` asks before it loads any data.
    """
    problems = []
    for index, entry in enumerate(recipe.pruners):
        if issubclass(registry.get(entry.strategy).cls, OneShotStrategy) == one_shot:
            if one_shot and "schedule" in entry.model_fields_set:
                message = "a one-shot strategy prunes once, at no training step: remove `schedule`"
                problems.append(recipe.problem(("pruners", index, "schedule"), message))
            continue
        name = entry.strategy
        if one_shot:
            message = f"{name!r} prunes during training, and one-shot pruning runs no optimizer step"
            hint = (
                "use a one-shot strategy (`hfprune plugins` lists them), or train with this recipe: "
                "`hfprune run`, PruneCallback or PruneOptimizer"
            )
        else:
            message = f"{name!r} is a one-shot strategy: it prunes from calibration data, not during training"
            hint = "run this recipe with `hfprune prune` or hfprune.oneshot(model, data, recipe)"
        problems.append(recipe.problem(("pruners", index, "strategy"), message, hint=hint))
    return problems


class Pruner:
    """Prunes one model according to one recipe, distilling from ``teacher`` when given or when the recipe
    names one.

    A ``teacher`` passed here is used with the recipe's ``distillation:`` settings (their
    defaults when the recipe has none) and wins over the recipe's ``teacher`` path.
    """

    def __init__(
        self, recipe: RecipeSource, registry: Registry | None = None, teacher: nn.Module | None = None
    ):
        self.registry = registry or default_registry()
        self.recipe: Recipe = load_recipe(recipe, self.registry)
        self.teacher = teacher
        self.distiller: Distiller | None = None
        self._model: nn.Module | None = None
        self.lr_scheduler = None
        self.plans: list[EntryPlan] = []
        self.strategies: list[Strategy] = []
        self.step = 0
        self._group_of: dict[int, int] = {}
        self._optimizer_seen: torch.optim.Optimizer | None = None
        self._adapter_of_base: dict[int, nn.Parameter] = {}
        self._frozen_targets: dict[str, nn.Parameter] = {}
        self._scale_before: float | None = None
        # The optimizer of the last step when an fp16 scaler skipped it: finish() gives it its schedule work.
        self._skipped_last_step: torch.optim.Optimizer | None = None

    # --- set-up -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> list[EntryPlan]:
        """Match every entry's targets in ``model``; RecipeError lists every target problem.

        In a model peft wrapped, targets name the user's modules (:mod:`hfprune.integrations.peft_names`),
        the base weights of LoRA layers are pruned, and their adapters are made to keep the
        pruned weights zero (:mod:`hfprune.integrations.lora`).
        """
        model = unwrap_model(model)
        view = model_view(model)
        adapter_layers = lora_layers(model)
        problems: list[Problem] = []
        plans: list[EntryPlan] = []
        claimed: dict[Hashable, Claim] = {}  # by tensor identity (hfprune.tied)
        wrapped: set[str] = set()  # LoRA layers whose base weights are pruned
        for index, entry in enumerate(self.recipe.pruners):
            info = self.registry.get(entry.strategy)
            match = match_targets(view, entry.targets, entry.exclude)
            for target_index in match.unmatched:
                target = entry.targets[target_index]
                problems.append(
                    self.recipe.problem(
                        ("pruners", index, "targets", target_index),
                        f"{target!r} matches no module" + (" that is not excluded" if entry.exclude else ""),
                        hint=unmatched_hint(view, target),
                    )
                )
            config = self.recipe.strategy_config(index)
            targets = Targets(match.modules, self.registry.architectures)
            try:
                parameters = info.cls.select_parameters(targets, config) if targets else {}
            except TargetError as exc:
                problems.append(self.recipe.problem(("pruners", index, "targets"), str(exc)))
                continue
            parameters, tied = distinct_parameters(parameters)
            problems.extend(self._sharding_problems(index, info, parameters, view))
            problems.extend(self._claim_problems(index, parameters, tied, claimed))
            entry_wrapped = _wrapped(parameters, view)
            wrapped.update(entry_wrapped)
            for refusal in filter(None, (why_not_maskable(n, adapter_layers[n]) for n in entry_wrapped)):
                problems.append(self.recipe.problem(("pruners", index, "targets"), refusal))
            plans.append(
                EntryPlan(index, f"{index}.{entry.strategy}", info, config, targets, parameters, tied)
            )
        if not problems:  # plans of entries refused already would only add noise
            problems.extend(self._empty_plan_problems(plans))
        problems.extend(self._teacher_problems(model))
        if problems:
            raise self.recipe.error(problems)
        self.plans = plans
        self._model = model
        keep_sparse(model, sorted(wrapped))
        self._adapter_of_base = adapter_weights_of_bases(model)
        # A Trainer checkpoint of a PeftModel holds only what trains (adapters, modules_to_save).
        self._frozen_targets = {
            name: param
            for plan in plans
            for name, param in plan.parameters.items()
            if view.prefix and not param.requires_grad
        }
        return plans

    def _claim_problems(
        self,
        index: int,
        parameters: dict[str, nn.Parameter],
        tied: dict[str, tuple[str, ...]],
        claimed: dict[Hashable, Claim],
    ) -> list[Problem]:
        """Record in ``claimed`` the tensors entry ``index`` selected; the first that an earlier entry
        selected already, as a problem (a tied tensor is one, whichever of its names each entry selected it
        by)."""
        for name, param in parameters.items():
            names = (name, *tied.get(name, ()))
            earlier = claimed.setdefault(tensor_identity(param), (index, names))
            if earlier[0] != index:
                return [self.recipe.problem(("pruners", index, "targets"), _claimed_twice(names, earlier))]
        return []

    def _empty_plan_problems(self, plans: list[EntryPlan]) -> list[Problem]:
        """Entries whose config asks for zeros but whose plan on this model prunes nothing (one head group
        that always survives, a ratio that rounds to no block): refused, as training would change nothing."""
        problems = []
        for plan in plans:
            asked = plan.config.planned_sparsity()
            if asked and plan.planned_sparsity == 0.0:
                problems.append(
                    self.recipe.problem(
                        ("pruners", plan.index, "config"),
                        f"asks for {asked:.0%} but would prune nothing on this model once counts are rounded "
                        "as the strategy rounds them (a structured strategy keeps at least one block of each "
                        "set, and heads that share a key/value head go together)",
                        hint="raise the ratio, target more modules, or prune at a finer group",
                    )
                )
        return problems

    def _teacher_problems(self, model: nn.Module) -> list[Problem]:
        """Load the recipe's teacher if it is needed and not loaded yet; why it cannot teach ``model``, if it
        cannot."""
        config = self.recipe.distillation
        if self.teacher is None and config is None:
            return []
        where = ("distillation", "teacher")
        config = config or DistillationConfig()
        if self.teacher is None:
            if config.teacher is None:
                return [
                    self.recipe.problem(
                        where,
                        "distillation needs a teacher: set distillation.teacher to a model folder, "
                        "or pass teacher= to PruneCallback / Pruner",
                    )
                ]
            try:
                self.teacher = load_teacher(config.teacher, model)
            except ValueError as exc:
                return [self.recipe.problem(where, str(exc))]
        if self.distiller is not None:
            self.distiller.close()  # attached to a model an earlier attach() was given
        mismatch = teacher_mismatch(self.teacher, model, config)
        if mismatch:
            return [
                self.recipe.problem(
                    where if self.recipe.distillation else ("distillation",),
                    f"the teacher cannot teach this model: {mismatch}",
                )
            ]
        self.distiller = Distiller(self.teacher, config)
        return []

    def _sharding_problems(
        self, index: int, info: StrategyInfo, parameters: dict[str, nn.Parameter], view: ModelView
    ) -> list[Problem]:
        """Why the entry cannot prune the parameters split across processes, if it cannot
        (docs/distributed.md)."""
        where = ("pruners", index, "targets")
        layouts = []
        for name, param in parameters.items():
            try:
                layouts.append(layout_of(param))
            except UnsupportedSharding as exc:
                return [
                    self.recipe.problem(
                        where,
                        f"{name} is {exc}: hfprune prunes parameters each process holds whole, or FSDP2 "
                        "shards by rows",
                        hint="train with DDP (accelerate launch --multi_gpu) or FSDP2 (fully_shard), or "
                        "leave these modules out "
                        "of the sharding; docs/distributed.md says what is supported",
                    )
                ]
        split = [name for name, layout in zip(parameters, layouts) if layout.sharded]
        if not split:
            return []
        if not info.cls.shardable:
            return [
                self.recipe.problem(
                    where,
                    f"{split[0]} is sharded by FSDP2, and strategy {info.name!r} does not declare that it "
                    "prunes "
                    f"parameters split across processes ({len(split)} targeted are)",
                    hint="train it with DDP, or ask its author to support FSDP2 (CONTRIBUTING 'Sharded "
                    "parameters')",
                )
            ]
        if view.prefix:
            return [
                self.recipe.problem(
                    where,
                    f"{split[0]} is sharded by FSDP2 in a peft model: LoRA under FSDP2 is not supported yet",
                )
            ]
        try:
            shard_group(layouts)
        except UnsupportedSharding as exc:
            return [self.recipe.problem(where, f"the targeted parameters are {exc}")]
        return []

    def start(self, total_steps: int | None, lr_scheduler=None, one_shot: bool = False) -> None:
        """Build the strategies for a run of ``total_steps`` optimizer steps (None: unknown).

        ``lr_scheduler`` is the run's learning-rate scheduler, if any: strategies with
        ``lam: auto`` read the learning rates of their phase ahead from it. ``one_shot``: the
        driver is :func:`hfprune.oneshot`, which runs only one-shot strategies, as training runs
        only the others; an entry of the other kind is a RecipeError.
        """
        if not self.plans:
            raise RuntimeError("Pruner.start() needs a model first: call attach(model)")
        problems = kind_problems(self.recipe, self.registry, one_shot)
        if problems:
            raise self.recipe.error(problems)
        schedules = []
        for plan in self.plans:
            try:
                schedules.append(self.recipe.pruners[plan.index].schedule.resolve(total_steps))
            except ValueError as exc:
                problems.append(self.recipe.problem(("pruners", plan.index, "schedule"), str(exc)))
        if problems:
            raise self.recipe.error(problems)
        self.close()
        self.strategies = [
            plan.strategy.cls(plan.config, plan.modules, plan.parameters, schedule)
            for plan, schedule in zip(self.plans, schedules)
        ]
        if self.distiller is not None:
            self.distiller.attach(self._model)
        self.lr_scheduler = lr_scheduler
        self.step = 0
        self._optimizer_seen = None  # new strategies: check_optimizer asks them again

    def close(self) -> None:
        """Take the strategies and the teacher off the model (their hooks); training with this pruner needs
        ``start`` again."""
        for strategy in self.strategies:
            strategy.close()
        self.strategies = []
        if self.distiller is not None:
            self.distiller.close()

    # --- the hot path ---------------------------------------------------------------------
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call right before ``optimizer.step()``, after gradient accumulation and clipping.

        Under an fp16 GradScaler the optimizer's gradients are unscaled first (clipping may
        have done it already), so strategies see true gradients whatever the loss scale.
        """
        scaler = _grad_scaler(optimizer)
        self._scale_before = None
        if scaler is not None:
            self._scale_before = scaler.get_scale()
            try:
                scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
            except RuntimeError:  # unscale_() was already called this step (by gradient clipping)
                pass
        ctx = self._context(optimizer)
        for strategy in self.strategies:
            strategy.before_optimizer_step(ctx)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer, skipped: bool = False) -> None:
        """Call right after ``optimizer.step()``, before the LR scheduler moves.

        A skipped step (fp16 overflow) changes no weights, so strategies do nothing, but the
        step still counts: schedules stay aligned with the Trainer's global step. Besides the
        ``skipped`` flag, a GradScaler that lowered its scale in this step marks it skipped:
        it does so exactly when it found inf or NaN, and with fused optimizers (the Trainer's
        default AdamW) accelerate's ``step_was_skipped`` stays False.
        """
        scaler = _grad_scaler(optimizer)
        if not skipped and scaler is not None and self._scale_before is not None:
            skipped = scaler.get_scale() < self._scale_before
        if not skipped:
            ctx = self._context(optimizer)
            for strategy in self.strategies:
                strategy.after_optimizer_step(ctx)
            for strategy in self.strategies:
                strategy.on_step_end(ctx)
        self._skipped_last_step = optimizer if skipped else None
        self._scale_before = None
        self.step += 1

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Learn which param group of ``optimizer`` each parameter is in; RecipeError if a strategy reads the
        learning rate of a parameter that is in none.

        The drivers call it once the optimizer is known (train begin, wrapping), and every step
        with an optimizer not checked since :meth:`start` calls it too, so a parameter left out
        of a hand-built optimizer (one over a subset, or a peft model whose layer has no LoRA
        adapter) fails before any step instead of mid-training.
        """
        self._group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        # A frozen LoRA base weight steps (proximal penalties) at its adapter's learning rate.
        for base, adapter in self._adapter_of_base.items():
            if id(adapter) in self._group_of:
                self._group_of.setdefault(base, self._group_of[id(adapter)])
        problems = self._learning_rate_problems()
        if problems:
            raise self.recipe.error(problems)
        self._optimizer_seen = optimizer

    def _learning_rate_problems(self) -> list[Problem]:
        """One per entry whose strategy reads the learning rate of a parameter in no param group."""
        problems = []
        for plan, strategy in zip(self.plans, self.strategies):
            needed = strategy.learning_rate_parameters()
            missing = [name for name, param in needed.items() if id(param) not in self._group_of]
            if missing:
                problems.append(
                    self.recipe.problem(
                        ("pruners", plan.index, "targets"),
                        f"{missing[0]} is in no param group of the optimizer, and strategy "
                        f"{plan.strategy.name!r} steps it at its group's learning rate ({len(missing)} of "
                        f"the {len(needed)} parameters it does that to are in none)",
                        hint="give the optimizer every parameter this entry targets, wrap their layers with "
                        "LoRA in a peft model (the adapter's learning rate is used), or leave them out of "
                        "the targets",
                    )
                )
        return problems

    def _context(self, optimizer: torch.optim.Optimizer) -> StepContext:
        if optimizer is not self._optimizer_seen:
            self.check_optimizer(optimizer)
        distributed = dist.is_available() and dist.is_initialized()
        return StepContext(
            step=self.step,
            optimizer=optimizer,
            group_of=self._group_of,
            world_size=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            grad_scale=self._scale_before or 1.0,
            lr_scheduler=self.lr_scheduler,
        )

    # --- the end of training ----------------------------------------------------------------
    def finish(self, reloaded_step: int | None = None) -> None:
        """End training: catch up with a skipped last step, then check the model is what state and logs say.

        The callback calls it when the Trainer's training ends; a hand-written loop calls it
        after its last step. A last step an fp16 GradScaler skipped gets the schedule work it
        missed now, as a real step would have had it: a schedule ending there still fixes its
        pattern. ``reloaded_step`` is the optimizer step count of a checkpoint the driver loaded
        back (the Trainer's best model): one saved before a pattern was fixed is not the pruned
        model, and raises StateError, as do weights that disagree with a strategy's state
        (:meth:`Strategy.disagreement`). A run stopped before a schedule ended (early stopping,
        an interruption) is logged as not pruned as planned.
        """
        if self._skipped_last_step is not None:
            ctx = replace(self._context(self._skipped_last_step), step=self.step - 1)
            for strategy in self.strategies:
                strategy.on_step_end(ctx)
            self._skipped_last_step = None
        fixing = [(plan, s) for plan, s in zip(self.plans, self.strategies) if s.fixes_a_pattern()]
        if reloaded_step is not None and fixing:
            fixed_after = max(strategy.schedule.end for _, strategy in fixing) + 1
            if reloaded_step < fixed_after:
                raise StateError(
                    f"the model was reloaded from a checkpoint saved after {reloaded_step} optimizer steps "
                    f"(load_best_model_at_end), before the recipe's pruning was fixed after {fixed_after}: "
                    "it is not the pruned model the logs report. Evaluate only once the pattern is fixed "
                    f"(TrainingArguments(eval_delay={fixed_after}) with eval_strategy 'steps'), or set "
                    "load_best_model_at_end=False"
                )
        for plan, strategy in fixing:
            why = strategy.disagreement()
            if why:
                raise StateError(
                    f"the model's weights no longer match the pruning state of pruners[{plan.index}] "
                    f"({plan.label}): {why}. Were they reloaded or changed after pruning?"
                )
            if not strategy.schedule.has_ended(self.step - 1):
                logger.warning(
                    "training stopped after %d optimizer steps, before pruners[%d] (%s) fixed its pattern "
                    "(after %d): the model is not pruned as planned; resume from a checkpoint to finish",
                    self.step,
                    plan.index,
                    plan.label,
                    strategy.schedule.end + 1,
                )

    # --- reporting ------------------------------------------------------------------------
    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Fraction of exactly-zero weights: ``sparsity`` over all targeted parameters, and per entry."""
        zeros: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for plan in self.plans:
            if not plan.parameters:  # layer gates change no weights
                continue
            zeros[plan.label] = count_zeros(list(plan.parameters.values()), plan.layouts)
            sizes[plan.label] = plan.numel
        if not zeros:
            return {}
        result = {"sparsity": sum(zeros.values()) / max(sum(sizes.values()), 1)}
        result.update({f"sparsity/{label}": count / max(sizes[label], 1) for label, count in zeros.items()})
        return result

    def metrics(self) -> dict[str, float]:
        """Everything the engine adds to training logs."""
        values = self.sparsity()
        for plan, strategy in zip(self.plans, self.strategies):
            values.update({f"{name}/{plan.label}": v for name, v in strategy.metrics().items()})
        if self.distiller is not None:
            values.update(self.distiller.last.as_metrics())
        return values

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step, recipe fingerprint, every strategy's state; and in a PeftModel, the frozen weights pruned.

        A Trainer checkpoint of a PeftModel holds the adapters only, while pruning changes
        frozen weights (LoRA base weights and the layers no adapter wraps: masks zero them,
        proximal steps shrink them): without their values here, a resumed run would start
        again from unpruned ones.
        """
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "recipe": self.recipe.fingerprint(),
            "entries": [strategy.state_dict() for strategy in self.strategies],
        }
        if self._frozen_targets:
            state[FROZEN_KEY] = {name: param.detach() for name, param in self._frozen_targets.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s result; StateError for anything else (a state file is input like a
        recipe)."""
        if not isinstance(state, dict):
            raise StateError(f"pruning state is a {type(state).__name__}, not a mapping")
        if state.get("format") != STATE_FORMAT:
            raise StateError(
                f"pruning state format {state.get('format')!r} is not supported (expected {STATE_FORMAT})"
            )
        if state.get("recipe") != self.recipe.fingerprint():
            raise StateError(
                f"the pruning state was written by a different recipe than {self.recipe.source}; "
                "resume with the recipe the run started with"
            )
        entries, step, frozen = state.get("entries"), state.get("step"), state.get(FROZEN_KEY, {})
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise StateError(f"pruning state 'entries' is {type(entries).__name__}, not a list of mappings")
        if type(step) is not int or step < 0:
            raise StateError(f"pruning state step {step!r} is not a step number")
        if not isinstance(frozen, dict) or not all(torch.is_tensor(value) for value in frozen.values()):
            raise StateError(f"pruning state {FROZEN_KEY!r} is not a mapping of tensors")
        if len(entries) != len(self.strategies):
            raise StateError(f"pruning state has {len(entries)} entries, the recipe {len(self.strategies)}")
        self._load_frozen_targets(frozen)
        for plan, strategy, entry_state in zip(self.plans, self.strategies, entries):
            try:
                strategy.load_state_dict(entry_state)
            except StateError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
                raise StateError(
                    f"pruning state of pruners[{plan.index}] ({plan.label}) is malformed: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
        self.step = step

    @torch.no_grad()
    def _load_frozen_targets(self, saved: dict) -> None:
        if sorted(saved) != sorted(self._frozen_targets):
            missing = sorted(set(self._frozen_targets) - set(saved))[:3]
            raise StateError(
                f"the pruning state holds {len(saved)} frozen pruned weights, this model has "
                f"{len(self._frozen_targets)} (not saved: "
                f"{missing}): resume with the same model and LoRA config the run started with"
            )
        for name, param in self._frozen_targets.items():
            if saved[name].shape != param.shape:
                raise StateError(
                    f"saved weight {name} has shape {tuple(saved[name].shape)}, the model's "
                    f"{tuple(param.shape)}"
                )
            param.copy_(saved[name])

    def save(self, directory: str | os.PathLike, write: bool = True) -> None:
        """Write the pruning state to ``directory`` when ``write`` (the process that saves checkpoints).

        Under FSDP2 every process must call it, each passing whether it writes: assembling
        the whole masks from their parts is collective.
        """
        state = self.state_dict()
        if write:
            save_state(directory, state)

    def load(self, directory: str | os.PathLike) -> None:
        self.load_state_dict(load_state(directory))

    # --- compaction -----------------------------------------------------------------------
    def compaction_plan(self) -> dict[str, torch.Tensor]:
        """Every strategy's fixed structure in one mapping: parameter name to keep-mask, layer stack to one
        flag per layer."""
        plan: dict[str, torch.Tensor] = {}
        for strategy in self.strategies:
            plan.update(strategy.compaction_plan() or {})
        return plan

    def compact(self, model: nn.Module, probe: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A physically smaller copy of ``model`` without its pruned layers, heads and neurons; ``model`` is
        never changed.

        The copy's outputs are checked against ``model``'s on ``probe`` (default: a seeded
        random batch); CompactionError when they differ or when nothing can be removed.
        Under FSDP2 every process must call it: the plan's masks and the model's weights are
        gathered whole, and every process gets the same plain (unsharded) compacted model.
        A model with LoRA adapters is merged first (:func:`hfprune.integrations.lora.merge_lora`, which
        keeps pruned weights zero), so the copy is a plain model.
        """
        pruned = self.compaction_plan()
        if not pruned:
            kinds = ", ".join(sorted({p.strategy.name for p in self.plans})) or "none"
            raise CompactionError(
                f"nothing to compact: this recipe's strategies ({kinds}) have no fixed structured pattern. "
                "Unstructured "
                "strategies zero individual weights, which stay in dense matrices; structured ones fix "
                "theirs at the end "
                "of their schedule (block-lasso its heads and neurons, layer-lasso its layers)"
            )
        return compact_model(_compactable(model), pruned, self.registry.architectures, probe)

    def layer_plan(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The part of :meth:`compaction_plan` about ``model``'s layer stacks: stack name to one keep flag per
        layer."""
        return layer_stacks_of(self.compaction_plan(), model)

    def without_deleted_layers(self, model: nn.Module) -> nn.Module | None:
        """A copy of ``model`` without the layers its plan deletes, every other weight as it is; None if no
        layer goes.

        What the model saves after training (:class:`hfprune.callback.SaveWithoutDeletedLayers`):
        a layer gated off computes nothing, but full-size weights load with it active again,
        and a post-norm layer (BERT's) cannot be made the identity through its weights. The
        copy is checked against ``model`` like every compaction (:meth:`compact`); heads and
        neurons stay, their pruned weights zero, so the copy is a stock model.
        """
        model = _compactable(model)
        stacks = {name: keep for name, keep in self.layer_plan(model).items() if not keep.all()}
        return compact_model(model, stacks, self.registry.architectures) if stacks else None
