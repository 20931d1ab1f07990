"""The contract between the engine and a pruning strategy.

A strategy is a class; the engine makes one instance per recipe entry and calls its
methods around every real optimizer step. Everything a strategy needs to resume goes
through ``state_dict``/``load_state_dict``; its config is declarative and never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from hfprune.architecture import ArchitectureAdapter
from hfprune.errors import TargetError
from hfprune.learning_rates import future_learning_rates
from hfprune.schedule import Schedule

StateValue = torch.Tensor | int | float | str | bool | None | list | dict


class Targets(dict[str, nn.Module]):
    """The modules a recipe entry matched, by name in model order, and the architecture adapters of the pruner
    that matched them.

    A plain mapping to strategies that only need the modules. Strategies that work on heads,
    neurons or layer stacks ask ``architectures`` (the pruner's registry's adapters, in
    registration order) which modules are which, so a ``Pruner`` built with its own registry
    prunes and compacts with the same adapters.
    """

    def __init__(self, modules: dict[str, nn.Module], architectures: Sequence[ArchitectureAdapter] = ()):
        super().__init__(modules)
        self.architectures: list[ArchitectureAdapter] = list(architectures)


class StrategyConfig(BaseModel):
    """Base of every strategy's ``config:`` schema. Unknown keys are errors, and values are strict.

    Strict, because a recipe's typo must not become a setting: ``false`` is not the number 0,
    ``'0.5'`` is not 0.5, and ``1.0`` is not an int; an int is a float's value (``sparsity: 0``).
    A tuple field is written as a YAML list: give it ``Field(strict=False)``, which relaxes the
    tuple itself but not its items.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    def planned_sparsity(self) -> float | None:
        """The fraction of targeted weights this entry will zero, if known up front (for ``hfprune
        check``)."""
        return None


@dataclass(frozen=True)
class StepContext:
    """What a strategy may read about the optimizer step it is acting at.

    ``step`` is the 0-based index of the current optimizer step. ``optimizer`` is the
    optimizer the step ran with; learning rates are read from it after its step and
    before any scheduler moves them. ``grad_scale`` is the fp16 loss scale this step's
    backward pass ran with (1 without a GradScaler): the optimizer's parameters have
    unscaled gradients before the step, but a tensor the optimizer does not own still has
    its gradient multiplied by it. ``lr_scheduler`` is the run's scheduler when the driver
    knows it (the Trainer's; what a hand-written loop passed to ``Pruner.start``), which
    :meth:`summed_learning_rates` reads ahead.
    """

    step: int
    optimizer: torch.optim.Optimizer
    group_of: dict[int, int]
    world_size: int = 1
    rank: int = 0
    grad_scale: float = 1.0
    lr_scheduler: object | None = None

    def learning_rates(self, params: list[torch.Tensor]) -> list[float]:
        """The current learning rate of each parameter's optimizer group.

        The engine checks the parameters a strategy lists in ``learning_rate_parameters()`` before
        training; the KeyError here is for one a strategy reads without listing it there.
        """
        groups = self.optimizer.param_groups
        try:
            return [groups[self.group_of[id(p)]]["lr"] for p in params]
        except KeyError:
            raise KeyError(
                "a pruned parameter is not in any optimizer param group, and its strategy does not list it "
                "in learning_rate_parameters(), which would have caught this before training: add it to the "
                "optimizer, or, if it is frozen under peft, wrap its layer with LoRA (its adapter's learning "
                "rate is then used) or leave it out of the recipe"
            ) from None

    def summed_learning_rates(self, params: list[torch.Tensor], end: int) -> list[float]:
        """Per parameter, its group's learning rate summed over the steps from this one up to ``end`` (not
        included).

        Read ahead from a copy of ``lr_scheduler`` (:mod:`hfprune.learning_rates`); without one
        the current rates are taken to hold.
        """
        self.learning_rates(params)  # the same error for a parameter in no group
        per_group = future_learning_rates(self.optimizer, self.lr_scheduler, end - self.step)
        return [sum(per_group[self.group_of[id(p)]]) for p in params]


