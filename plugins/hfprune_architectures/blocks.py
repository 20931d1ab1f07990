"""Helpers every adapter in this package builds its units from: what a head or neuron owns, and what a stack
is."""

from __future__ import annotations

from torch import nn

from hfprune.architecture import ArchitectureAdapter, Member, Unit, features, layer


def linears(*modules) -> bool:
    return all(isinstance(m, nn.Linear) for m in modules)


def head_unit(adapter: ArchitectureAdapter, module, q, k, v, output, size: int) -> Unit:
    """Multi-head attention with separate Q, K, V projections, each head ``size`` wide."""
    members = (
        Member(q, "out", 0, size),
        Member(k, "out", 0, size),
        Member(v, "out", 0, size),
        Member(output, "in", 0, size),
    )
    return Unit("head", module, features(q, "out") // size, members, adapter)


def neuron_unit(adapter: ArchitectureAdapter, module, up, down, activation) -> Unit:
    """An ungated FFN: ``down(activation(up(x)))``."""
    return Unit(
        "neuron",
        module,
        features(up, "out"),
        (Member(up, "out", 0, 1), Member(down, "in", 0, 1)),
        adapter,
        activation=activation,
    )


def heads(
    adapter: ArchitectureAdapter,
    module,
    names: tuple[str, str, str, str],
    size: str,
    marker: str | None = None,
) -> Unit | None:
    """``module``'s head unit when it is attention with separate query, key, value and output projections
    called ``names`` (each an ``nn.Linear``) and has the attribute ``marker`` (default: ``size``); heads are
    ``module.<size>`` wide."""
    projections = [layer(module, name) for name in names]
    if not linears(*projections) or not hasattr(module, marker or size):
        return None
    return head_unit(adapter, module, *projections, getattr(module, size))


def neurons(adapter: ArchitectureAdapter, module, up: str, down: str, activation: str) -> Unit | None:
    """``module``'s neuron unit when it is an ungated FFN: ``nn.Linear`` projections called ``up`` and
    ``down``, and its activation function as the attribute ``activation``."""
    up_layer, down_layer = layer(module, up), layer(module, down)
    if not linears(up_layer, down_layer) or not hasattr(module, activation):
        return None
    return neuron_unit(adapter, module, up_layer, down_layer, getattr(module, activation))


def gated_neuron_unit(
    adapter: ArchitectureAdapter, module, gate: Member, up: Member, down, activation
) -> Unit:
    """A gated FFN, ``down(activation(gate(x)) * up(x))``, its gate and up rows given as members."""
    members = (gate, up, Member(down, "in", 0, 1))
    return Unit("neuron", module, features(down, "in"), members, adapter, activation=activation, gated=True)


def stack(module, attribute: str, *block_parts: str) -> nn.ModuleList | None:
    """``module.<attribute>`` if it is a non-empty ModuleList of blocks that each have ``block_parts``."""
    layers = getattr(module, attribute, None)
    if (
        isinstance(layers, nn.ModuleList)
        and len(layers)
        and all(hasattr(b, p) for b in layers for p in block_parts)
    ):
        return layers
    return None
