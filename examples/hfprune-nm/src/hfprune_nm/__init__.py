"""hfprune-nm: N:M semi-structured sparsity as an hfprune strategy plugin.

In every group of M consecutive weights along the input dimension of a targeted
``nn.Linear`` weight, the N of largest magnitude are kept and the others are zero: 2:4 is
the pattern sparse tensor cores run at up to twice the dense matrix-multiply rate.

What makes this a plugin is the ``nm`` entry point in the ``hfprune`` group (see
``pyproject.toml``) naming this module, and :func:`hfprune_register_strategies` below.
``MaskingStrategy`` does the mask bookkeeping (gradients masked before each optimizer step,
weights after it, the optimizer's state where a mask prunes, the masks in every checkpoint);
this module only says when the masks change and what they are.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from hfprune import StrategyConfig, hookimpl
from hfprune.errors import TargetError
from hfprune.masks import MaskingStrategy
from hfprune.strategy import StepContext


class NMConfig(StrategyConfig):
    """``config:`` of the nm strategy (unknown keys are errors, as in every strategy config)."""

    n: int = Field(ge=1, description="weights kept in every group of m")
    m: int = Field(ge=2, description="group size: consecutive weights along a matrix's input dimension")

    @model_validator(mode="after")
    def _n_below_m(self) -> NMConfig:
        if self.n >= self.m:
            raise ValueError(
                f"n ({self.n}) must be below m ({self.m}): keeping all {self.m} of {self.m} prunes nothing"
            )
        return self

    def planned_sparsity(self) -> float:
        return 1 - self.n / self.m


def nm_masks(weight: torch.Tensor, kept: int, m: int) -> torch.Tensor:
    """Keep-mask (bool) of the ``kept`` largest magnitudes in every group of ``m`` consecutive weights of each
    row.

    A weight of shape ``(out, in)`` with ``in`` a multiple of ``m`` is viewed as
    ``(out * in / m, m)`` groups, so one ``topk`` over the last axis ranks every group at once.
    """
    groups = weight.detach().abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(kept, dim=1).indices, True)
    return keep.view_as(weight)


class NMStrategy(MaskingStrategy):
    """N:M semi-structured sparsity: the N largest of every M consecutive weights along a Linear's inputs
    survive.

    At each update step of the schedule the masks are recomputed from the weights'
    magnitudes, keeping ``k`` per group, where ``k`` goes down from M at ``start`` to N at
    ``end`` along the cubic ramp of gradual magnitude pruning (Zhu & Gupta, 2017):
    ``k = N + round((M - N) * (1 - progress) ** 3)``. Pruned weights are zero, so they rank
    last and stay pruned. From ``end`` on the N:M masks are fixed. ``schedule: {start: 0, end: 0}``
    prunes to N:M at once.
    """

    Config = NMConfig

    @classmethod
    def select_parameters(cls, targets: dict[str, nn.Module], config: NMConfig) -> dict[str, nn.Parameter]:
        """Every matched module's weight; a TargetError naming the modules that are no Linear or whose inputs
        M does not divide."""
        not_linear = [
            f"{name} ({type(module).__name__})"
            for name, module in targets.items()
            if not isinstance(module, nn.Linear)
        ]
        if not_linear:
            raise TargetError(
                "N:M sparsity applies to nn.Linear weights, and these matched modules are not: "
                f"{_some(not_linear)}"
            )
        misfits = [
            f"{name} ({module.in_features})"
            for name, module in targets.items()
            if module.in_features % config.m
        ]
        if misfits:
            raise TargetError(
                f"m={config.m} does not divide the input features of {_some(misfits)}: N:M groups run along "
                "a Linear "
                "weight's inputs. Exclude these modules (exclude: [...]) or choose an m that divides their "
                "input features."
            )
        return {f"{name}.weight": module.weight for name, module in targets.items()}

    def kept_per_group(self, step: int) -> int:
        """How many weights of each group of M survive an update at ``step``: M at ``start``, N from ``end``
        on."""
        n, m = self.config.n, self.config.m
        return n + round((m - n) * (1 - self.schedule.progress(step)) ** 3)

    def on_step_end(self, ctx: StepContext) -> None:
        if self.schedule.is_update_step(ctx.step):
            kept = self.kept_per_group(ctx.step)
            self.masks.set([nm_masks(p, kept, self.config.m) for p in self.masks.params], ctx.optimizer)


def _some(names: list[str], shown: int = 3) -> str:
    """The first few names, and how many more: a recipe can match dozens of modules."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


@hookimpl
def hfprune_register_strategies(register):
    register("nm", NMStrategy)
