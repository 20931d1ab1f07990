"""Built-in plugin: reweighted proximal pruning (Guo et al., 2019, arXiv 1909.12486).

Shipped inside hfprune but found exactly as a third-party plugin is: through the ``rpp``
entry point in the ``hfprune`` group.
"""

from __future__ import annotations

import torch
from pydantic import Field

from hfprune import hookimpl
from hfprune.integrations.sharding import count_zeros
from hfprune.masks import (
    ProximalConfig,
    ReweightedPhaseStrategy,
    Scope,
    largest_magnitude_masks,
    magnitude_at_quantile,
    planned_magnitude_sparsity,
)
from hfprune.strategy import StepContext


class RPPConfig(ProximalConfig):
    """``config:`` of the rpp strategy."""

    sparsity: float = Field(
        ge=0.0, lt=1.0, description="fraction of weights zero once the pattern is fixed at schedule end"
    )
    eps: float = Field(
        default=1e-3, gt=0.0, description="keeps alpha = 1 / (|w| + eps) finite for weights at zero"
    )
    reweight_every: int = Field(
        default=10, ge=1, description="optimizer steps between recomputations of alpha"
    )
    scope: Scope = Field(
        default="layer",
        description="how the pattern is fixed: 'layer' every matrix reaches the sparsity; 'global' one "
        "threshold across all",
    )

    def planned_sparsity(self) -> float:
        return self.sparsity


class RPPStrategy(ReweightedPhaseStrategy):
    """Reweighted proximal pruning: a reweighted L1 penalty applied as a proximal step.

    Minimises ``loss + lam * sum(alpha * |w|)`` over the targeted weights. The penalty is
    not part of the gradient: after every optimizer step in ``[start, end)`` of the
    schedule each weight is soft-thresholded, ``w <- sign(w) * max(|w| - lr * lam * alpha, 0)``,
    with ``lr`` its param group's current learning rate. Decoupling the penalty from the
    gradient, as AdamW decouples weight decay, leaves Adam's moment estimates undistorted
    and produces exact zeros. ``alpha`` starts at 1 (plain L1) and is recomputed as
    ``1 / (|w| + eps)`` every ``reweight_every`` steps, which approximates an L0 penalty:
    small weights are pushed harder than large ones.

    ``lam``: between reweightings a weight shrinks by about ``lr * lam / |w|`` per step, so
    ``w**2`` falls by ``2 * lr * lam`` per step and, if its gradient did not pull it back, a
    weight of magnitude ``q`` reaches zero once the learning rates summed over the proximal
    phase reach ``q**2 / (2 * lam)``. ``lam: auto`` (the default) sets ``lam = q**2 / (2 *
    sum(lr))`` at the phase's first step, with ``q`` the magnitude at the target quantile
    then and ``sum(lr)`` read ahead from the run's scheduler, so the phase produces about the
    target's zeros by itself on any model and run length (docs/strategies.md).
    ``proximal_sparsity`` in the logs says what it reached. As the method has it, alpha starts
    at 1 and becomes ``1 / |w|`` at the first reweighting: in the first ``reweight_every``
    steps small weights shrink less than the rule assumes, so a short phase falls short of it.

    At step ``end`` the pattern is fixed at exactly ``sparsity``: a keep-mask zeroes the
    smallest magnitudes, and training continues with the mask applied after every step, so
    fixed zeros never come back. The zeros the proximal phase made go first; if it made
    more than ``sparsity`` asks for, the ones the unthresholded optimizer step at ``end``
    moved furthest from zero are released. The schedule's ``every`` plays no part: the proximal step follows
    every step in the phase
    and ``reweight_every`` sets the reweighting.
    """

    Config = RPPConfig
    shardable = True  # elementwise on each process's part; thresholds and counts span the parts

    @classmethod
    def planned_sparsity(cls, targets, parameters, config):
        return planned_magnitude_sparsity(list(parameters.values()), config.sparsity, config.scope)

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        # One alpha per weight, in the weight's dtype so the hot path stays in one dtype.
        # Dropped once the pattern is fixed: masked training needs only the masks.
        self.alphas: list[torch.Tensor] | None = [
            torch.ones_like(w, requires_grad=False) for w in self.masks.weights()
        ]
        self.proximal_sparsity: float | None = None

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self.masks.active:
            self.masks.apply_to_weights()
        elif self.schedule.in_phase(ctx.step):
            self.proximal_step(
                ctx.learning_rates(self.masks.params), self.penalty_weight(ctx, self.masks.params)
            )
            if ctx.step == self.schedule.end - 1:
                self.proximal_sparsity = self._zero_fraction()

    def learning_rate_parameters(self):
        """Every targeted weight: the proximal step thresholds it at its group's learning rate."""
        return self.parameters

    @torch.no_grad()
    def proximal_step(self, learning_rates: list[float], lam: float) -> None:
        """Soft threshold every targeted weight at ``lr * lam * alpha``, all tensors at once.

        Computed as ``w - clamp(w, -t, t)``, which equals ``sign(w) * max(|w| - t, 0)``
        with two temporaries per tensor instead of four.
        """
        weights = self.masks.weights()
        thresholds = torch._foreach_mul(self.alphas, [lr * lam for lr in learning_rates])
        clamped = torch._foreach_minimum(weights, thresholds)
        torch._foreach_neg_(thresholds)
        torch._foreach_maximum_(clamped, thresholds)
        torch._foreach_sub_(weights, clamped)

    @torch.no_grad()
    def reweight(self) -> None:
        """``alpha = 1 / (|w| + eps)`` from the current weights, in place."""
        torch._foreach_copy_(self.alphas, [w.detach() for w in self.masks.weights()])
        torch._foreach_abs_(self.alphas)
        torch._foreach_add_(self.alphas, self.config.eps)
        torch._foreach_reciprocal_(self.alphas)

    def phase_quantile(self) -> float:
        return magnitude_at_quantile(
            self.masks.weights(), self.config.sparsity, self.config.scope, self.masks.layouts
        )

    def fix_pattern(self, optimizer: torch.optim.Optimizer | None) -> None:
        """End the proximal phase: mask the smallest magnitudes up to the target sparsity, for good."""
        masks = largest_magnitude_masks(
            self.masks.weights(), self.config.sparsity, self.config.scope, self.masks.layouts
        )
        self.masks.set(masks, optimizer)
        self.alphas = None

    @torch.no_grad()
    def _zero_fraction(self) -> float:
        return count_zeros(self.masks.params, self.masks.layouts) / sum(p.numel() for p in self.masks.params)

    def metrics(self) -> dict[str, float]:
        values = {} if self.proximal_sparsity is None else {"proximal_sparsity": self.proximal_sparsity}
        return values | ({"lam": self.lam} if self.lam is not None else {})

    def alpha_names(self) -> list[str]:
        return self.masks.names

    def new_alphas(self) -> list[torch.Tensor]:
        return [torch.empty_like(w) for w in self.masks.weights()]

    def alpha_layouts(self):
        return self.masks.layouts

    def state_dict(self) -> dict:
        return {"proximal_sparsity": self.proximal_sparsity} | super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.proximal_sparsity = state.get("proximal_sparsity")
        super().load_state_dict(state)


@hookimpl
def hfprune_register_strategies(register):
    register("rpp", RPPStrategy)
