"""A model's modules under the names its user knows, also when peft has wrapped it.

``get_peft_model`` moves every module under ``base_model.model.`` and replaces each
adapted layer ``query`` by a wrapper holding ``query.base_layer`` (the original layer)
beside ``query.lora_A``/``lora_B``. Recipes, pruning state and compaction plans keep
speaking of the original names: in this view the prefix is gone, each wrapper is shown
as the layer it wraps, and the adapters' own modules are hidden, so the parameter a
recipe prunes is the wrapped layer's base weight and never an adapter's. A module peft
trains whole (``modules_to_save``, a classifier) is shown as the copy that trains, which is
what ``merge_and_unload`` puts back.

peft is imported only when it was already imported by someone else: a model cannot be
wrapped by peft otherwise, and importing it costs seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

PEFT_PREFIX = "base_model.model."
BASE_LAYER = "base_layer"


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft tuner layer (a LoRA-wrapped ``Linear``, for one)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (and its tuner), or ``model`` itself."""
    if "peft" not in sys.modules:
        return model
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def shown_module(module: nn.Module) -> nn.Module:
    """What the user's model has where peft put ``module``: the layer an adapter wraps, the trained copy of a
    module
    peft trains whole (``modules_to_save``, such as a classifier), or ``module`` itself."""
    if is_adapter_layer(module):
        return module.get_base_layer()
    if "peft" in sys.modules:
        from peft.utils.other import ModulesToSaveWrapper

        if isinstance(module, ModulesToSaveWrapper) and module.active_adapters:
            return module.modules_to_save[module.active_adapters[0]]
    return module


def named_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``root.named_modules(prefix=prefix)`` as the user's model has them (:func:`shown_module`), peft's own
    modules hidden."""
    root = shown_module(root)
    yield prefix, root
    for child_name, child in root.named_children():
        yield from named_modules(child, f"{prefix}.{child_name}" if prefix else child_name)


@dataclass(frozen=True)
class ModelView:
    """The modules of a model by the names its user knows, and the names each also answers to."""

    modules: dict[str, nn.Module]
    wrapped: frozenset[str]  # names whose layer peft wrapped
    prefix: str  # PEFT_PREFIX for a PeftModel, else ""

    def spellings(self, name: str) -> tuple[str, ...]:
        """``name`` and how peft spells it: with the ``base_model.model.`` prefix, with ``.base_layer`` for a
        wrapped layer."""
        spellings = [name]
        if name in self.wrapped:
            spellings.append(f"{name}.{BASE_LAYER}")
        if self.prefix:
            spellings += [self.prefix + s for s in spellings]
        return tuple(spellings)

    def parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter by the user's name (``<module>.<leaf>``); adapters' own parameters are not among
        them."""
        return {
            f"{name}.{leaf}" if name else leaf: param
            for name, module in self.modules.items()
            for leaf, param in module.named_parameters(recurse=False)
        }

    def wrapped_layer(self, parameter: str) -> str | None:
        """The name of the peft-wrapped layer that ``parameter`` (a user's name) belongs to, or None."""
        layer = parameter.rpartition(".")[0]
        return layer if layer in self.wrapped else None

    def peft_name(self, parameter: str) -> str:
        """The name peft's model gives the parameter this view calls ``parameter``."""
        layer = self.wrapped_layer(parameter)
        if layer is not None:
            parameter = f"{layer}.{BASE_LAYER}.{parameter.rpartition('.')[2]}"
        return self.prefix + parameter


def model_view(model: nn.Module) -> ModelView:
    """The user's names for the modules of ``model`` (a plain model, or one peft wrapped)."""
    inner = unwrap_peft(model)
    prefix = PEFT_PREFIX if inner is not model else ""
    modules: dict[str, nn.Module] = {}
    wrapped: set[str] = set()
    for name, module in named_modules(inner):
        modules[name] = module
    for name, module in inner.named_modules():
        if is_adapter_layer(module):
            wrapped.add(name)
    return ModelView(modules, frozenset(wrapped), prefix)
