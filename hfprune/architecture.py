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

from hfprune.errors import CompactionError
from hfprune.integrations.peft_names import is_adapter_layer, named_modules

Side = Literal["out", "in"]  # "out": the matrix produces the group's activations; "in": it consumes them
UnitKind = Literal["head", "neuron"]
Prunable = Literal[
    "layer", "head", "neuron"
]  # what a family may refuse to prune (ArchitectureAdapter.refusal)
PER_LAYER_CONFIG = ("layer_types",)  # config lists with one entry per layer, shortened with the stack


def weight_dim(module: nn.Module, side: Side) -> int:
    """The axis of ``module.weight`` that runs over its outputs or inputs (Conv1D stores it transposed).

    An ``nn.Embedding`` has outputs only, one per column: T5's position-bias table holds one
    column per head, which a head unit slices with its projections.
    """
    from transformers.pytorch_utils import Conv1D  # here, not at import: the plugin registry must stay light

    if isinstance(module, nn.Linear):
        return 0 if side == "out" else 1
    if isinstance(module, Conv1D):
        return 1 if side == "out" else 0
    if isinstance(module, nn.Embedding) and side == "out":
        return 1
    raise TypeError(
        f"{type(module).__name__}, {side} side: adapters describe nn.Linear and Conv1D weights and "
        "nn.Embedding outputs only"
    )


def features(module: nn.Module, side: Side) -> int:
    """How many outputs or inputs a projection has."""
    return module.weight.shape[weight_dim(module, side)]


@dataclass(frozen=True)
class Member:
    """One matrix's share of a unit: group ``g`` owns ``[offset + g*size, offset + (g+1)*size)`` along
    ``side``."""

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
        """One flag per group (on the CPU): does ``tensor`` (a weight or a keep-mask) hold anything non-zero
        in it?"""
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
    uniform sizes, or that it cannot; :meth:`delete_layers` removes layers from the stacks it
    recognizes (residual stacks by default); :meth:`refusal` explains a family whose layers, heads
    or neurons cannot be pruned.
    """

    name: str = ""

    def attention(self, module: nn.Module) -> Unit | None:
        """The head unit ``module`` is, or None."""
        return None

    def feed_forward(self, module: nn.Module) -> Unit | None:
        """The neuron unit ``module`` is, or None."""
        return None

    def layer_stack(self, module: nn.Module) -> nn.ModuleList | None:
        """The residual layer stack ``module`` holds as a direct attribute (BERT's encoder: ``layer``), or
        None."""
        return None

    def refusal(self, module: nn.Module, kind: Prunable) -> str | None:
        """Why ``module``'s layers, heads or neurons cannot be pruned in this family (ALBERT's one layer
        serves every position), or None. A strategy that finds no stack or unit shows it in its error."""
        return None

    def resize(self, unit: Unit, kept_groups: int) -> None:
        """Update attributes (head counts, split sizes) after the unit's matrices lost groups."""

    def config_updates(self, config, kind: UnitKind, unit: Unit, kept_groups: int) -> dict | None:
        """Config fields that give every layer ``kept_groups`` groups of ``kind``; None if the config cannot
        say it. ``config`` is the one that sizes the unit (:func:`config_of`: in a multimodal model, the
        ``text_config`` or ``vision_config`` of its part)."""
        return None

    def delete_layers(self, model: nn.Module, stacks: dict[str, torch.Tensor]) -> list[int] | None:
        """Delete, in place, the layers ``stacks`` flags False (one bool per layer, by stack module name).

        Returns the indices of the original model's ``hidden_states`` the smaller model still
        has, or None when no layer went. The default suits residual stacks, where a deleted
        layer is the identity: :func:`delete_residual_layers`. A family whose layers read
        other layers' outputs (a densely connected stack) overrides it.
        """
        return delete_residual_layers(model, stacks)


def layer(parent: nn.Module | None, name: str) -> nn.Module | None:
    """``parent.<name>``, or None; for a layer peft wrapped, the layer it wraps.

    Adapters fetch matrices with it, so a unit holds the layers whose weights are pruned
    (a LoRA-wrapped layer's base weight), in a plain model and in a PeftModel alike.
    """
    module = getattr(parent, name, None)
    return module.get_base_layer() if module is not None and is_adapter_layer(module) else module


def refusal(root: nn.Module, kind: Prunable, adapters: list[ArchitectureAdapter]) -> str | None:
    """The first reason an adapter gives why ``kind`` cannot be pruned in ``root`` or below, or None."""
    for module in root.modules():
        for adapter in adapters:
            reason = adapter.refusal(module, kind)
            if reason:
                return reason
    return None


def unit_of(module: nn.Module, kind: UnitKind, adapters: list[ArchitectureAdapter]) -> Unit | None:
    """What the first adapter that recognizes ``module`` makes of it."""
    for adapter in adapters:
        unit = adapter.attention(module) if kind == "head" else adapter.feed_forward(module)
        if unit is not None:
            return unit
    return None


