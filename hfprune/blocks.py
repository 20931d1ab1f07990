"""Blocks as views: every group of weights is one slot of a reshaped view of its matrices.

Shared by the structured strategies (block-lasso's penalties, importance's ranking): the
engine's way of seeing heads, neurons, rows, columns and tiles as blocks.

A :class:`BlockSet` is the blocks that compete with each other: the heads of one attention
block, the neurons of one FFN, or the tiles of one matrix. Each of its matrices is seen
through a view whose group axes enumerate the blocks and whose other axes run over a
block's weights, so a norm over those axes gives every block's norm at once, and a
per-block factor broadcasts back over it. The hot path is one reduction and one in-place
multiply per matrix, whatever the number of blocks.

A matrix FSDP2 splits by rows is seen through the same view of its rows spread into a
whole-shaped zero matrix (:mod:`hfprune.integrations.sharding`): the reduction then gives this process's
part of each block's squared norm, one ``all_reduce`` a step sums the parts of all blocks,
and per-block factors are broadcast whole and cut to the local rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hfprune.architecture import ArchitectureAdapter, Member, Unit, find_units, refusal, weight_dim
from hfprune.errors import TargetError
from hfprune.integrations.peft_names import named_modules
from hfprune.integrations.sharding import Layout, layout_of, shard_group


class BlockedMatrix:
    """One parameter seen through a view whose group axes enumerate its blocks."""

    name: str
    param: nn.Parameter
    layout: Layout
    reduce_axes: tuple[int, ...]  # the view's axes that run over one block's weights

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the weight, its gradient or a mask, all shaped like the whole ``param``) with blocks as
        axes."""
        raise NotImplementedError

    def scale_shape(self, grid: torch.Size) -> tuple[int, ...]:
        """Shape that broadcasts a per-block tensor of shape ``grid`` over :meth:`view`."""
        raise NotImplementedError

    def norms_squared(self) -> torch.Tensor:
        """Each block's squared norm; of this process's rows only, when the parameter is sharded."""
        weight = self.layout.spread(self.layout.local(self.param))
        return torch.linalg.vector_norm(self.view(weight), dim=self.reduce_axes).square()

    def multiply(self, tensor: torch.Tensor, per_block: torch.Tensor) -> None:
        """``tensor`` (this process's part of the weight or its gradient) times its block's factor, in
        place."""
        if self.layout.sharded:
            tensor.mul_(self._per_weight(per_block))
        else:
            self.view(tensor).mul_(per_block.view(self.scale_shape(per_block.shape)))

    def add_scaled_weight(self, grad: torch.Tensor, per_block: torch.Tensor) -> None:
        """``grad += per_block[b] * W_b`` for every block b, in place, on this process's part."""
        weight = self.layout.local(self.param)
        if self.layout.sharded:
            grad.addcmul_(weight, self._per_weight(per_block))
        else:
            self.view(grad).addcmul_(self.view(weight), per_block.view(self.scale_shape(per_block.shape)))

    def _per_weight(self, per_block: torch.Tensor) -> torch.Tensor:
        """Each local weight's block value: broadcast over the whole shape, then cut to this process's
        rows."""
        whole = per_block.new_ones(self.param.shape)
        self.view(whole).mul_(per_block.view(self.scale_shape(per_block.shape)))
        return self.layout.rows(whole)


class GroupedMatrix(BlockedMatrix):
    """A unit's matrix: its slice of every group (head, neuron) on one axis, as the adapter's member says."""

    def __init__(self, name: str, member: Member, count: int):
        self.name, self.param, self.member, self.count = name, member.module.weight, member, count
        self.layout = layout_of(self.param)
        self.reduce_axes = tuple(axis for axis in range(self.param.dim() + 1) if axis != member.dim)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.member.blocked(tensor, self.count)

    def scale_shape(self, grid: torch.Size) -> tuple[int, ...]:
        shape = [1] * (self.param.dim() + 1)
        shape[self.member.dim] = grid[0]
        return tuple(shape)

    def mask_gradient(self) -> torch.Tensor | None:
        """``sum(W * dL/dW)`` over each group's slice: on a consumer (a head's output-projection columns, a
        neuron's
        down-projection column) the loss gradient of a mask multiplying the group's output, at mask 1; None
        without a gradient."""
        grad = self.param.grad
        if grad is None:
            return None
        return self.view(self.param.detach() * grad).sum(dim=self.reduce_axes)


