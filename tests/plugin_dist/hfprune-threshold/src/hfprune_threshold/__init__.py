"""An hfprune plugin: prune every weight whose magnitude is below a fixed threshold.

A recipe uses it as::

    pruners:
      - strategy: threshold
        targets: ['re:.*\\.dense']
        schedule: {start: 0, end: 1.0, every: 10}
        config: {threshold: 0.01}

At every update step of the schedule, each targeted weight with ``|w| < threshold`` is
pruned. Masks only grow: a pruned weight stays exactly zero for the rest of training, its
gradient is zeroed before every optimizer step and the weight itself after it.

What makes this a plugin is the ``hfprune`` entry point in ``pyproject.toml`` naming this
module, and the ``hfprune_register_strategies`` hook below. ``MaskingStrategy`` does the
mask bookkeeping (gradients before the step, weights after it, saving the masks); the
strategy only says when masks change and what they are.
"""

from __future__ import annotations

import torch
from pydantic import Field

from hfprune import StrategyConfig, hookimpl
from hfprune.masks import MaskingStrategy
from hfprune.strategy import StepContext


class ThresholdConfig(StrategyConfig):
    """``config:`` of the threshold strategy (unknown keys are errors, as in every strategy config)."""

    threshold: float = Field(gt=0.0, description="weights whose magnitude is below this are pruned")


class ThresholdStrategy(MaskingStrategy):
    """Magnitude threshold pruning: zero every weight with |w| below a fixed threshold; pruned stays
    pruned."""

    Config = ThresholdConfig

    def on_step_end(self, ctx: StepContext) -> None:
        if self.schedule.is_update_step(ctx.step):
            self.masks.set(self._grown_masks(), ctx.optimizer)

    @torch.no_grad()
    def _grown_masks(self) -> list[torch.Tensor]:
        # Keep only what was kept before: a pruned weight never comes back.
        return [
            (p.abs() >= self.config.threshold) & kept for p, kept in zip(self.masks.params, self.masks.keep())
        ]


@hookimpl
def hfprune_register_strategies(register):
    register("threshold", ThresholdStrategy)
