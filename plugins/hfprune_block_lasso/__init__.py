"""Built-in plugin: block-structured reweighted group lasso (Li et al., Findings of EMNLP 2020, arXiv
2009.08065).

Shipped inside hfprune but found exactly as a third-party plugin is: through the
``block-lasso`` entry point in the ``hfprune`` group.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from hfprune import hookimpl
from hfprune.blocks import BlockSet, block_norms, build_block_sets, planned_block_sparsity
from hfprune.errors import TargetError
from hfprune.masks import ProximalConfig, ReweightedPhaseStrategy, Scope, kth_smallest
from hfprune.strategy import StepContext

Group = Literal["tile", "row", "column", "head", "neuron"]


class BlockLassoConfig(ProximalConfig):
    """``config:`` of the block-lasso strategy."""

    group: Group = Field(
        description="what one block is: a tile of one matrix, a whole row or column, an attention head, an "
        "FFN neuron"
    )
    # Written as a YAML list: the tuple is not strict, its items are.
    block: Annotated[tuple[int, int], Field(strict=False)] | None = Field(
        default=None, description="tile shape (rows, columns) in nn.Linear orientation; only for group 'tile'"
    )
    ratio: float = Field(
        ge=0.0, lt=1.0, description="fraction of blocks the hard prune at schedule end removes"
    )
    form: Literal["proximal", "penalty"] = Field(
        default="proximal",
        description="'proximal': block soft threshold after each step; 'penalty': the penalty's gradient "
        "added before it",
    )
    squared: bool = Field(
        default=False, description="penalize squared block norms (shrinks, never zeroes; the hard prune does)"
    )
    eps: float = Field(
        default=1e-3, gt=0.0, description="keeps alpha = 1 / (||W_b|| + eps) finite for blocks at zero"
    )
    reweight_every: int = Field(
        default=10, ge=1, description="optimizer steps between recomputations of alpha"
    )
    scope: Scope = Field(
        default="layer",
        description="'layer': each attention/FFN block or matrix loses `ratio` of its blocks; 'global': one "
        "threshold",
    )
    multiple_of: int = Field(
        default=1,
        ge=1,
        description="with scope 'layer', round the blocks each set keeps to a multiple of this: matrix "
        "sizes CPUs and GPUs run at full speed",
    )

    @model_validator(mode="after")
    def _block_goes_with_tile(self) -> BlockLassoConfig:
        if self.group == "tile" and self.block is None:
            raise ValueError("group 'tile' needs block: [rows, columns]")
        if self.group != "tile" and self.block is not None:
            raise ValueError(f"block is only for group 'tile'; group {self.group!r} sets its own block shape")
        if self.block is not None and min(self.block) < 1:
            raise ValueError(f"block sides must be at least 1, got {list(self.block)}")
        if self.multiple_of > 1 and self.scope != "layer":
            raise ValueError("multiple_of rounds each set's kept blocks, so it needs scope 'layer'")
        if self.lam == "auto" and (self.form != "proximal" or self.squared):
            raise ValueError(
                "lam: auto follows the proximal step's shrinkage: it needs form 'proximal' and squared "
                "false; "
                "set a number for lam"
            )
        return self

    def planned_sparsity(self) -> float:
        return self.ratio


class BlockLassoStrategy(ReweightedPhaseStrategy):
    """Reweighted group lasso on blocks of weights, then a hard prune and masked retraining.

    During ``[start, end)`` of the schedule every block ``b`` is pushed toward zero as a
    whole by the penalty ``lam * alpha_b * ||W_b||``: in the ``proximal`` form each real
    optimizer step is followed by the block soft threshold
    ``W_b <- W_b * max(0, 1 - lr * lam * alpha_b / ||W_b||)`` (exact zeros, Adam's moments
    undistorted); in the ``penalty`` form ``lam * alpha_b * W_b / ||W_b||`` is added to the
    gradient before the step, as the authors' code did through the loss. ``alpha_b`` is
    ``1 / (||W_b|| + eps)``, computed from the weights at the first step of the phase and
    every ``reweight_every`` steps after it, so small blocks are pushed harder than large
    ones and ``lam`` means the same whatever the scale of a block's norm (a fixed alpha of 1
    would make heads of norm 9 and neurons of norm 1.5 shrink at the same absolute rate).
    With ``squared`` the penalty is on ``||W_b||**2`` and alpha is ``1 / (||W_b||**2 + eps)``.

    At ``end`` the ``ratio`` of blocks with the smallest norms is pruned (per attention or
    FFN block, or per matrix for tiles, with ``scope: layer``; at least one block survives in
    each) and training goes on with a fixed mask. Head and neuron blocks span the matrices
    the architecture adapters name (Q, K, V rows and output-projection columns; up/gate rows
    and down-projection columns), so once pruned they can be removed by compaction.

    ``lam`` (proximal form): between reweightings a block's squared norm falls by about
    ``2 * lr * lam`` per step, so ``lam: auto`` (the default) sets ``lam = lam_scale * q**2 /
    (2 * sum(lr))`` at the phase's first step, with ``q`` the block norm at the ``ratio``
    quantile then and ``sum(lr)`` read ahead from the run's scheduler over the phase: at
    ``lam_scale: 1`` about ``ratio`` of the blocks reach zero by the end, on any model and run
    length. ``zero_blocks`` in the logs says how many did. That lam also shrinks the blocks
    that survive; in a fine-tuning run a fraction of it keeps more accuracy (``lam_scale:
    0.3`` on MiniLM, BENCHMARKS.md), the hard prune doing the rest (docs/strategies.md).
    """

    Config = BlockLassoConfig
    shardable = (
        True  # block norms sum every process's part (blocks.block_norms); masks and factors apply per part
    )

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        self.sets: list[BlockSet] = build_block_sets(
            targets, config.group, config.block, targets.architectures
        )
        # One alpha per block, set from the weights when the phase starts; dropped once the
        # pattern is fixed (masked training needs only masks).
        self.alphas: list[torch.Tensor] | None = self.new_alphas()
        self.weighted = False  # whether the alphas were computed from the weights yet
        self._lr_params = list(self.learning_rate_parameters().values())  # what the proximal step reads

    @classmethod
    def planned_sparsity(cls, targets, parameters, config):
        sets = build_block_sets(targets, config.group, config.block, targets.architectures)
        return planned_block_sparsity(sets, config.scope, config.ratio, partial(cls._kept_count, config))

    def learning_rate_parameters(self):
        """Proximal form: each block set shrinks at the learning rate of its first matrix's group (the penalty
        form reads none)."""
        if self.config.form != "proximal":
            return {}
        return {block_set.matrices[0].name: block_set.matrices[0].param for block_set in self.sets}

    @classmethod
    def select_parameters(cls, targets, config):
        sets = build_block_sets(targets, config.group, config.block, targets.architectures)
        selected = {matrix.name: matrix.param for block_set in sets for matrix in block_set.matrices}
        frozen = [name for name, param in selected.items() if not param.requires_grad]
        if frozen and config.form == "penalty":
            raise TargetError(
                f"form: penalty adds the penalty's gradient, but {frozen[0]} is frozen (a LoRA base "
                "weight?) and gets "
                "none; use form: proximal, which shrinks frozen weights at their adapter's learning rate"
            )
        return selected

    # --- the hot path -------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self, ctx: StepContext) -> None:
        if self.masks.active:
            self.masks.apply_to_grads()
        elif self._lasso_acts(ctx, "penalty"):
            norms = None if self.config.squared else block_norms(self.sets)
            for index, (block_set, alpha) in enumerate(zip(self.sets, self.alphas)):
                if self.config.squared:
                    coefficient = alpha * (2 * self.lam)
                else:
                    coefficient = alpha * self.lam / norms[index].clamp_min_(1e-12)
                block_set.add_to_grads(coefficient)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self.masks.active:
            self.masks.apply_to_weights()
        elif self._lasso_acts(ctx, "proximal"):
            lam = self.penalty_weight(ctx, self._lr_params)
            norms = [None] * len(self.sets) if self.config.squared else block_norms(self.sets)
            for block_set, alpha, lr, norm in zip(
                self.sets, self.alphas, ctx.learning_rates(self._lr_params), norms
            ):
                threshold = alpha * (lr * lam)
                if self.config.squared:
                    factor = threshold.mul_(2).add_(1).reciprocal_()
                else:
                    factor = threshold.div_(norm.clamp_min_(1e-12)).neg_().add_(1).clamp_min_(0)
                block_set.scale_weights(factor)

    def _lasso_acts(self, ctx: StepContext, form: str) -> bool:
        """Whether the lasso in ``form`` acts at this step; at the phase's first real step, alpha is set
        first.

        Not at ``start`` itself: a proximal step there may be one an fp16 scaler skipped.
        """
        if self.config.form != form or not self.schedule.in_phase(ctx.step):
            return False
        if not self.weighted:
            self.reweight()
        return True

    @torch.no_grad()
    def reweight(self) -> None:
        """``alpha_b = 1 / (||W_b|| + eps)`` (or of the squared norm) from the current weights."""
        for norms, alpha in zip(block_norms(self.sets), self.alphas):
            if self.config.squared:
                norms.square_()
            alpha.copy_(norms.add_(self.config.eps).reciprocal_())
        self.weighted = True

    @torch.no_grad()
    def phase_quantile(self) -> float:
        """The block norm at the ``ratio`` quantile over all of this entry's blocks."""
        everything = torch.cat([norms.flatten() for norms in block_norms(self.sets)])
        return float(kth_smallest(everything, max(1, round(self.config.ratio * everything.numel()))))

    @torch.no_grad()
    def fix_pattern(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The hard prune: mask the ``ratio`` of blocks with the smallest norms, for good."""
        keeps = self._keep_vectors(block_norms(self.sets))
        params = zip(self.masks.names, self.masks.params)
        masks = {
            name: torch.ones(p.shape, dtype=torch.bool, device=p.device) for name, p in params
        }  # whole: blocks span rows
        for block_set, keep in zip(self.sets, keeps):
            block_set.keep_masks(keep, masks)
        self.masks.set(
            [layout.rows(masks[name]) for name, layout in zip(self.masks.names, self.masks.layouts)],
            optimizer,
        )
        self.alphas = None

    def _keep_vectors(self, norms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per set, which blocks survive; one block always survives.

        ``global``: one threshold over all sets, ties at it pruned (so blocks already at zero
        always go). ``layer``: each set keeps its ``1 - ratio`` largest blocks, that count
        rounded to ``multiple_of``.
        """
        if self.config.scope == "global":
            everything = torch.cat([n.flatten() for n in norms])
            threshold = kth_smallest(everything, round(self.config.ratio * everything.numel()))
            keeps = [n > threshold for n in norms]
        else:
            keeps = [self._largest(n, self._kept_count(self.config, n.numel())) for n in norms]
        for norm, keep in zip(norms, keeps):
            if not keep.any():
                keep.view(-1)[norm.argmax()] = True
        return keeps

    @staticmethod
    def _kept_count(config: BlockLassoConfig, blocks: int) -> int:
        kept = blocks - round(config.ratio * blocks)
        step = config.multiple_of
        return min(blocks, max(step, step * round(kept / step))) if step > 1 else max(kept, 1)

    @staticmethod
    def _largest(norm: torch.Tensor, count: int) -> torch.Tensor:
        keep = torch.zeros(norm.numel(), dtype=torch.bool, device=norm.device)
        keep[norm.flatten().topk(count).indices] = True
        return keep.view(norm.shape)

    # --- reporting and state ----------------------------------------------------------------
    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """``zero_blocks``: the fraction of blocks whose weights are all zero (pruned, or thresholded to
        zero)."""
        norms = block_norms(self.sets)
        zeros = torch.stack([(n == 0).sum() for n in norms]).sum().item()
        return {"zero_blocks": zeros / sum(n.numel() for n in norms)} | (
            {"lam": self.lam} if self.lam is not None else {}
        )

    def compaction_plan(self) -> dict[str, torch.Tensor] | None:
        return self.keep_plan()

    def alpha_names(self) -> list[str]:
        return [block_set.name for block_set in self.sets]

    def state_dict(self) -> dict:
        state = super().state_dict()
        return state if self.alphas is None else {**state, "weighted": self.weighted}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        # States saved before this flag: alphas still all 1 were never computed from the weights.
        self.weighted = bool(
            state.get("weighted", self.alphas is not None and any((a != 1).any() for a in self.alphas))
        )

    def new_alphas(self) -> list[torch.Tensor]:
        return [torch.ones_like(norms) for norms in block_norms(self.sets)]


@hookimpl
def hfprune_register_strategies(register):
    register("block-lasso", BlockLassoStrategy)