def find_units(
    root: nn.Module, kind: UnitKind, adapters: list[ArchitectureAdapter], prefix: str = ""
) -> Iterator[Unit]:
    """Every unit of ``kind`` in ``root`` and below, in module order, named by qualified name."""
    for name, module in named_modules(root, prefix):
        unit = unit_of(module, kind, adapters)
        if unit is not None:
            yield replace(unit, name=name)


def find_layer_stacks(root: nn.Module, adapters: list[ArchitectureAdapter]) -> list[nn.ModuleList]:
    """The layer stacks adapters recognize in ``root`` and below (``root`` itself if it is one), in module
    order."""
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


def stacks_holding(root: nn.Module, modules, adapters: list[ArchitectureAdapter]) -> list[nn.ModuleList]:
    """The layer stacks in ``root`` (:func:`find_layer_stacks`) that hold any of ``modules``: those a strategy
    working a layer at a time walks."""
    wanted = {id(module) for module in modules}
    return [
        stack for stack in find_layer_stacks(root, adapters) if any(id(m) in wanted for m in stack.modules())
    ]


def config_of(model: nn.Module, name: str):
    """The config that states the sizes of ``model``'s module ``name``: that of the innermost sub-model
    holding it whose config ``model.config`` nests (a multimodal model's ``text_config`` and
    ``vision_config``), else ``model.config`` (None without one).

    Only a nested config is saved with the model: a sub-model built from a copy (T5's
    encoder and decoder stacks) is sized by the model's own config.
    """
    top = getattr(model, "config", None)
    values = vars(top).values() if top is not None else ()
    nested = {id(value) for value in values if hasattr(value, "to_dict")}  # the sub-configs
    parts = name.split(".") if name else []
    for end in range(len(parts), 0, -1):
        config = getattr(model.get_submodule(".".join(parts[:end])), "config", None)
        if config is not None and id(config) in nested:
            return config
    return top


def delete_residual_layers(model: nn.Module, stacks: dict[str, torch.Tensor]) -> list[int] | None:
    """Delete, in place, the layers of a residual stack whose keep flag is False; the hidden-state indices
    left.

    None when every layer stays.

    Only the stack of the model's text, whose hidden states the model returns, can shrink:
    its length is ``num_hidden_layers`` (``n_layer``, ``n_layers`` through the config's
    aliases) of the model's config, or of the ``text_config`` it nests for a multimodal
    model's language model (:func:`config_of`); that is updated, together with per-layer
    config lists such as ``layer_types``. Layers that index a cache by position
    (``layer_idx``) are renumbered.
    """
    if len(stacks) > 1:
        raise CompactionError(
            f"layers can be deleted from one stack per model; the plan names {len(stacks)}: "
            f"{', '.join(stacks)}"
        )
    ((name, keep),) = stacks.items()
    stack = model.get_submodule(name)
    depth = len(stack)
    if keep.shape != (depth,) or not keep.any():
        raise CompactionError(
            f"the layer plan for {name} must keep at least one of its {depth} layers, got {keep.tolist()}"
        )
    config = config_of(model, name)
    text_config = model.config.get_text_config() if hasattr(model, "config") else None
    if config is not text_config:
        raise CompactionError(
            f"{name} is sized by a config of its own ({type(config).__name__}), not by the config of the "
            "text the model returns hidden states of: only the language model's layers are deleted"
        )
    if getattr(text_config, "is_encoder_decoder", False):
        raise CompactionError(
            f"{name}: an encoder-decoder sizes its encoder and decoder stacks with config fields of their "
            "own, and num_hidden_layers names only one of them: its layers cannot be deleted"
        )
    if config is None or getattr(config, "num_hidden_layers", None) != depth:
        raise CompactionError(
            f"{name} has {depth} layers, but the model's config states "
            f"{getattr(config, 'num_hidden_layers', None)} "
            "(num_hidden_layers): only the stack the config describes can lose layers and still load"
        )
    if keep.all():
        return None
    kept = keep.nonzero().flatten().tolist()
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and kept != list(range(len(kept))):
        raise CompactionError(
            "this model scales attention by 1 / (layer position + 1) (scale_attn_by_inverse_layer_idx): a "
            "layer that moves "
            "down would be scaled differently once the smaller model is loaded; only the top layers can be "
            "deleted"
        )
    for index in reversed(range(depth)):
        if index not in kept:
            del stack[index]
    for position, layer in enumerate(stack):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config.num_hidden_layers = len(kept)
    for field_name in PER_LAYER_CONFIG:
        values = getattr(config, field_name, None)
        if isinstance(values, list) and len(values) == depth:
            setattr(config, field_name, [values[i] for i in kept])
    # The last hidden state may be taken after a final norm (GPT-2, Llama): it stays the last one.
    return [0] + [i + 1 for i in kept[:-1]] + [depth]


def stack_owner(
    model: nn.Module, stack_name: str, adapters: list[ArchitectureAdapter]
) -> ArchitectureAdapter | None:
    """The first adapter that recognizes the layer stack ``stack_name`` of ``model`` (as its parent's stack),
    or None."""
    parent_name, _, _ = stack_name.rpartition(".")
    stack, parent = model.get_submodule(stack_name), model.get_submodule(parent_name)
    return next((adapter for adapter in adapters if adapter.layer_stack(parent) is stack), None)
