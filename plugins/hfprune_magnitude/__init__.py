"""Built-in plugin: gradual magnitude pruning (Zhu & Gupta, 2017, arXiv 1710.01878).

Shipped inside hfprune but found exactly as a third-party plugin is: through the
``magnitude`` entry point in the ``hfprune`` group.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from hfprune import StrategyConfig, hookimpl
from hfprune.masks import MaskingStrategy, Scope, largest_magnitude_masks, planned_magnitude_sparsity
from hfprune.strategy import StepContext


class MagnitudeConfig(StrategyConfig):
    """``config:`` of the magnitude strategy."""

    sparsity: float = Field(ge=0.0, lt=1.0, description="final fraction of weights set to zero")
    initial_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0, description="sparsity at schedule start")
    scope: Scope = Field(
        default="layer",
        description="'layer': every matrix reaches the sparsity; 'global': one threshold across all "
        "targeted matrices",
    )

    @model_validator(mode="after")
    def _ramp_goes_up(self) -> MagnitudeConfig:
        if self.initial_sparsity > self.sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) is above sparsity ({self.sparsity})"
            )
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
    shardable = True  # masks apply to each process's part; thresholds are the whole matrices'

    @classmethod
    def planned_sparsity(cls, targets, parameters, config):
        return planned_magnitude_sparsity(list(parameters.values()), config.sparsity, config.scope)

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        self.updated_for: int | None = None  # the update step the masks were last computed for

    def on_step_end(self, ctx: StepContext) -> None:
        # Not only at update steps: an update a skipped (fp16 overflow) step missed is made at the next real
        # one.
        due = self.schedule.last_update_step(ctx.step)
        if due is not None and due != self.updated_for:
            sparsity = self.schedule.cubic_ramp(due, self.config.sparsity, self.config.initial_sparsity)
            masks = largest_magnitude_masks(
                self.masks.weights(), sparsity, self.config.scope, self.masks.layouts
            )
            self.masks.set(masks, ctx.optimizer)
            self.updated_for = due

    def state_dict(self) -> dict:
        return {**super().state_dict(), "updated_for": self.updated_for}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.updated_for = state.get("updated_for")


@hookimpl
def hfprune_register_strategies(register):
    register("magnitude", MagnitudeStrategy)
