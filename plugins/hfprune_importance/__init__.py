"""Built-in plugin: importance-based structured pruning of attention heads and FFN neurons.

Shipped inside hfprune but found exactly as a third-party plugin is: through the
``importance`` entry point in the ``hfprune`` group.

A head's (or neuron's) importance is how much the loss moves when it is switched off. With a
mask variable ``m`` multiplying the head's output (the columns of the output projection it
feeds, or a neuron's column of the down projection), the loss gradient at ``m = 1`` is

    dL/dm = sum over those columns of  W * dL/dW

(the projection's input times its input gradient, summed over positions, is exactly this),
so it comes from the weights and the gradients the training step already has, after
accumulation and after DDP averaged them: every rank ranks the same numbers. They are also
after gradient clipping, which scales a whole step's gradients alike: the ranking within a
step is unchanged, and steps with clipped gradients count a little less in the average. A
step the loss scaler skips (fp16 overflow) is left out. ``taylor``
accumulates ``|dL/dm|`` (first-order Taylor, Molchanov et al. 2019; Michel et al. 2019),
``fisher`` accumulates ``(dL/dm)**2`` (the diagonal empirical Fisher of the masks, Kwon et al.
2022), both as moving averages over the training steps (ALGORITHMS.md section 5). Groups are
pruned along the cubic ramp of gradual magnitude pruning, least important first, and stay
pruned; from ``end`` on the pattern is fixed and compaction removes it like block-lasso's.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hfprune import StrategyConfig, hookimpl
from hfprune.blocks import BlockSet, block_norms, build_block_sets, planned_block_sparsity
from hfprune.errors import StateError, TargetError
from hfprune.masks import MaskingStrategy, Scope, kth_smallest
from hfprune.strategy import StepContext

SCORE_PREFIX = "score."


class ImportanceConfig(StrategyConfig):
    """``config:`` of the importance strategy."""

    group: Literal["head", "neuron"] = Field(
        description="what is pruned: attention heads (key/value groups) or FFN neurons"
    )
    ratio: float = Field(ge=0.0, lt=1.0, description="fraction of heads or neurons pruned by schedule end")
    criterion: Literal["taylor", "fisher"] = Field(
        default="taylor",
        description="'taylor': moving average of |dL/dm|; 'fisher': of (dL/dm)^2",
    )
    beta: float = Field(
        default=0.9, ge=0.0, lt=1.0, description="moving-average factor of the importance, per optimizer step"
    )
    scope: Scope = Field(
        default="layer",
        description="'layer': every attention or FFN block loses `ratio` of its groups; 'global': one "
        "ranking, each "
        "block's importances normalized to unit L2 norm first (Michel et al.)",
    )
    multiple_of: int = Field(
        default=1,
        ge=1,
        description="with scope 'layer', the groups each block keeps at the end are a multiple of this",
    )

    @model_validator(mode="after")
    def _multiple_of_needs_layer_scope(self) -> ImportanceConfig:
        if self.multiple_of > 1 and self.scope != "layer":
            raise ValueError("multiple_of rounds each block's kept groups, so it needs scope 'layer'")
        return self

    def planned_sparsity(self) -> float:
        return self.ratio


class ImportanceStrategy(MaskingStrategy):
    """Gradual structured pruning of the heads or neurons whose removal moves the loss least.

    Before every real optimizer step before ``end`` the importance of each group is updated
    from ``dL/dm`` (see the module docstring). At every schedule update step the target ratio
    ``ratio * (1 - (1 - progress)**3)`` of the groups is pruned, least important first
    (groups already pruned stay so); a pruned group is one mask over all its matrices (Q, K, V
    rows and output-projection columns; up/gate rows and down-projection columns). From
    ``end`` on the mask is fixed, training goes on masked, and compaction removes the groups.
    """

    Config = ImportanceConfig

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        self.sets: list[BlockSet] = build_block_sets(targets, config.group, None, targets.architectures)
        # importance per group, in float32 whatever the weights' dtype: a moving average needs the mantissa
        self.scores = [torch.zeros_like(norms, dtype=torch.float32) for norms in block_norms(self.sets)]
        self.updated_for: int | None = None
        self._pending: list[torch.Tensor | None] | None = None  # this step's dL/dm, until the step is real

    @classmethod
    def planned_sparsity(cls, targets, parameters, config):
        sets = build_block_sets(targets, config.group, None, targets.architectures)
        # the ramp only raises the ratio, so the groups kept at the end are those kept at the final ratio
        return planned_block_sparsity(
            sets,
            config.scope,
            config.ratio,
            lambda groups: cls._kept_count(config, groups, groups, config.ratio),
        )

    @classmethod
    def select_parameters(cls, targets, config):
        sets = build_block_sets(targets, config.group, None, targets.architectures)
        selected = {matrix.name: matrix.param for block_set in sets for matrix in block_set.matrices}
        for block_set, norms in zip(sets, block_norms(sets)):
            if config.scope == "layer" and config.multiple_of > norms.numel():
                raise TargetError(
                    f"multiple_of {config.multiple_of} is more than the {norms.numel()} {config.group}s of "
                    f"{block_set.name}: nothing could be pruned there"
                )
        frozen = [name for name, param in selected.items() if not param.requires_grad]
        if frozen:
            raise TargetError(
                f"importance is measured from weight gradients, and {frozen[0]} is frozen (a LoRA base "
                "weight?): "
                "prune frozen weights with block-lasso (form: proximal) instead"
            )
        return selected

    # --- the hot path -------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self, ctx: StepContext) -> None:
        # Read before the gradients are masked; counted only once the step is known to be real.
        self._pending = (
            [block_set.mask_gradient() for block_set in self.sets]
            if not self.schedule.has_ended(ctx.step)
            else None
        )
        super().before_optimizer_step(ctx)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        super().after_optimizer_step(ctx)
        pending, self._pending = self._pending, None
        if pending is not None:
            self._accumulate(pending)

    def _accumulate(self, gradients: list[torch.Tensor | None]) -> None:
        beta = self.config.beta
        for gradient, score in zip(gradients, self.scores):
            if gradient is None:  # no gradient reached these matrices this step
                continue
            gradient = gradient.float()
            value = gradient.abs_() if self.config.criterion == "taylor" else gradient.square_()
            score.mul_(beta).add_(value, alpha=1 - beta)

    def on_step_end(self, ctx: StepContext) -> None:
        # Not only at update steps: an update a skipped (fp16 overflow) step missed is made at the next real
        # one.
        due = self.schedule.last_update_step(ctx.step)
        if due is not None and due != self.updated_for:
            self._prune(self.schedule.cubic_ramp(due, self.config.ratio), optimizer=ctx.optimizer)
            self.updated_for = due

    @torch.no_grad()
    def _prune(self, ratio: float, optimizer: torch.optim.Optimizer | None) -> None:
        """Mask the least important ``ratio`` of the groups; groups pruned before stay pruned."""
        pruned = self._pruned_groups()
        ranked = [
            score.masked_fill(gone, -1.0) for score, gone in zip(self.scores, pruned)
        ]  # scores are >= 0
        if self.config.scope == "global":
            keeps = self._global_keeps(ranked, ratio)
        else:
            keeps = [
                self._largest(rank, self._kept_count(self.config, rank.numel(), int((~gone).sum()), ratio))
                for rank, gone in zip(ranked, pruned)
            ]
        masks = {
            name: torch.ones(p.shape, dtype=torch.bool, device=p.device)
            for name, p in zip(self.masks.names, self.masks.params)
        }
        for block_set, keep in zip(self.sets, keeps):
            block_set.keep_masks(keep, masks)
        self.masks.set([masks[name] for name in self.masks.names], optimizer)

    def _pruned_groups(self) -> list[torch.Tensor]:
        if not self.masks.active:
            return [torch.zeros_like(score, dtype=torch.bool) for score in self.scores]
        keep = dict(zip(self.masks.names, self.masks.keep()))
        return [~block_set.kept_groups(keep) for block_set in self.sets]

    def _global_keeps(self, ranked: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
        """One threshold over every block's importances, each normalized to unit L2 norm; every block keeps
        one group."""
        normalized = [rank / rank.clamp_min(0).norm().clamp_min(1e-30) for rank in ranked]
        everything = torch.cat(normalized)
        threshold = kth_smallest(everything, round(ratio * everything.numel()))
        keeps = [rank > threshold for rank in normalized]
        for rank, keep in zip(normalized, keeps):
            if not keep.any():
                keep[rank.argmax()] = True
        return keeps

    @staticmethod
    def _kept_count(config: ImportanceConfig, groups: int, unpruned: int, ratio: float) -> int:
        """Groups to keep of ``groups`` at ``ratio``: at least one, rounded to a multiple of ``multiple_of``
        at every update (so the count only falls as the ratio rises), never more than are unpruned."""
        kept = max(1, groups - round(ratio * groups))
        step = config.multiple_of
        if step > 1:
            kept = max(step, step * round(kept / step))
        return min(kept, unpruned)

    @staticmethod
    def _largest(rank: torch.Tensor, count: int) -> torch.Tensor:
        keep = torch.zeros_like(rank, dtype=torch.bool)
        keep[rank.topk(count).indices] = True
        return keep

    # --- reporting and state ----------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """``pruned_groups``: the fraction of heads or neurons masked so far."""
        pruned = self._pruned_groups()
        return {"pruned_groups": sum(int(p.sum()) for p in pruned) / sum(p.numel() for p in pruned)}

    def compaction_plan(self) -> dict[str, torch.Tensor] | None:
        """Once the pattern is fixed (``end`` reached): each parameter's keep-mask, whose all-False slices
        compaction removes."""
        return self.keep_plan() if self.updated_for == self.schedule.end else None

    def state_dict(self) -> dict:
        scores = {
            SCORE_PREFIX + block_set.name: score.cpu() for block_set, score in zip(self.sets, self.scores)
        }
        return {**super().state_dict(), **scores, "updated_for": self.updated_for}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for block_set, score in zip(self.sets, self.scores):
            saved = state.get(SCORE_PREFIX + block_set.name)
            if not torch.is_tensor(saved) or saved.shape != score.shape:
                raise StateError(f"saved importance for {block_set.name} is missing or has the wrong shape")
            score.copy_(saved)
        updated_for = state.get("updated_for")
        if updated_for is not None and type(updated_for) is not int:
            raise StateError(f"saved updated_for {updated_for!r} is not a step number")
        self.updated_for = updated_for


@hookimpl
def hfprune_register_strategies(register):
    register("importance", ImportanceStrategy)
