"""What is left of a model: its layers, live heads and neurons, and how many weights are exactly zero.

One JSON-able description shared by ``hfprune report`` (any saved model folder), the main
job's report and its picture (:func:`hfprune.cli.plot.plot_pruning`). Layer stacks, heads and
neurons are found through the installed architecture adapters: they are the units
compaction removes, so "live" means "what compaction would keep". A head (a key/value group
under grouped-query attention, counted as its query heads) is live unless its
output-projection columns are all exactly zero; a neuron is live unless its down-projection
column is all zero or every row producing it is (it then outputs a constant, which
compaction folds into a bias). Models no adapter knows still get totals and per-matrix
sparsity, which is all unstructured pruning changes anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hfprune.architecture import (
    ArchitectureAdapter,
    Member,
    Unit,
    UnitKind,
    config_of,
    find_layer_stacks,
    find_units,
)
from hfprune.compaction.compact import LAYOUT_KEY

DIGITS = 4  # fractions are rounded so report.json stays readable


def model_structure(
    model: nn.Module,
    adapters: list[ArchitectureAdapter],
    layer_keep: Mapping[str, Sequence[bool] | torch.Tensor] | None = None,
) -> dict:
    """A JSON-able description of ``model`` as it is now, its layers, heads and neurons found by ``adapters``.

    ``layer_keep`` maps a layer stack's module name to one keep flag per layer, the form a
    layer-lasso compaction plan has: a layer whose gate is 0 still has non-zero weights, so
    only the caller can say it is deleted (``"kept": False``). A stack named there is
    reported even when no adapter recognizes it.

    Keys: ``model`` (class name), ``model_type``, ``parameters``, ``zero_parameters``
    (exactly zero, biases included), ``sparsity`` (their ratio), ``hfprune_layout`` (the
    per-block sizes a compacted config records, or None), ``stacks`` (per layer stack its
    ``name`` and ``layers``: ``index``, ``name``, ``kept``, ``heads`` and ``neurons`` as
    ``{"live": n, "of": total}`` or None where the layer has none, ``parameters`` and
    ``sparsity`` of its weight matrices) and ``matrices`` (every parameter with two or more
    dimensions: ``name``, ``shape``, ``sparsity``). ``of`` is what the config states
    (``num_attention_heads``; the FFN width under the field the adapter writes, such as
    ``intermediate_size``): a compacted model whose sizes fit a stock config states its kept
    sizes there, so there ``of`` equals what is kept; under ``hfprune_layout`` the stock
    fields keep the original sizes.
    """
    config = getattr(model, "config", None)
    zeros = {id(p): int((p.detach() == 0).sum()) for p in model.parameters()}
    total = sum(p.numel() for p in model.parameters())
    zero_total = sum(zeros.values())
    return {
        "model": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": total,
        "zero_parameters": zero_total,
        "sparsity": round(zero_total / total, DIGITS) if total else 0.0,
        "hfprune_layout": getattr(config, LAYOUT_KEY, None),
        "stacks": [
            {
                "name": name,
                "layers": [
                    _layer(
                        f"{name}.{i}" if name else str(i),
                        i,
                        layer,
                        keep[i],
                        zeros,
                        config_of(model, name),  # a multimodal model's part has its own
                        adapters,
                    )
                    for i, layer in enumerate(stack)
                ],
            }
            for name, stack, keep in _stacks(model, layer_keep or {}, adapters)
        ],
        "matrices": [
            {"name": name, "shape": list(p.shape), "sparsity": round(zeros[id(p)] / p.numel(), DIGITS)}
            for name, p in model.named_parameters()
            if p.dim() >= 2
        ],
    }


def _stacks(
    model: nn.Module,
    layer_keep: Mapping[str, Sequence[bool] | torch.Tensor],
    adapters: list[ArchitectureAdapter],
) -> list[tuple[str, nn.ModuleList, list[bool]]]:
    """(name, stack, keep flags) for the stacks adapters find and those ``layer_keep`` names, in module
    order."""
    names = {id(module): name for name, module in model.named_modules()}
    stacks = {names[id(stack)]: stack for stack in find_layer_stacks(model, adapters)}
    for name, flags in layer_keep.items():
        stack = model.get_submodule(name) if name else model
        if not isinstance(stack, nn.ModuleList) or len(stack) != len(flags):
            found = (
                f"a ModuleList of {len(stack)} layers"
                if isinstance(stack, nn.ModuleList)
                else type(stack).__name__
            )
            raise ValueError(f"layer_keep[{name!r}] has {len(flags)} flags, but {name!r} is {found}")
        stacks[name] = stack
    position = {name: i for i, name in enumerate(names.values())}
    return [
        (name, stacks[name], [bool(k) for k in layer_keep.get(name, [True] * len(stacks[name]))])
        for name in sorted(stacks, key=position.__getitem__)
    ]


def _layer(
    name: str,
    index: int,
    layer: nn.Module,
    kept: bool,
    zeros: dict[int, int],
    config,
    adapters: list[ArchitectureAdapter],
) -> dict:
    weights = [p for p in layer.parameters() if p.dim() >= 2]
    numel = sum(p.numel() for p in weights)
    return {
        "index": index,
        "name": name,
        "kept": kept,
        "heads": _groups(layer, "head", config, adapters),
        "neurons": _groups(layer, "neuron", config, adapters),
        "parameters": sum(p.numel() for p in layer.parameters()),
        "sparsity": round(sum(zeros[id(p)] for p in weights) / numel, DIGITS) if numel else 0.0,
    }


def _groups(layer: nn.Module, kind: UnitKind, config, adapters: list[ArchitectureAdapter]) -> dict | None:
    """Live heads or neurons in ``layer`` and how many its config states, summed over its units; None if it
    has none."""
    units = list(find_units(layer, kind, adapters))
    if not units:
        return None
    references = [_reference(unit, config) for unit in units]
    return {
        "live": sum(int(_live(unit).sum()) * unit.heads_per_group for unit in units),
        "of": None if None in references else sum(references),
    }


def _live(unit: Unit) -> torch.Tensor:
    """One flag per group: False when compaction would remove it (see the module docstring)."""

    def all_zero(members: tuple[Member, ...]) -> torch.Tensor:
        result = torch.ones(unit.count, dtype=torch.bool)
        for member in members:
            result &= ~member.nonzero_groups(member.module.weight.detach(), unit.count)
        return result

    silent = all_zero(unit.consumers)
    if unit.kind == "neuron":
        silent |= all_zero(unit.producers)
    return ~silent


def _reference(unit: Unit, config) -> int | None:
    """How many heads (query heads) or neurons the config says ``unit`` has.

    Heads: ``num_attention_heads`` (GPT-2's ``n_head`` and DistilBERT's ``n_heads`` are
    aliases of it). Neurons: the field the adapter's ``config_updates`` writes, so each family's
    name for the FFN width (``intermediate_size``, ``hidden_dim``, ``n_inner``) comes from
    the adapter. A config that leaves the size to a default (GPT-2's ``n_inner: None``) built
    the model at that default, so the unit's own size is the reference, unless
    ``hfprune_layout`` records this kind: then the built size is what compaction kept, and
    the original is unknown (None).
    """
    if unit.kind == "head":
        stated = getattr(config, "num_attention_heads", None)
    else:
        fields = unit.adapter.config_updates(config, "neuron", unit, unit.count) or {}
        stated = next((getattr(config, field, None) for field in fields), None)
    if stated is not None:
        return int(stated)
    if unit.kind in (getattr(config, LAYOUT_KEY, None) or {}):
        return None
    return unit.count * unit.heads_per_group
