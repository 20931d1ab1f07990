"""Built-in plugin: structured pruning without retraining (Kwon et al. 2022, "A Fast Post-Training Pruning
Framework for Transformers", arXiv 2204.09656).

Shipped inside hfprune but found exactly as a third-party plugin is: through the
``mask-search`` entry point in the ``hfprune`` group.

Four steps, each one switchable so its share can be measured:

1. importance: the diagonal Fisher information of every head's and neuron's mask,
   ``sum over calibration batches of (dL/dm)^2``, from one backward pass per batch
   (``dL/dm`` is ``sum W * dL/dW`` over the group's consumer slice); or, as a baseline,
   each group's weight norm;
2. search (:mod:`.search`): the heads and neurons that keep the most importance within a
   budget, a fraction ``keep`` of the targeted blocks' FLOPs or parameters;
3. rearrangement (:func:`.search.rearrange`, Fisher only): within each block, which groups
   are pruned is revised using the batches' gradients together, not only their squares;
4. tuning (:mod:`.tuning`): the kept groups are rescaled by least squares so each block
   reproduces the dense block's output.

The pruned groups are masked like every structured strategy's, so compaction removes
them and checks the smaller model against the masked one.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from hfprune import OneShotStrategy, StrategyConfig, hookimpl
from hfprune.architecture import stacks_holding
from hfprune.blocks import BlockSet, block_norms, build_block_sets
from hfprune.errors import TargetError
from hfprune.masks import MaskingStrategy

from .search import rearrange, search
from .tuning import dense_copies, tune

KINDS = ("head", "neuron")
logger = logging.getLogger(__name__)


class MaskSearchConfig(StrategyConfig):
    """``config:`` of the mask-search strategy."""

    keep: float = Field(gt=0.0, le=1.0, description="fraction of the targeted heads' and neurons' cost kept")
    cost: Literal["flops", "parameters"] = Field(
        default="flops",
        description="'flops': per token, at the calibration data's mean length; 'parameters': weights",
    )
    importance: Literal["fisher", "weight-norm"] = Field(
        default="fisher",
        description="'fisher': the masks' diagonal Fisher information; 'weight-norm': a baseline",
    )
    rearrange: bool = Field(
        default=True, description="revise each block's choice with the gradients together"
    )
    tune: bool = Field(default=True, description="rescale the kept groups by least squares")


class MaskSearchStrategy(OneShotStrategy, MaskingStrategy):
    """Prune heads and neurons to a cost budget from calibration data, then rescale what is kept."""

    Config = MaskSearchConfig
    min_examples = 16

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        self.sets: list[BlockSet] = _unit_sets(targets)
        self.kept: list[torch.Tensor] | None = None

    @classmethod
    def select_parameters(cls, targets, config):
        return {m.name: m.param for block_set in _unit_sets(targets) for m in block_set.matrices}

    @classmethod
    def planned_sparsity(cls, targets, parameters, config):
        return None  # the search decides the split between heads and neurons

    @classmethod
    def describe(cls, targets, config):
        sets = _unit_sets(targets)
        heads = sum(1 for s in sets if s.unit.kind == "head")
        return [
            f"{heads} attention and {len(sets) - heads} feed-forward blocks; keeps {config.keep:g} of their "
            f"{config.cost}, heads and neurons chosen by {config.importance}"
        ]

    def prune(self, calibration) -> None:
        gradients = self.gradients(calibration) if self.config.importance == "fisher" else None
        if gradients is None:
            importances = [norms.flatten() for norms in block_norms(self.sets)]
        else:
            importances = [g.square().sum(0) for g in gradients]
        costs = [_costs(block_set, self.config.cost, calibration.mean_length) for block_set in self.sets]
        budget = self.config.keep * float(sum(c.sum() for c in costs))
        try:
            keeps = search(importances, costs, [s.unit.kind == "head" for s in self.sets], budget)
        except ValueError as exc:
            raise TargetError(f"keep {self.config.keep:g}: {exc}") from None
        if gradients is not None and self.config.rearrange:
            keeps = [rearrange(g, keep) for g, keep in zip(gradients, keeps)]
        stacks = []  # tuning replays the layer stacks that hold the blocks, layer by layer
        if self.config.tune:
            units = [s.unit.module for s in self.sets]
            stacks = stacks_holding(calibration.model, units, self.targets.architectures)
            _warn_untuned(self.sets, stacks)
        teachers = [dense_copies(stack) for stack in stacks]
        masks = {
            name: torch.ones(p.shape, dtype=torch.bool, device=p.device)
            for name, p in self.parameters.items()
        }
        for block_set, keep in zip(self.sets, keeps):
            block_set.keep_masks(keep.to(masks[block_set.matrices[0].name].device), masks)
        self.masks.set([masks[name] for name in self.masks.names], optimizer=None)
        for stack, teacher in zip(stacks, teachers):
            in_stack = {id(m) for m in stack.modules()}
            chosen = [(s, k) for s, k in zip(self.sets, keeps) if id(s.unit.module) in in_stack]
            tune(calibration, stack, teacher, [s for s, _ in chosen], [k for _, k in chosen])
        self.kept = keeps

    def gradients(self, calibration) -> list[torch.Tensor]:
        """Per set, each calibration batch's loss gradient of every group's mask: (batches, groups)."""
        rows: list[list[torch.Tensor]] = [[] for _ in self.sets]

        def read():
            for row, block_set in zip(rows, self.sets):
                row.append(block_set.mask_gradient().detach().float().cpu())

        consumers = [m.param for s in self.sets for m in s.matrices if m.member.side == "in"]
        calibration.gradient_passes(consumers, read, "mask-search: Fisher importance")
        return [torch.stack(row) for row in rows]

    def metrics(self) -> dict[str, float]:
        """``kept_heads`` and ``kept_neurons``: the fraction of each kind kept."""
        if self.kept is None:
            return {}
        result = {}
        for kind in KINDS:
            flags = [k for s, k in zip(self.sets, self.kept) if s.unit.kind == kind]
            if flags:
                result[f"kept_{kind}s"] = sum(int(f.sum()) for f in flags) / sum(f.numel() for f in flags)
        return result

    def compaction_plan(self) -> dict[str, torch.Tensor] | None:
        return self.keep_plan()


def _unit_sets(targets) -> list[BlockSet]:
    """The attention and feed-forward blocks in the targets, in model order; TargetError if there are none."""
    sets, errors = [], []
    for kind in KINDS:
        try:
            sets += build_block_sets(targets, kind, None, targets.architectures)
        except TargetError as exc:
            errors.append(str(exc))
    if not sets:
        raise TargetError(errors[0])
    # In the order their outputs are computed (attention before FFN), which tuning follows.
    order = {
        id(module): index for index, module in enumerate(m for t in targets.values() for m in t.modules())
    }
    return sorted(sets, key=lambda s: order[id(s.unit.consumers[0].module)])


def _warn_untuned(sets: list[BlockSet], stacks: list) -> None:
    """Say which blocks tuning cannot reach: it replays one layer of a recognized stack at a time, and a
    block outside one (T5's heads, a unit of a whole stack; a family with no stack adapter) keeps its unit
    scales."""
    inside = {id(module) for stack in stacks for layer in stack for module in layer.modules()}
    untuned = [s.name for s in sets if id(s.unit.module) not in inside]
    if untuned:
        logger.warning(
            "mask-search: %d blocks are not in a layer of a stack an architecture adapter recognizes, so "
            "tuning leaves them as the search chose them: %s",
            len(untuned),
            ", ".join(untuned),
        )


def _costs(block_set: BlockSet, cost: str, length: float) -> torch.Tensor:
    """Each group's cost: its weights, or its FLOPs per token (2 per weight; for heads, the attention too)."""
    unit = block_set.unit
    weights = sum(m.size * (m.module.weight.numel() // m.module.weight.shape[m.dim]) for m in unit.members)
    value = float(weights)
    if cost == "flops":
        value = 2.0 * weights
        if unit.kind == "head":  # scores and weighted sum: 2 x 2 x length x the group's head dimensions
            value += (
                4.0 * length * sum(c.size for c in unit.consumers)
            )  # in each layer (a T5 head spans many)
    return torch.full((unit.count,), value, dtype=torch.float64)


@hookimpl
def hfprune_register_strategies(register):
    register("mask-search", MaskSearchStrategy)
