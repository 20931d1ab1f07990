"""Pruning state on disk: one safetensors file per checkpoint, never pickled.

Tensors go into the safetensors body; everything else (step, recipe fingerprint, plain
values) into its JSON metadata. Writes go to a temporary file that replaces the old one
only once complete, so a failed save leaves the last good state intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hfprune.atomic import write_atomically
from hfprune.errors import StateError

STATE_FILE = "hfprune_state.safetensors"
_METADATA_KEY = "hfprune"
_TENSOR_REF = "__tensor__"


def save_state(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/hfprune_state.safetensors`` atomically."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {_METADATA_KEY: json.dumps(skeleton)}
    return write_atomically(directory / STATE_FILE, lambda path: save_file(tensors, path, metadata=metadata))


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Read what :func:`save_state` wrote; StateError if absent or malformed."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise StateError(f"no pruning state at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        skeleton = json.loads(metadata[_METADATA_KEY])
    except (OSError, KeyError, ValueError, RecursionError, SafetensorError) as exc:
        raise StateError(f"pruning state at {path} is unreadable: {exc}") from None
    return _join(skeleton, tensors, path)


def _split(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR_REF: key}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{key}.{k}" if key else str(k), tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            ref = value[_TENSOR_REF]
            if not isinstance(ref, str) or ref not in tensors:
                raise StateError(f"pruning state at {path} refers to a missing tensor {ref!r}")
            return tensors[ref]
        return {k: _join(v, tensors, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors, path) for v in value]
    return value
