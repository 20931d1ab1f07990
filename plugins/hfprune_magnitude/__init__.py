"""Built-in plugin: gradual magnitude pruning (Zhu & Gupta, 2017, arXiv 1710.01878).

Shipped inside hfprune but found exactly as a third-party plugin is: through the
``magnitude`` entry point in the ``hfprune`` group.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hfprune import StrategyConfig, hookimpl
from hfprune.masks import MaskingStrategy
from hfprune.strategy import StepContext


class MagnitudeConfig(StrategyConfig):
    """``config:`` of the magnitude strategy."""

    sparsity: float = Field(ge=0.0, lt=1.0, description="final fraction of weights set to zero")
    initial_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0, description="sparsity at schedule start")
    scope: Literal["layer", "global"] = Field(
        default="layer",
        description="'layer': every matrix reaches the sparsity; 'global': one threshold across all targeted matrices",
    )

    @model_validator(mode="after")
    def _ramp_goes_up(self) -> MagnitudeConfig:
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity}) is above sparsity ({self.sparsity})")
        return self

    def planned_sparsity(self) -> float:
        return self.sparsity


class MagnitudeStrategy(MaskingStrategy):
    """Gradual magnitude pruning: zero the smallest weights along a cubic sparsity ramp.

    At every schedule update step ``t`` between ``start`` and ``end`` the target sparsity is
    ``s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3`` and the masks are
    recomputed from weight magnitudes; from ``end`` on the masks are fixed. Masked weights
    stay exactly zero: gradients are masked before each step and weights after it.
    """

    Config = MagnitudeConfig

    def target_sparsity(self, step: int) -> float:
        remaining = 1.0 - self.schedule.progress(step)
        return self.config.sparsity + (self.config.initial_sparsity - self.config.sparsity) * remaining**3

    def on_step_end(self, ctx: StepContext) -> None:
        if self.schedule.is_update_step(ctx.step):
            self.masks.set(self._magnitude_masks(self.target_sparsity(ctx.step)), ctx.optimizer)

    @torch.no_grad()
    def _magnitude_masks(self, sparsity: float) -> list[torch.Tensor]:
        params = self.masks.params
        if self.config.scope == "global":
            magnitudes = torch.cat([p.detach().abs().flatten().float() for p in params])
            threshold = _kth_smallest(magnitudes, round(sparsity * magnitudes.numel()))
            del magnitudes
            return [p.detach().abs() > threshold for p in params]
        # One matrix at a time, so at most one float copy of a weight exists at once.
        return [_keep_largest(p.detach().abs().float(), sparsity) for p in params]


def _keep_largest(magnitude: torch.Tensor, sparsity: float) -> torch.Tensor:
    return magnitude > _kth_smallest(magnitude.flatten(), round(sparsity * magnitude.numel()))


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (k >= 1); below every value when k == 0, so nothing is pruned."""
    if k <= 0:
        return values.new_tensor(-1.0)
    return values.kthvalue(k).values


@hookimpl
def hfprune_register_strategies(register):
    register("magnitude", MagnitudeStrategy)