class TiledMatrix(BlockedMatrix):
    """A matrix cut into (rows, cols) tiles, stated in nn.Linear orientation: a 4-D view (R, rows, C,
    cols)."""

    reduce_axes = (1, 3)

    def __init__(self, name: str, param: nn.Parameter, tile: tuple[int, int], out_dim: int):
        self.name, self.param, self.tile = name, param, tile
        self.layout = layout_of(param)
        self.out_dim = out_dim  # the weight axis of output features: 1 for Conv1D, which stores (in, out)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        rows, cols = self.tile
        matrix = tensor if self.out_dim == 0 else tensor.t()  # .t() is a view
        return matrix.unflatten(0, (matrix.shape[0] // rows, rows)).unflatten(
            2, (matrix.shape[1] // cols, cols)
        )

    def scale_shape(self, grid: torch.Size) -> tuple[int, ...]:
        return (grid[0], 1, grid[1], 1)


@dataclass(frozen=True)
class BlockSet:
    """Blocks that are measured and pruned together: one unit's groups, or one matrix's tiles."""

    name: str
    matrices: tuple[BlockedMatrix, ...]
    unit: Unit | None = field(default=None, compare=False)  # the head or neuron unit, for a set of one

    def mask_gradient(self) -> torch.Tensor | None:
        """Per group of a head or neuron set, the loss gradient of a mask on the group's output (at 1), summed
        over the
        matrices that consume it; None when they had no gradient this step. See
        :meth:`GroupedMatrix.mask_gradient`."""
        parts = [
            m.mask_gradient() for m in self.matrices if isinstance(m, GroupedMatrix) and m.member.side == "in"
        ]
        parts = [part for part in parts if part is not None]
        return torch.stack(parts).sum(0) if parts else None

    def kept_groups(self, keeps: dict[str, torch.Tensor]) -> torch.Tensor:
        """One flag per block: does any of its matrices' keep-masks (bool, whole, by parameter name) keep part
        of it?"""
        kept = None
        for matrix in self.matrices:
            flags = matrix.view(keeps[matrix.name]).any(dim=matrix.reduce_axes)
            kept = flags if kept is None else kept | flags
        return kept

    def norms(self) -> torch.Tensor:
        """Each block's L2 norm across all its matrices (shape: the block grid); see :func:`block_norms`."""
        return block_norms([self])[0]

    @torch.no_grad()
    def scale_weights(self, factor: torch.Tensor) -> None:
        """Multiply every block by its factor, in place."""
        for matrix in self.matrices:
            matrix.multiply(matrix.layout.local(matrix.param), factor)

    @torch.no_grad()
    def add_to_grads(self, coefficient: torch.Tensor) -> None:
        """``grad += coefficient_b * W_b`` for every block b (the penalty's gradient), in place."""
        for matrix in self.matrices:
            if matrix.param.grad is not None:
                matrix.add_scaled_weight(matrix.layout.local(matrix.param.grad), coefficient)

    def grid(self) -> torch.Size:
        """The shape of the set's per-block tensors (norms, keep vectors): its blocks, without reading a
        weight."""
        matrix = self.matrices[0]
        view = matrix.view(torch.empty(matrix.param.shape, device="meta"))
        return torch.Size(size for axis, size in enumerate(view.shape) if axis not in matrix.reduce_axes)

    def keep_masks(self, keep: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        """Write the per-block keep vector into each matrix's whole boolean mask (masks start all True)."""
        for matrix in self.matrices:
            matrix.view(masks[matrix.name]).logical_and_(keep.view(matrix.scale_shape(keep.shape)))


def planned_block_sparsity(
    sets: list[BlockSet], scope: str, ratio: float, kept_blocks: Callable[[int], int]
) -> float | None:
    """The fraction of the sets' weights a structured strategy masks at ``ratio``: what ``hfprune check``
    promises.

    ``scope: layer``: every set keeps ``kept_blocks(its block count)`` blocks (the strategy's
    own rounding), and every block of a set holds as many weights (heads and neurons split
    their matrices evenly, tiles divide them). ``scope: global``: one threshold over all the
    blocks decides which go, and a set left empty gets a block back, so the count depends on
    the weights: None (decided by training).
    """
    if scope == "global":
        return None
    pruned = total = 0
    for block_set in sets:
        blocks = block_set.grid().numel()
        size = sum(m.param.numel() for m in block_set.matrices)
        pruned += (blocks - kept_blocks(blocks)) * (size // blocks)
        total += size
    return pruned / max(total, 1)


@torch.no_grad()
def block_norms(sets: list[BlockSet]) -> list[torch.Tensor]:
    """Every set's block norms. Over matrices FSDP2 splits, the parts' squares are summed by one
    ``all_reduce`` for all sets."""
    split, held = [], []  # per set: squared norms summed over sharded matrices, and over whole ones
    for block_set in sets:
        squares = [(m.norms_squared(), m.layout.sharded) for m in block_set.matrices]
        split.append(sum(sq for sq, sharded in squares if sharded))
        held.append(sum(sq for sq, sharded in squares if not sharded))
    partial = [s for s in split if torch.is_tensor(s)]
    if partial:
        joined = torch.cat([p.flatten() for p in partial])
        dist.all_reduce(joined, group=shard_group([m.layout for s in sets for m in s.matrices]))
        sums = iter(joined.split([p.numel() for p in partial]))
        split = [next(sums).view_as(s) if torch.is_tensor(s) else s for s in split]
    return [(s + h).sqrt_() for s, h in zip(split, held)]


def build_block_sets(
    targets: dict[str, nn.Module],
    group: str,
    tile: tuple[int, int] | None,
    adapters: list[ArchitectureAdapter],
) -> list[BlockSet]:
    """The block sets for ``group`` ("tile", "row", "column", "head" or "neuron") in the matched modules."""
    if group in ("head", "neuron"):
        return list(_unit_sets(targets, group, adapters))
    return [_tile_set(name, module, group, tile) for name, module in targets.items() if _is_matrix(module)]


def _is_matrix(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2


def _unit_sets(
    targets: dict[str, nn.Module], kind: str, adapters: list[ArchitectureAdapter]
) -> Iterator[BlockSet]:
    seen: set[int] = set()
    for target_name, target in targets.items():
        found = [
            u for u in find_units(target, kind, adapters, prefix=target_name) if id(u.module) not in seen
        ]
        if not found and not any(id(m) in seen for m in target.modules()):
            reason = refusal(target, kind, adapters)
            if reason:
                raise TargetError(f"{target_name} ({type(target).__name__}): {reason}")
            known = ", ".join(a.name for a in adapters) or "none"
            raise TargetError(
                f"{target_name} ({type(target).__name__}) contains no "
                f"{'attention' if kind == 'head' else 'feed-forward'} block "
                f"an architecture adapter recognizes (installed adapters: {known}); target the layers or "
                "their "
                f"{'attention' if kind == 'head' else 'MLP'} modules, or install an adapter for this model"
            )
        for unit in found:
            seen.add(id(unit.module))
            names = {id(module): name for name, module in named_modules(unit.module, unit.name)}
            yield BlockSet(
                unit.name,
                tuple(GroupedMatrix(f"{names[id(m.module)]}.weight", m, unit.count) for m in unit.members),
                unit,
            )


def _tile_set(name: str, module: nn.Module, group: str, tile: tuple[int, int] | None) -> BlockSet:
    try:
        weight_dim(module, "in")  # a projection: an embedding table has no input features to tile
        out_dim = weight_dim(module, "out")
    except TypeError as exc:
        raise TargetError(f"{name}: {exc}") from None
    out_features, in_features = module.weight.shape[out_dim], module.weight.shape[1 - out_dim]
    rows, cols = {"row": (1, in_features), "column": (out_features, 1)}.get(group, tile)
    if out_features % rows or in_features % cols:
        raise TargetError(
            f"{name}: a {out_features}x{in_features} matrix cannot be tiled into {rows}x{cols} blocks"
        )
    return BlockSet(name, (TiledMatrix(f"{name}.weight", module.weight, (rows, cols), out_dim),))
