"""Tied weights: one tensor reachable under several parameter names (GPT-2's ``lm_head`` and
``transformer.wte``, Llama with ``tie_word_embeddings``).

Pruning acts on tensors, not names: the engine claims, counts and thresholds each tensor once,
under the first name it was selected by, so a tied matrix is neither pruned by two entries at
odds nor weighed twice.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch
from torch import nn


def tensor_identity(tensor: torch.Tensor) -> Hashable:
    """What makes two parameters one weight: the same memory viewed the same way (so separate Parameter
    objects over one storage count as tied too), or the same object for tensors without memory of their
    own, whose address is 0 (meta tensors, FSDP2's DTensors, empty ones)."""
    address = tensor.data_ptr()
    if not address:
        return id(tensor)
    return (tensor.device, address, tensor.dtype, tuple(tensor.shape), tensor.stride())


def distinct_parameters(
    parameters: dict[str, nn.Parameter],
) -> tuple[dict[str, nn.Parameter], dict[str, tuple[str, ...]]]:
    """``parameters`` with each tensor once, under its first name; and for each name kept, the other names
    of its tensor (none for an untied one)."""
    first_name: dict[Hashable, str] = {}
    others: dict[str, list[str]] = {}
    for name, param in parameters.items():
        kept = first_name.setdefault(tensor_identity(param), name)
        if kept != name:
            others.setdefault(kept, []).append(name)
    kept_names = set(first_name.values())
    distinct = {name: param for name, param in parameters.items() if name in kept_names}
    return distinct, {name: tuple(names) for name, names in others.items()}


def distinct_numel(parameters: Iterable[torch.Tensor]) -> int:
    """How many weights ``parameters`` hold, each tensor counted once however often it appears."""
    return sum({tensor_identity(p): p.numel() for p in parameters}.values())
