"""The engine: one object that owns the strategies, the step counter and all pruning state.

Adapters (the Trainer callback, the optimizer wrapper) call the same four moments:
``attach`` (model known: match targets), ``start`` (run length known: build strategies),
``before_optimizer_step`` and ``after_optimizer_step``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hfprune.compaction import compact_model
from hfprune.errors import CompactionError, Problem, StateError, TargetError
from hfprune.plugins import Registry, StrategyInfo, default_registry
from hfprune.recipe import Recipe, RecipeSource, load_recipe
from hfprune.state import load_state, save_state
from hfprune.strategy import StepContext, Strategy, StrategyConfig
from hfprune.targets import match_targets, near_misses

STATE_FORMAT = 1


@dataclass(frozen=True)
class EntryPlan:
    """What one recipe entry will act on once attached to a model."""

    index: int
    label: str
    strategy: StrategyInfo
    config: StrategyConfig
    modules: dict[str, nn.Module]
    parameters: dict[str, nn.Parameter]

    @property
    def numel(self) -> int:
        """How many weights this entry targets."""
        return sum(p.numel() for p in self.parameters.values())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel wrappers, so names match the recipe."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


class Pruner:
    """Prunes one model according to one recipe."""

    def __init__(self, recipe: RecipeSource, registry: Registry | None = None):
        self.registry = registry or default_registry()
        self.recipe: Recipe = load_recipe(recipe, self.registry)
        self.plans: list[EntryPlan] = []
        self.strategies: list[Strategy] = []
        self.step = 0
        self._group_of: dict[int, int] = {}
        self._optimizer_seen: torch.optim.Optimizer | None = None

    # --- set-up -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> list[EntryPlan]:
        """Match every entry's targets in ``model``; RecipeError lists every target problem."""
        model = unwrap_model(model)
        problems: list[Problem] = []
        plans: list[EntryPlan] = []
        claimed: dict[str, int] = {}
        for index, entry in enumerate(self.recipe.pruners):
            info = self.registry.get(entry.strategy)
            match = match_targets(model, entry.targets, entry.exclude)
            for target_index in match.unmatched:
                target = entry.targets[target_index]
                close = near_misses(model, target)
                problems.append(self.recipe.problem(
                    ("pruners", index, "targets", target_index),
                    f"{target!r} matches no module" + (" that is not excluded" if entry.exclude else ""),
                    hint=f"did you mean: {', '.join(close)}" if close else "run 'hfprune check' to list module names",
                ))
            config = self.recipe.strategy_config(index)
            try:
                parameters = info.cls.select_parameters(match.modules, config) if match.modules else {}
            except TargetError as exc:
                problems.append(self.recipe.problem(("pruners", index, "targets"), str(exc)))
                continue
            for name in parameters:
                if name in claimed:
                    problems.append(self.recipe.problem(
                        ("pruners", index, "targets"),
                        f"parameter {name} is also targeted by pruners[{claimed[name]}]; each parameter belongs to one entry",
                    ))
                    break
                claimed[name] = index
            plans.append(EntryPlan(index, f"{index}.{entry.strategy}", info, config, match.modules, parameters))
        if problems:
            raise self.recipe.error(problems)
        self.plans = plans
        return plans

    def start(self, total_steps: int | None) -> None:
        """Build the strategies for a run of ``total_steps`` optimizer steps (None: unknown)."""
        if not self.plans:
            raise RuntimeError("Pruner.start() needs a model first: call attach(model)")
        problems: list[Problem] = []
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
        self.step = 0

    def close(self) -> None:
        """Take the strategies off the model (their hooks); training with this pruner needs ``start`` again."""
        for strategy in self.strategies:
            strategy.close()
        self.strategies = []

    # --- the hot path ---------------------------------------------------------------------
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        ctx = self._context(optimizer)
        for strategy in self.strategies:
            strategy.before_optimizer_step(ctx)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer, skipped: bool = False) -> None:
        """Call right after ``optimizer.step()``, before the LR scheduler moves.

        A skipped step (fp16 overflow) changes no weights, so strategies do nothing, but the
        step still counts: schedules stay aligned with the Trainer's global step.
        """
        if not skipped:
            ctx = self._context(optimizer)
            for strategy in self.strategies:
                strategy.after_optimizer_step(ctx)
            for strategy in self.strategies:
                strategy.on_step_end(ctx)
        self.step += 1

    def _context(self, optimizer: torch.optim.Optimizer) -> StepContext:
        if optimizer is not self._optimizer_seen:
            self._group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
            self._optimizer_seen = optimizer
        distributed = dist.is_available() and dist.is_initialized()
        return StepContext(
            step=self.step,
            optimizer=optimizer,
            group_of=self._group_of,
            world_size=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
        )

    # --- reporting ------------------------------------------------------------------------
    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Fraction of exactly-zero weights: ``sparsity`` over all targeted parameters, and per entry."""
        zeros: dict[str, torch.Tensor] = {}
        sizes: dict[str, int] = {}
        for plan in self.plans:
            if not plan.parameters:  # layer gates change no weights
                continue
            zeros[plan.label] = sum((p == 0).sum() for p in plan.parameters.values())
            sizes[plan.label] = plan.numel
        if not zeros:
            return {}
        counts = torch.stack([torch.as_tensor(z) for z in zeros.values()]).tolist()
        result = {"sparsity": sum(counts) / max(sum(sizes.values()), 1)}
        result.update({f"sparsity/{label}": c / max(sizes[label], 1) for label, c in zip(zeros, counts)})
        return result

    def metrics(self) -> dict[str, float]:
        """Everything the engine adds to training logs."""
        values = self.sparsity()
        for plan, strategy in zip(self.plans, self.strategies):
            values.update({f"{name}/{plan.label}": v for name, v in strategy.metrics().items()})
        return values

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "recipe": self.recipe.fingerprint(),
            "entries": [strategy.state_dict() for strategy in self.strategies],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise StateError(f"pruning state format {state.get('format')!r} is not supported (expected {STATE_FORMAT})")
        if state.get("recipe") != self.recipe.fingerprint():
            raise StateError(
                f"the pruning state was written by a different recipe than {self.recipe.source}; "
                "resume with the recipe the run started with"
            )
        if len(state["entries"]) != len(self.strategies):
            raise StateError(f"pruning state has {len(state['entries'])} entries, the recipe {len(self.strategies)}")
        for strategy, entry_state in zip(self.strategies, state["entries"]):
            strategy.load_state_dict(entry_state)
        self.step = int(state["step"])

    def save(self, directory: str | os.PathLike) -> None:
        save_state(directory, self.state_dict())

    def load(self, directory: str | os.PathLike) -> None:
        self.load_state_dict(load_state(directory))

    # --- compaction -----------------------------------------------------------------------
    def compaction_plan(self) -> dict[str, torch.Tensor]:
        """Every strategy's fixed structure in one mapping: parameter name to keep-mask, layer stack to one flag per layer."""
        plan: dict[str, torch.Tensor] = {}
        for strategy in self.strategies:
            plan.update(strategy.compaction_plan() or {})
        return plan

    def compact(self, model: nn.Module, probe: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A physically smaller copy of ``model`` without its pruned layers, heads and neurons; ``model`` is never changed.

        The copy's outputs are checked against ``model``'s on ``probe`` (default: a seeded
        random batch); CompactionError when they differ or when nothing can be removed.
        """
        pruned = self.compaction_plan()
        if not pruned:
            kinds = ", ".join(sorted({p.strategy.name for p in self.plans})) or "none"
            raise CompactionError(
                f"nothing to compact: this recipe's strategies ({kinds}) have no fixed structured pattern. Unstructured "
                "strategies zero individual weights, which stay in dense matrices; structured ones fix theirs at the end "
                "of their schedule (block-lasso its heads and neurons, layer-lasso its layers)"
            )
        return compact_model(unwrap_model(model), pruned, self.registry.architectures, probe)
