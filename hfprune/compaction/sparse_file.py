"""A compact file for unstructured sparsity: a bitmask plus the non-zero values.

Unstructured zeros (magnitude, rpp) do not shrink a dense checkpoint. This encoding does:
each tensor with enough zeros is stored as one bit per element (set = non-zero) and its
non-zero values in order, so a float32 matrix at sparsity ``s`` takes ``1/32 + (1 - s)``
of its dense size. Tensors for which that is no smaller stay dense. The file is
safetensors (no pickle); :func:`load_sparse` gives back the exact state dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hfprune.atomic import write_atomically

BITMASK_SUFFIX = ".__bitmask__"
VALUES_SUFFIX = ".__values__"
_SHAPES_KEY = "hfprune.sparse_shapes"
_ALIASES_KEY = "hfprune.aliases"
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, eight elements per byte, least significant bit first."""
    flat = keep.flatten().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = int(torch.Size(shape).numel())
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS).ne(0).flatten()
    return bits[:numel].view(shape)


def _nonzero_if_worth_encoding(tensor: torch.Tensor) -> torch.Tensor | None:
    """The non-zero mask of ``tensor`` if a bitmask plus values is smaller than it, else None."""
    if not tensor.is_floating_point() or tensor.numel() < 8:
        return None
    keep = tensor != 0
    encoded_bytes = tensor.numel() / 8 + int(keep.sum()) * tensor.element_size()
    return keep if encoded_bytes < tensor.numel() * tensor.element_size() else None


def encode(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], dict[str, str]]:
    """Tensors to store, the original shapes of those stored as bitmask plus values, and aliases.

    A tensor that is the same tensor as an earlier one (tied weights) is stored once and
    recorded as an alias of the earlier name.
    """
    stored: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        identity = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if identity in first_name:
            aliases[name] = first_name[identity]
            continue
        first_name[identity] = name
        tensor = tensor.detach().cpu().contiguous()
        keep = _nonzero_if_worth_encoding(tensor)
        if keep is not None:
            stored[name + BITMASK_SUFFIX] = pack_bits(keep)
            stored[name + VALUES_SUFFIX] = tensor[keep]
            shapes[name] = list(tensor.shape)
        else:
            stored[name] = tensor
    return stored, shapes, aliases


def save_sparse(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``state_dict`` in the sparse encoding, atomically; returns the path."""
    stored, shapes, aliases = encode(state_dict)
    metadata = {_SHAPES_KEY: json.dumps(shapes), _ALIASES_KEY: json.dumps(aliases)}
    return write_atomically(path, lambda temporary: save_file(stored, temporary, metadata=metadata))


def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The exact state dict :func:`save_sparse` wrote."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        shapes = json.loads(metadata.get(_SHAPES_KEY, "{}"))
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    state = {
        key: value for key, value in tensors.items() if not key.endswith((BITMASK_SUFFIX, VALUES_SUFFIX))
    }
    for name, shape in shapes.items():
        keep = unpack_bits(tensors[name + BITMASK_SUFFIX], tuple(shape))
        values = tensors[name + VALUES_SUFFIX]
        dense = values.new_zeros(shape)
        dense[keep] = values
        state[name] = dense
    for name, original in aliases.items():
        state[name] = state[original]
    return state
