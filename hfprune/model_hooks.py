"""Forward hooks a strategy puts on the model, and removing them from copies.

A strategy that changes what a module computes (layer gates, layer-wise dropout) does it
with a forward hook rather than by wrapping or renaming the module, so parameter names,
``save_pretrained`` and optimizers see the model they expect. Hooks made from
:class:`ModelHook` are shared, not duplicated, when the model is deep-copied,
:func:`strip_model_hooks` takes them off a copy (compaction returns a plain model), and
:func:`carry_model_hooks` puts them on a copy built otherwise (from a gathered state dict).
A :class:`ModelHook` can also stand in for the model's ``save_pretrained``
(:func:`hook_save_pretrained`), when what the model saves must differ from its modules.
"""

from __future__ import annotations

import types

from torch import nn

SAVE_PRETRAINED = "save_pretrained"


class ModelHook:
    """Base of hfprune's forward hooks: callable, and not copied along with the model it hooks."""

    def __deepcopy__(self, memo: dict) -> ModelHook:
        # Copying the hook would copy the strategy it belongs to; a copy of the model gets the same
        # hook, which strip_model_hooks then removes.
        return self


def hook_save_pretrained(model: nn.Module, hook: ModelHook) -> None:
    """Make ``model.save_pretrained(...)`` call ``hook(model, ...)``.

    Set on the instance as a bound method, which a deep copy binds to the copy, so a copy
    saves itself; :func:`unhook_save_pretrained` and :func:`strip_model_hooks` remove it.
    """
    setattr(model, SAVE_PRETRAINED, types.MethodType(hook, model))


def unhook_save_pretrained(model: nn.Module) -> bool:
    """Give ``model`` its class's ``save_pretrained`` back; whether a hook was removed."""
    method = vars(model).get(SAVE_PRETRAINED)
    if not isinstance(getattr(method, "__func__", None), ModelHook):
        return False
    delattr(model, SAVE_PRETRAINED)
    return True


def strip_model_hooks(model: nn.Module) -> int:
    """Remove every :class:`ModelHook` from ``model`` and its submodules (a save hook too); how many were
    removed."""
    removed = int(unhook_save_pretrained(model))
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [key for key, hook in hooks.items() if isinstance(hook, ModelHook)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
                removed += 1
    return removed


def carry_model_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register every :class:`ModelHook` of ``source``'s modules on ``target``'s modules of the same names."""
    modules = dict(target.named_modules())
    for name, module in source.named_modules():
        for key, hook in module._forward_pre_hooks.items():
            if isinstance(hook, ModelHook):
                modules[name].register_forward_pre_hook(
                    hook, with_kwargs=key in module._forward_pre_hooks_with_kwargs
                )
        for key, hook in module._forward_hooks.items():
            if isinstance(hook, ModelHook):
                modules[name].register_forward_hook(
                    hook, with_kwargs=key in module._forward_hooks_with_kwargs
                )
