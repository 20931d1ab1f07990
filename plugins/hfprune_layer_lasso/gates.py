"""The forward hook that gates one layer of a stack, and what it asks of its strategy.

A residual layer with output ``f(x)`` becomes ``x + g * (f(x) - x)``; a layer of a densely
connected stack (each layer reads the concatenation of all earlier outputs) becomes
``g * f(x)``, which gates its output everywhere it is consumed. ``g`` is the layer's gate,
times 0 when layer-wise dropout drops the layer on this forward pass. The hook is put in
front of the module's other forward hooks, so what transformers records as hidden states
is the gated output.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import nn

from hfprune.model_hooks import ModelHook

StackKind = Literal["residual", "dense"]


class GateSource(Protocol):
    """What a :class:`LayerGateHook` reads from its strategy on every forward pass."""

    def gate_for(self, index: int, training: bool) -> torch.Tensor | float | None:
        """Layer ``index``'s factor now: a tensor (learned gate), 0.0 or 1.0 (fixed), or None (leave the layer
        alone)."""

    def observe_branch(self, index: int, branch: torch.Tensor, reference: torch.Tensor) -> None:
        """Called while gates learn with what the gate scales and the ``reference`` its size is measured
        against: a
        residual layer's branch ``f(x) - x`` and gated output, or a dense layer's ``f(x)`` twice (its gated
        output may
        be all zero) (the strategy keeps what it needs: the last step's, for its settling report)."""


class LayerGateHook(ModelHook):
    """Forward hook on layer ``index`` of a stack: scales what the layer adds by its strategy's gate."""

    def __init__(self, source: GateSource, index: int, kind: StackKind):
        self.source = source
        self.index = index
        self.kind = kind

    def attach(self, layer: nn.Module):
        """Register on ``layer`` ahead of its other forward hooks; the handle removes it."""
        return layer.register_forward_hook(self, with_kwargs=True, prepend=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output):
        gate = self.source.gate_for(self.index, module.training)
        if gate is None or (isinstance(gate, float) and gate == 1.0):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(gate):
            gate = gate.to(hidden.dtype)
        if self.kind == "dense":
            branch, gated = hidden, gate * hidden
            reference = hidden  # a gate change moves what the layer feeds by that change times its output
        else:
            inputs = args[0] if args else kwargs["hidden_states"]
            branch = hidden - inputs
            # A gate of 0.0 gives the input exactly, and the layer's weights stay in the graph (with zero
            # gradients), so DistributedDataParallel does not wait for gradients that never come.
            gated = inputs + gate * branch
            reference = gated
        if torch.is_tensor(gate) and gate.requires_grad:
            self.source.observe_branch(self.index, branch, reference)
        return (gated, *output[1:]) if isinstance(output, tuple) else gated
