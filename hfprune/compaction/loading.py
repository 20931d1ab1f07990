"""Loading a compacted model in one call, whether or not its config is stock.

When every layer kept the same number of heads and neurons and the config can say so,
compaction saves a stock config and plain ``AutoModelFor*.from_pretrained`` loads it.
Otherwise config.json carries ``hfprune_layout`` (groups kept per attention and FFN block)
and :func:`load_compacted` builds those shapes before ``from_pretrained`` loads the weights.
"""

from __future__ import annotations

import os

import torch
import transformers
from torch import nn

from hfprune.architecture import ArchitectureAdapter, unit_of
from hfprune.compaction.compact import LAYOUT_KEY, shrink_unit
from hfprune.errors import CompactionError
from hfprune.plugins import default_registry


def load_compacted(
    path: str | os.PathLike,
    model_class: type | None = None,
    architectures: list[ArchitectureAdapter] | None = None,
    **kwargs,
) -> nn.Module:
    """Load a model saved after ``compact``: ``model_class`` (default: the config's architecture), in eval
    mode.

    Stock configs go through ``model_class.from_pretrained(path, **kwargs)``; configs with
    per-layer sizes too, with the blocks ``hfprune_layout`` records cut to their kept sizes
    as the model is built, found by ``architectures`` (default: the installed plugins'
    adapters; pass a pruner's ``registry.architectures`` when it compacted with others).
    Either way the result is an ordinary transformers model of ``model_class``.
    """
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = model_class or _architecture(config)
    layout = getattr(config, LAYOUT_KEY, None)
    if not layout:
        return model_class.from_pretrained(path, **kwargs)
    adapters = default_registry().architectures if architectures is None else architectures
    shaped = _shaped_by_layout(model_class, layout, adapters, path)
    model, info = shaped.from_pretrained(path, output_loading_info=True, **kwargs)
    model.__class__ = model_class  # the subclass only built the shapes
    problems = {
        "weights missing from the checkpoint": sorted(info["missing_keys"]),
        "weights the rebuilt model has no place for": sorted(info["unexpected_keys"]),
        "weights of another shape than the rebuilt model's": sorted(str(k) for k in info["mismatched_keys"]),
    }
    found = [f"{what}: {keys[:5]}" for what, keys in problems.items() if keys]
    if found:
        raise CompactionError(f"{path}: " + "; ".join(found))
    return model.eval()


def _shaped_by_layout(model_class: type, layout: dict, adapters: list[ArchitectureAdapter], path) -> type:
    """A subclass of ``model_class`` that cuts every block ``layout`` names to its kept groups once built.

    ``from_pretrained`` then loads the checkpoint into those shapes with transformers' own
    loader, rather than one of ours: it renames the keys of checkpoints saved in an older
    layout (a multimodal model's ``language_model.model.*``), reads sharded files, and
    places dtypes and devices as it does for any model.
    """

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        with torch.device("cpu"):  # for the index tensors; weights stay where the loader builds them (meta)
            _shrink(self, layout, adapters, path)

    # The class's own module and name: transformers' is_custom_code reads __module__, and custom code gets
    # neither the class's checkpoint key renames nor its weight initialization.
    names = {"__module__": model_class.__module__, "__qualname__": model_class.__qualname__}
    return type(model_class.__name__, (model_class,), {"__init__": __init__, **names})


def _shrink(model: nn.Module, layout: dict, adapters: list[ArchitectureAdapter], path) -> None:
    """Cut every block ``layout`` names in ``model`` to its kept groups."""
    for kind, sizes in layout.items():
        for name, kept in sizes.items():
            unit = unit_of(model.get_submodule(name), kind, adapters)
            if unit is None:
                raise CompactionError(
                    f"{path}: {LAYOUT_KEY} names {kind} block {name}, which no installed architecture "
                    "adapter recognizes"
                )
            shrink_unit(unit, kept)


def _architecture(config) -> type:
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CompactionError(f"config.json names no transformers architecture ({names}); pass model_class=")
    return cls
