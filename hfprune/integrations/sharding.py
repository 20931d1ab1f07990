"""How a parameter lies across processes, and the few collectives that make whole-matrix pruning work on
pieces.

Every strategy thinks in whole parameters: a magnitude threshold over a matrix, a group
norm over a head's rows and columns, a mask the size of the weight. Under DDP each process
holds every parameter whole, so that is what it computes on. Under FSDP2 (``fully_shard``)
a parameter is a DTensor whose rows are dealt out to the processes of a 1-D mesh: each
holds rows ``[start, stop)`` and updates only those. A :class:`Layout` says which of the
two a parameter is and gives both cases one vocabulary:

- :meth:`Layout.local` is what this process holds and steps (masks, alphas and proximal
  steps apply to it elementwise, so those need no communication);
- :meth:`Layout.spread` places the local rows in a zero matrix of the whole shape, so a
  reduction over any block shape (heads, neurons, tiles) gives this process's part of
  every block's sum, and one ``all_reduce(SUM)`` gives the whole sums;
- :meth:`Layout.rows` cuts this process's rows out of something computed whole (a mask
  built from whole block norms); :meth:`Layout.gather` assembles a whole tensor (saved
  state, compaction plans) and is collective;
- :func:`kth_smallest_of_parts` finds a magnitude threshold over pieces exactly, by bisection on
  the float's bits with one ``all_reduce`` of a count per bit, never gathering the weights;
- :func:`unsharded_copy` gives compaction a plain model from the gathered full state dict.

Other splits (FSDP1 flat parameters, DeepSpeed ZeRO-3, DTensors on 2-D meshes or sharded
on another axis) are refused by :func:`layout_of`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hfprune.errors import CompactionError
from hfprune.model_hooks import carry_model_hooks


class UnsupportedSharding(ValueError):
    """A parameter is split across processes in a way hfprune does not prune."""


class Layout:
    """A parameter every process holds whole (no FSDP, or DDP): every method is the identity."""

    sharded = False

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """What this process holds of ``tensor`` (the parameter, its gradient, optimizer state): a view it may
        write."""
        return tensor

    def whole_shape(self, local: torch.Tensor) -> torch.Size:
        return local.shape

    def spread(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` in place in a whole-shaped tensor that is zero elsewhere (for partial block sums)."""
        return local

    def rows(self, whole: torch.Tensor) -> torch.Tensor:
        """This process's part of a whole-shaped tensor."""
        return whole

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every process's part; collective when sharded: every process must call it."""
        return local


WHOLE = Layout()


@dataclass(frozen=True)
class RowShard(Layout):
    """Rows ``[start, stop)`` of a parameter of ``shape``, split along dim 0 over ``group`` (FSDP2's
    layout)."""

    shape: torch.Size
    start: int
    stop: int
    group: dist.ProcessGroup

    sharded = True

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if _is_dtensor(tensor) else tensor

    def whole_shape(self, local: torch.Tensor) -> torch.Size:
        return self.shape

    def spread(self, local: torch.Tensor) -> torch.Tensor:
        whole = local.new_zeros(self.shape)
        whole[self.start : self.stop] = local
        return whole

    def rows(self, whole: torch.Tensor) -> torch.Tensor:
        return whole[self.start : self.stop]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        # The parts do not overlap, so summing zero-padded parts assembles the whole; bool has no SUM in gloo.
        whole = self.spread(local.to(torch.uint8) if local.dtype == torch.bool else local)
        dist.all_reduce(whole, group=self.group)
        return whole.bool() if local.dtype == torch.bool else whole