class Strategy:
    """Base class of pruning strategies; override what your method needs.

    Subclasses set ``Config`` to a :class:`StrategyConfig` subclass. The constructor
    receives the validated config, the matched modules (:class:`Targets`: by name in model
    order, with the pruner's architecture adapters), the parameters it claimed via
    :meth:`select_parameters`, and the schedule in steps.
    """

    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: Whether the strategy prunes parameters FSDP2 splits across processes: it works on
    #: what each process holds and reduces across processes what spans them (CONTRIBUTING,
    #: "Sharded parameters"). The engine refuses split parameters to strategies without it.
    shardable: ClassVar[bool] = False

    def __init__(
        self,
        config: StrategyConfig,
        targets: Targets,
        parameters: dict[str, nn.Parameter],
        schedule: Schedule,
    ):
        self.config = config
        self.targets = targets
        self.parameters = parameters
        self.schedule = schedule

    @classmethod
    def select_parameters(cls, targets: Targets, config: StrategyConfig) -> dict[str, nn.Parameter]:
        """The parameters this strategy changes, by full name. Two entries may not share one.

        Default: the ``weight`` of every matched module that has a matrix-or-larger weight.
        Raise :class:`hfprune.errors.TargetError` when the matched modules do not suit the
        config; the engine reports it against the entry's ``targets`` key, before training.
        A strategy that changes no weights (layer gates) returns an empty dict.
        """
        selected = {}
        for name, module in targets.items():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
                selected[f"{name}.weight"] = weight
        if not selected:
            raise TargetError(
                f"matched {len(targets)} modules, but none of them has a weight matrix to prune"
            )
        return selected

    @classmethod
    def planned_sparsity(
        cls, targets: Targets, parameters: dict[str, nn.Parameter], config: StrategyConfig
    ) -> float | None:
        """The fraction of ``parameters`` that will be zero once the schedule has ended, on these targets.

        What ``hfprune check`` prints and what training must reach, so it must count what the
        strategy really does: rounding per tensor or per block set, the block that always
        survives, heads grouped by key/value head. Default: ``config.planned_sparsity()``, the
        fraction the config asks for (None: decided by training). The engine refuses an entry
        whose config asks for zeros but whose plan here prunes nothing.
        """
        return config.planned_sparsity()

    @classmethod
    def describe(cls, targets: Targets, config: StrategyConfig) -> list[str]:
        """What ``hfprune check`` prints for an entry that changes no weights: what it acts on instead."""
        return []

    def learning_rate_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters, by name, whose group's learning rate this strategy reads (``ctx.learning_rates``,
        ``ctx.summed_learning_rates``): a proximal step scaled by it. Default: none.

        The engine refuses, as a recipe error once the optimizer is known and before any step,
        a run whose optimizer has one of them in no param group (a frozen LoRA base weight
        counts as in its adapter's group); undeclared, the lookup fails mid-training.
        """
        return {}

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Gradients are final (accumulated, all-reduced, clipped): add penalty gradients, mask gradients."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """The weights were just updated: proximal steps, clamps, re-applying masks."""

    def on_step_end(self, ctx: StepContext) -> None:
        """Schedule work: recompute masks, reweight, fix the pattern."""

    def fixes_a_pattern(self) -> bool:
        """Whether the strategy's result is fixed when its schedule ends (masks, settled gates), which the
        end-of-training checks hold it to; False for one that only shapes training (layer dropout)."""
        return True

    def disagreement(self) -> str | None:
        """Why the model's weights no longer match this strategy's state, if they do not.

        The engine asks at the end of training, after anything that reloads weights (the
        Trainer's ``load_best_model_at_end``): a saved model must be what the state and the
        logs say. Masking strategies report pruned weights that are non-zero.
        """
        return None

    def metrics(self) -> dict[str, float]:
        """Extra values for the training logs (sparsity is logged by the engine)."""
        return {}

    def compaction_plan(self) -> dict[str, torch.Tensor] | None:
        """What compaction may remove, fixed for good; None for unstructured sparsity or a pattern still
        changing.

        Keep-masks (bool) by parameter name, whose all-False head and neuron slices go, and
        by layer-stack name (an ``nn.ModuleList``): one bool per layer, False deletes it.
        """
        return None

    def close(self) -> None:
        """Undo what the constructor did to the model (forward hooks); the engine calls it before replacing a
        strategy."""

    def state_dict(self) -> dict[str, StateValue]:
        """Everything needed to resume exactly: tensors and JSON-compatible values, flat string keys."""
        return {}

    def load_state_dict(self, state: dict[str, StateValue]) -> None:
        """Restore what :meth:`state_dict` returned."""


class OneShotStrategy(Strategy):
    """A strategy that prunes once, from calibration data, with no optimizer step.

    Run by :func:`hfprune.oneshot` and ``hfprune prune``; the training drivers refuse it, as
    the one-shot driver refuses training strategies. The engine builds it like any strategy
    (its schedule is unused), then calls :meth:`prune` once with the calibration data
    (:class:`hfprune.calibration.Calibration`), whose passes measure what the method needs:
    activations (:meth:`~hfprune.calibration.Calibration.forward_passes`), loss gradients
    (:meth:`~hfprune.calibration.Calibration.gradient_passes`), or a layer's inputs as the
    already-pruned layers below make them (:meth:`~hfprune.calibration.Calibration.replay`).
    What it prunes it reports as any strategy does: masks, :meth:`compaction_plan` for
    structure. When :meth:`prune` raises, the driver puts the model's weights back.
    """

    #: Fewer calibration examples than this is an error before any pass: too few to rank by.
    min_examples: ClassVar[int] = 1

    def prune(self, calibration) -> None:
        """Measure on ``calibration``, decide what goes, and change the weights: once."""
        raise NotImplementedError
