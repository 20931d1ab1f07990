"""Where a transformer keeps its attention heads and FFN neurons: the types adapters return.

A *unit* is one attention block or one feed-forward block. Its *groups* (heads, or
key/value groups under grouped-query attention; neurons) each own a contiguous slice of
several matrices: the rows that produce the group's activations and the columns of the
projection that consumes them. Strategies penalize a group as one block across all its
matrices; compaction removes a group by slicing every one of them.

Architecture knowledge lives in :class:`ArchitectureAdapter` subclasses, registered by
plugins through ``hfprune_register_architectures``; nothing here names a model family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import torch
from torch import nn

from hfprune.peft_names import is_adapter_layer, named_modules

Side = Literal["out", "in"]  # "out": the matrix produces the group's activations; "in": it consumes them
UnitKind = Literal["head", "neuron"]


def weight_dim(module: nn.Module, side: Side) -> int:
    """The axis of ``module.weight`` that runs over its outputs or inputs (Conv1D stores it transposed)."""
    from transformers.pytorch_utils import Conv1D  # here, not at import: the plugin registry must stay light

    if isinstance(module, nn.Linear):
        return 0 if side == "out" else 1
    if isinstance(module, Conv1D):
        return 1 if side == "out" else 0
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor Conv1D; adapters describe only those")


def features(module: nn.Module, side: Side) -> int:
    """How many outputs or inputs a projection has."""
    return module.weight.shape[weight_dim(module, side)]


@dataclass(frozen=True)
class Member:
    """One matrix's share of a unit: group ``g`` owns ``[offset + g*size, offset + (g+1)*size)`` along ``side``."""

    module: nn.Module
    side: Side
    offset: int
    size: int

    @cached_property
    def dim(self) -> int:
        # Cached: the step hooks read it for every matrix on every step.
        return weight_dim(self.module, self.side)

    def blocked(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """``tensor`` (the weight, its gradient or a mask) viewed with the groups on axis ``dim``."""
        return tensor.narrow(self.dim, self.offset, count * self.size).unflatten(self.dim, (count, self.size))

    def nonzero_groups(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """One flag per group (on the CPU): does ``tensor`` (a weight or a keep-mask) hold anything non-zero in it?"""
        return self.blocked(tensor, count).movedim(self.dim, 0).reshape(count, -1).any(dim=1).cpu()

    def indices(self, groups: torch.Tensor) -> torch.Tensor:
        """The weight indices along ``dim`` owned by ``groups`` (a 1-D tensor of group numbers)."""
        within = torch.arange(self.size, device=groups.device)
        return (self.offset + groups[:, None] * self.size + within).flatten()


@dataclass(frozen=True)
class Unit:
    """One attention or feed-forward block, as an adapter sees it.

    ``count`` groups, each spread over ``members``. For heads, ``heads_per_group`` query
    heads share one group (grouped-query attention keeps key/value heads whole). For
    neurons, ``activation`` and ``gated`` say what a neuron outputs when the rows that
    produce it are zero, so compaction can fold that constant into the output bias.
    """

    kind: UnitKind
    module: nn.Module
    count: int
    members: tuple[Member, ...]
    adapter: ArchitectureAdapter
    heads_per_group: int = 1
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    gated: bool = False
    name: str = field(default="", compare=False)

    @property
    def consumers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.side == "in")

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.side == "out")


class ArchitectureAdapter:
    """Knows one family's modules: which are attention and FFN units and layer stacks, and how to shrink them.

    Subclasses implement :meth:`attention`, :meth:`feed_forward` and :meth:`layer_stack` by
    recognizing a module's structure (attribute names), so every model built from the same
    blocks is covered; :meth:`resize` updates the bookkeeping attributes a forward pass reads after
    compaction has sliced the matrices; :meth:`config_updates` says how a config states
    uniform sizes, or that it cannot.
    """

    name: str = ""

    def attention(self, module: nn.Module) -> Unit | None:
        """The head unit ``module`` is, or None."""
        return None

    def feed_forward(self, module: nn.Module) -> Unit | None:
        """The neuron unit ``module`` is, or None."""
        return None

    def layer_stack(self, module: nn.Module) -> nn.ModuleList | None:
        """The residual layer stack ``module`` holds as a direct attribute (BERT's encoder: ``layer``), or None."""
        return None

    def resize(self, unit: Unit, kept_groups: int) -> None:
        """Update attributes (head counts, split sizes) after the unit's matrices lost groups."""

    def config_updates(self, config, kind: UnitKind, unit: Unit, kept_groups: int) -> dict | None:
        """Config fields that give every layer ``kept_groups`` groups of ``kind``; None if the config cannot say it."""
        return None


def layer(parent: nn.Module | None, name: str) -> nn.Module | None:
    """``parent.<name>``, or None; for a layer peft wrapped, the layer it wraps.

    Adapters fetch matrices with it, so a unit holds the layers whose weights are pruned
    (a LoRA-wrapped layer's base weight), in a plain model and in a PeftModel alike.
    """
    module = getattr(parent, name, None)
    return module.get_base_layer() if module is not None and is_adapter_layer(module) else module


def unit_of(module: nn.Module, kind: UnitKind, adapters: list[ArchitectureAdapter]) -> Unit | None:
    """What the first adapter that recognizes ``module`` makes of it."""
    for adapter in adapters:
        unit = adapter.attention(module) if kind == "head" else adapter.feed_forward(module)
        if unit is not None:
            return unit
    return None


def find_units(root: nn.Module, kind: UnitKind, adapters: list[ArchitectureAdapter], prefix: str = "") -> Iterator[Unit]:
    """Every unit of ``kind`` in ``root`` and below, in module order, named by qualified name."""
    for name, module in named_modules(root, prefix):
        unit = unit_of(module, kind, adapters)
        if unit is not None:
            yield replace(unit, name=name)


def find_layer_stacks(root: nn.Module, adapters: list[ArchitectureAdapter]) -> list[nn.ModuleList]:
    """The layer stacks adapters recognize in ``root`` and below (``root`` itself if it is one), in module order."""
    if isinstance(root, nn.ModuleList):
        return [root]
    stacks: dict[int, nn.ModuleList] = {}
    for module in root.modules():
        for adapter in adapters:
            stack = adapter.layer_stack(module)
            if stack is not None:
                stacks.setdefault(id(stack), stack)
                break
    return list(stacks.values())


def installed_adapters() -> list[ArchitectureAdapter]:
    """The adapters plugins registered, in load order."""
    from hfprune.plugins import default_registry

    return default_registry().architectures