def layout_of(param: nn.Parameter) -> Layout:
    """How ``param`` lies across processes; UnsupportedSharding says why when hfprune cannot prune it."""
    if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 marks the parameters it partitions
        raise UnsupportedSharding("partitioned by DeepSpeed ZeRO-3")
    if getattr(param, "_is_flat_param", False):  # FSDP1 flattens a module's parameters into one
        raise UnsupportedSharding("an FSDP1 flat parameter")
    if not _is_dtensor(param):
        return WHOLE
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or placements[0] not in (Shard(0), Replicate()):
        raise UnsupportedSharding(
            f"a DTensor placed {placements} on a {mesh.ndim}-D mesh (hfprune prunes FSDP2's 1-D row "
            "sharding, Shard(0))"
        )
    if placements[0] == Replicate():
        return WHOLE
    local_rows = param.to_local().shape[0]
    chunk = -(-param.shape[0] // mesh.size())  # torch.chunk's rule, which FSDP2 follows
    start = min(mesh.get_local_rank() * chunk, param.shape[0])
    if local_rows != min(chunk, param.shape[0] - start):
        raise UnsupportedSharding(
            f"a DTensor whose {local_rows} local rows are not torch.chunk's share of {param.shape[0]}"
        )
    return RowShard(param.shape, start, start + local_rows, mesh.get_group())


def shard_group(layouts: list[Layout]) -> dist.ProcessGroup | None:
    """The one process group the sharded layouts split over, None when none is sharded."""
    groups = {id(layout.group): layout.group for layout in layouts if layout.sharded}
    if len(groups) > 1:
        raise UnsupportedSharding(
            "split over different process groups (one FSDP2 mesh per recipe is supported)"
        )
    return next(iter(groups.values()), None)


def sum_parts(parts: list[torch.Tensor], layouts: list[Layout]) -> torch.Tensor:
    """``sum(parts)``, where a sharded layout's part is this process's share: one ``all_reduce`` for all of
    them."""
    sharded = [part for part, layout in zip(parts, layouts, strict=True) if layout.sharded]
    whole = [part for part, layout in zip(parts, layouts) if not layout.sharded]
    total = torch.stack(sharded).sum(0) if sharded else None
    if total is not None:
        dist.all_reduce(total, group=shard_group(layouts))
    if whole:
        total = torch.stack(whole).sum(0) + (0 if total is None else total)
    return total


def count_zeros(params: list[nn.Parameter], layouts: list[Layout]) -> int:
    """How many of the (whole) parameters' weights are exactly zero."""
    if not params:
        return 0
    return int(
        sum_parts([(layout.local(p.detach()) == 0).sum() for p, layout in zip(params, layouts)], layouts)
    )


@torch.no_grad()
def kth_smallest_of_parts(magnitudes: list[torch.Tensor], layouts: list[Layout], k: int) -> torch.Tensor:
    """The k-th smallest value (k >= 1) of the whole tensors whose local parts are ``magnitudes`` (float, >=
    0).

    Without sharding it is ``kthvalue``. With it, non-negative floats order like their bit
    patterns read as integers, so a bisection over the bits, counting on every process the
    values at or below the midpoint and summing the counts, finds the exact value in at most
    32 rounds: no process ever holds more than its own weights. Below every value when
    ``k == 0``, so nothing is pruned.
    """
    if k <= 0:
        return magnitudes[0].new_tensor(-1.0)
    if not any(layout.sharded for layout in layouts):
        values = (
            magnitudes[0].flatten() if len(magnitudes) == 1 else torch.cat([m.flatten() for m in magnitudes])
        )
        return values.kthvalue(k).values
    bits = [m.float().view(torch.int32) for m in magnitudes]
    low, high = 0, int(max_of_parts(bits, layouts))
    while low < high:  # the smallest bit pattern b with count(values <= b) >= k
        middle = (low + high) // 2
        if int(sum_parts([(b <= middle).sum() for b in bits], layouts)) >= k:
            high = middle
        else:
            low = middle + 1
    return torch.tensor([low], dtype=torch.int32).view(torch.float32)[0].to(magnitudes[0].dtype)


def max_of_parts(values: list[torch.Tensor], layouts: list[Layout]) -> torch.Tensor:
    """The largest value over all processes' parts, which are >= 0 (a process may hold no rows of a small
    matrix)."""
    largest = torch.stack([v.max() if v.numel() else v.new_zeros(()) for v in values]).max()
    group = shard_group(layouts)
    if group is not None:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    return largest


def plain_class(module: nn.Module) -> type:
    """``module``'s class as its model defines it: FSDP2's ``fully_shard`` swaps in a subclass named
    ``FSDP<name>``."""
    if "torch.distributed.fsdp" in sys.modules:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module, FSDPModule):
            return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    return type(module)


def fsdp1_wrapped(model: nn.Module) -> str | None:
    """The name of the first module in ``model`` that FSDP1 (``FullyShardedDataParallel``) wraps (``""``: the
    model itself), or None.

    FSDP1 flattens each wrapped module's parameters into one 1-D buffer and shards that, so no
    parameter keeps its matrix shape or its name: nothing hfprune could prune.
    """
    if "torch.distributed.fsdp" not in sys.modules:  # nothing wrapped a module without importing it
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return next((name for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)), None)


def _is_dtensor(tensor) -> bool:
    if "torch.distributed.tensor" not in sys.modules:  # nothing made a DTensor without importing it
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any of ``model``'s parameters is a DTensor (FSDP2)."""
    return any(_is_dtensor(p) for p in model.parameters())


def unsharded_copy(model: nn.Module) -> nn.Module:
    """A plain copy of an FSDP2 model with its hfprune hooks, built from its config and full state dict;
    collective.

    Every process gets the whole copy. A deep copy would carry FSDP2's sharded parameters
    and hooks along, so the copy is a new model of the class ``fully_shard`` derived from.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    config = getattr(model, "config", None)
    if config is None:
        raise CompactionError(
            f"{type(model).__name__} is sharded by FSDP2 and has no config to build an unsharded copy from: "
            "save its full "
            "state dict, load it into an unsharded model, and compact that"
        )
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = plain_class(model)(config)
    plain.load_state_dict(state)
    plain.train(model.training)
    carry_model_hooks(model, plain)
    return plain
