"""Mask tuning by least squares (Kwon et al. 2022, section 4.3): the kept heads and neurons are rescaled
so that each pruned block reproduces the dense block's output.

A block's output (before its bias) is the sum of its groups' contributions: a head's output
times its columns of the output projection, a neuron's activation times its column of the
down projection. Pruning drops some; a real scale ``m_g`` per kept group, fitted on the
calibration tokens, lets the rest stand in for them:

    minimize over m   sum over tokens || sum_g m_g * X_g W_g^T  -  T ||^2

where ``X`` is the block's consumer input in the pruned model (its layers below already
pruned and tuned), and ``T`` the dense model's block output on the dense model's own
input, so errors from below are corrected too. The normal equations need only
``X^T X`` and ``X^T T`` over the calibration tokens, and reduce to one small system per
block: ``G m = b`` with ``G[g, h] = sum over i in g, j in h of (X^T X)_ij (W^T W)_ij``.
The scales are folded into the consumer's columns, so the model keeps its shape and
compaction removes the pruned groups as before. As in the paper, scales outside
[-10, 10] mean the fit is not to be trusted, and tuning stops there: the blocks above keep
their unit scales.

The layers are run one at a time from the captured inputs of the layer stack
(:class:`hfprune.calibration.LayerReplay`): two layer-forwards per block and two per
layer, about three forward passes of the model in all.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from hfprune.architecture import Member
from hfprune.blocks import BlockSet

logger = logging.getLogger(__name__)
SCALE_LIMIT = 10.0


class BlockFit:
    """The normal equations of one block's scales, accumulated batch by batch."""

    def __init__(self, consumer: Member, kept: torch.Tensor, count: int):
        self.consumer, self.count = consumer, count
        self.kept = kept.nonzero().flatten()
        self.features = consumer.indices(self.kept.to(consumer.module.weight.device))
        self.xtx: torch.Tensor | None = None
        self.xtt: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        """The consumer's weight as (outputs, inputs), whatever its storage (Conv1D keeps it transposed)."""
        weight = self.consumer.module.weight.detach()
        return weight if self.consumer.dim == 1 else weight.t()

    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch: the pruned block's consumer inputs and the dense block's outputs, one row per token.

        Each batch's products are float32 matrix products (a float64 one is several times slower on a CPU
        and was most of the tuning's time); the sums over batches are kept in float64.
        """
        x = inputs[:, self.features].float()
        t = targets.float()
        xtx, xtt = (x.t() @ x).double(), (x.t() @ t).double()
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xtt = xtt if self.xtt is None else self.xtt + xtt

    def solve(self) -> torch.Tensor | None:
        """The kept groups' scales; None when the system has no trustworthy solution."""
        w = self.matrix()[:, self.features].double()  # (outputs, kept features)
        size = self.consumer.size
        groups = self.kept.numel()
        gram = (self.xtx * (w.t() @ w)).view(groups, size, groups, size).sum((1, 3))
        rhs = (self.xtt * w.t()).sum(1).view(groups, size).sum(1)
        scales = torch.linalg.lstsq(gram.cpu(), rhs.cpu().unsqueeze(1)).solution.flatten()
        if not torch.isfinite(scales).all() or scales.abs().max() > SCALE_LIMIT:
            return None
        return scales

    @torch.no_grad()
    def fold(self, scales: torch.Tensor) -> None:
        """Multiply each kept group's consumer slice by its scale."""
        weight, member = self.consumer.module.weight, self.consumer
        for group, scale in zip(self.kept.tolist(), scales.tolist()):
            weight.narrow(member.dim, member.offset + group * member.size, member.size).mul_(scale)


def tune(
    calibration,
    stack: nn.ModuleList,
    dense_layers: list[nn.Module],
    sets: list[BlockSet],
    keeps: list[torch.Tensor],
) -> int:
    """Fit and fold the scales of every set in ``stack``'s layers, lowest layer first; how many were tuned.

    ``dense_layers`` are copies of the layers made before pruning: the teacher.
    """
    layer_of = {id(module): index for index, layer in enumerate(stack) for module in layer.modules()}
    by_layer: dict[int, list[tuple[BlockSet, torch.Tensor]]] = {}
    for block_set, keep in zip(sets, keeps):
        by_layer.setdefault(layer_of[id(block_set.unit.module)], []).append((block_set, keep))
    replay = calibration.replay(stack)
    student = replay.inputs()
    teacher = list(student)
    tuned = 0
    layers = calibration.bar(list(zip(stack, dense_layers)), "mask-search: tuning layer by layer")
    for index, (layer, dense) in enumerate(layers):
        for block_set, keep in by_layer.get(index, []):
            fit = _fit(calibration, replay, layer, dense, block_set, keep, student, teacher)
            scales = fit.solve()
            if scales is None:
                logger.warning(
                    "mask tuning stopped at %s: its least-squares scales are not finite or beyond +-%g; "
                    "it and the blocks above keep their unit scales",
                    block_set.name,
                    SCALE_LIMIT,
                )
                return tuned
            fit.fold(scales)
            tuned += 1
        if index + 1 < len(stack) and any(i > index for i in by_layer):
            student, teacher = replay.run(layer, student), replay.run(dense, teacher)
    return tuned


def _fit(calibration, replay, layer, dense, block_set: BlockSet, keep, student, teacher) -> BlockFit:
    """The normal equations of ``block_set``'s scales over every calibration batch."""
    consumers = block_set.unit.consumers
    if len(consumers) != 1:
        raise ValueError(f"{block_set.name}: mask tuning needs one consuming matrix, it has {len(consumers)}")
    (consumer,) = consumers
    name = {id(module): name for name, module in layer.named_modules()}[id(consumer.module)]
    dense_consumer = dense.get_submodule(name)
    fit = BlockFit(consumer, keep, block_set.unit.count)
    seen: dict[str, torch.Tensor] = {}

    def inputs(module, args):
        seen["inputs"] = calibration.select_rows(args[0])

    def outputs(module, args, output):
        bias = getattr(module, "bias", None)
        seen["targets"] = calibration.select_rows(output if bias is None else output - bias)

    handles = [
        consumer.module.register_forward_pre_hook(inputs),
        dense_consumer.register_forward_hook(outputs),
    ]
    try:
        for batch in range(len(replay.calls)):
            replay.call(dense, batch, teacher[batch], stop_after=dense_consumer)
            replay.call(layer, batch, student[batch], stop_after=consumer.module)
            fit.add(seen.pop("inputs"), seen.pop("targets"))
    finally:
        for handle in handles:
            handle.remove()
    return fit


def dense_copies(stack: nn.ModuleList) -> list[nn.Module]:
    """Copies of the stack's layers as they are now: the teacher tuning fits to."""
    return [copy.deepcopy(layer) for layer in stack]
