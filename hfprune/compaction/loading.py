"""Loading a compacted model in one call, whether or not its config is stock.

When every layer kept the same number of heads and neurons and the config can say so,
compaction saves a stock config and plain ``AutoModelFor*.from_pretrained`` loads it.
Otherwise config.json carries ``hfprune_layout`` (groups kept per attention and FFN block)
and :func:`load_compacted` rebuilds those shapes before loading the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import transformers
from safetensors.torch import load_file
from torch import nn

from hfprune.architecture import ArchitectureAdapter, unit_of
from hfprune.compaction.compact import LAYOUT_KEY, shrink_unit
from hfprune.errors import CompactionError
from hfprune.plugins import default_registry

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def load_compacted(
    path: str | os.PathLike,
    model_class: type | None = None,
    architectures: list[ArchitectureAdapter] | None = None,
    **kwargs,
) -> nn.Module:
    """Load a model saved after ``compact``: ``model_class`` (default: the config's architecture), in eval
    mode.

    Stock configs go through ``model_class.from_pretrained(path, **kwargs)``; configs with
    per-layer sizes are rebuilt shape by shape, their blocks found by ``architectures``
    (default: the installed plugins' adapters; pass a pruner's ``registry.architectures``
    when it compacted with others). Either way the result is an ordinary transformers model.
    """
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = model_class or _architecture(config)
    layout = getattr(config, LAYOUT_KEY, None)
    if not layout:
        return model_class.from_pretrained(path, **kwargs)
    model = model_class(config)
    adapters = default_registry().architectures if architectures is None else architectures
    for kind, sizes in layout.items():
        for name, kept in sizes.items():
            unit = unit_of(model.get_submodule(name), kind, adapters)
            if unit is None:
                raise CompactionError(
                    f"{path}: {LAYOUT_KEY} names {kind} block {name}, which no installed architecture "
                    "adapter recognizes"
                )
            shrink_unit(unit, kept)
    _load_weights(model, Path(path))
    return model.eval()


def _architecture(config) -> type:
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CompactionError(f"config.json names no transformers architecture ({names}); pass model_class=")
    return cls


def _load_weights(model: nn.Module, path: Path) -> None:
    if (path / WEIGHTS).is_file():
        state = load_file(path / WEIGHTS)
    elif (path / WEIGHTS_INDEX).is_file():
        shards = sorted(set(json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        state = {k: v for shard in shards for k, v in load_file(path / shard).items()}
    else:
        raise CompactionError(
            f"{path} has no {WEIGHTS} (or {WEIGHTS_INDEX}); save with "
            "save_pretrained(safe_serialization=True)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CompactionError(f"{path}: weights the rebuilt model has no place for: {unexpected[:5]}")
    model.tie_weights()
    # Tied weights (an LM head sharing the embedding) are saved once; anything else missing is an error.
    tensors = model.state_dict()
    loaded = {tensors[k].data_ptr() for k in state}
    untied = [k for k in missing if tensors[k].data_ptr() not in loaded]
    if untied:
        raise CompactionError(f"{path}: weights missing from the checkpoint: {untied[:5]}")
