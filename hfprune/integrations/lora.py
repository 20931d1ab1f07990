"""LoRA over a pruned base without losing the sparsity: what is pruned stays zero, in training and in the
merge.

A LoRA layer computes ``W x + s B A x``: its effective weight ``W + s B A`` is dense even
where ``W`` was pruned, and peft's merge writes that dense matrix over the zeros. Here a
pruned weight is one that is exactly zero in the base (every hfprune mask keeps masked
weights exactly zero), and the adapter's update is masked the same way:

    effective weight = W + keep(W) * s B A,   keep(W) = (W != 0)

in the forward pass (so what the adapter learns is what the merged model will have), in
``merge``/``merge_and_unload``, and after the adapter is loaded again, since the rule needs
nothing but the base weights. It is a peft LoRA *variant* installed per layer, so peft's own
forward, merge and unmerge apply it.

Masks whose kept weights form whole rows and columns (heads, neurons, rows, columns) are
applied to ``A``'s columns and ``B``'s rows, which costs next to nothing; any other pattern
(unstructured, tiles) needs the masked update as a matrix, one extra matmul per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hfprune.errors import HfpruneError
from hfprune.integrations.peft_names import is_adapter_layer, unwrap_peft


@dataclass(frozen=True)
class KeepPattern:
    """Where a base weight is non-zero, in (out, in) layout, and whether that is whole rows and columns."""

    mask: torch.Tensor  # out x in, 0/1
    rows: torch.Tensor | None  # kept outputs, when mask == rows x cols
    cols: torch.Tensor | None
    everything: bool  # nothing is pruned

    @classmethod
    @torch.no_grad()
    def of(cls, weight_out_in: torch.Tensor, dtype: torch.dtype) -> KeepPattern:
        keep = weight_out_in != 0
        rows, cols = keep.any(dim=1), keep.any(dim=0)
        if torch.equal(keep, rows[:, None] & cols[None, :]):
            return cls(keep.to(dtype), rows.to(dtype), cols.to(dtype), everything=bool(keep.all()))
        return cls(keep.to(dtype), None, None, everything=False)


class SparseLora:
    """A peft LoRA variant whose update is zero wherever the base weight is: one per layer and adapter.

    Holds the layer's keep pattern, recomputed only when the base weight changed: its
    storage, or its version counter, which every in-place update moves (a mask being
    applied, a proximal step, ``load_state_dict``). Writes through ``weight.data`` do not
    move it; hfprune makes none, and code that does must assign a new tensor instead.
    """

    def __init__(self) -> None:
        self._pattern: KeepPattern | None = None
        self._seen: tuple[int, int] | None = None
        self._merged_pattern: KeepPattern | None = None

    # --- what peft calls -------------------------------------------------------------------
    def supports_lora_conversion(self) -> bool:
        return True

    def forward(
        self, module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        pattern = self.pattern(module, lora_A.weight.dtype)
        if pattern.everything:
            return result + lora_B(lora_A(x)) * scaling
        if pattern.rows is not None:  # mask the small factors, not the activations
            hidden = F.linear(x, lora_A.weight * pattern.cols)
            return result + F.linear(hidden, lora_B.weight * pattern.rows[:, None]) * scaling
        delta = (lora_B.weight @ lora_A.weight) * (pattern.mask * scaling)
        return result + F.linear(x, delta)

    def merge_safe(self, module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + self._merge_delta(module, active_adapter, orig_weight)

    @torch.no_grad()
    def merge_unsafe(self, module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight += self._merge_delta(module, active_adapter, orig_weight)

    def unmerge(self, module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(active_adapter) * self._in_base_layout(
            module, self._merged_pattern.mask
        )
        return orig_weight - delta.to(orig_weight.dtype)

    # --- the keep pattern ----------------------------------------------------------------------
    def pattern(self, module, dtype: torch.dtype) -> KeepPattern:
        weight = module.get_base_layer().weight
        seen = (weight.data_ptr(), weight._version)
        if self._pattern is None or self._seen != seen or self._pattern.mask.dtype != dtype:
            self._pattern = KeepPattern.of(weight.T if module.fan_in_fan_out else weight, dtype)
            self._seen = seen
        return self._pattern

    def _merge_delta(self, module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        self._merged_pattern = self.pattern(module, orig_weight.dtype)
        delta = module.get_delta_weight(active_adapter) * self._in_base_layout(
            module, self._merged_pattern.mask
        )
        return delta.to(orig_weight.dtype)

    @staticmethod
    def _in_base_layout(module, mask_out_in: torch.Tensor) -> torch.Tensor:
        return mask_out_in.T if module.fan_in_fan_out else mask_out_in


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft adapter layers of ``model`` by the user's name of the layer they wrap."""
    inner = unwrap_peft(model)
    return {name: module for name, module in inner.named_modules() if is_adapter_layer(module)}


def keep_sparse(model: nn.Module, layers: list[str] | None = None) -> list[str]:
    """Make the LoRA adapters of ``model`` (all, or the wrapped ``layers``) keep their base's zeros; returns
    the names.

    Idempotent. HfpruneError (:func:`why_not_maskable`) before anything changes when a layer
    cannot be masked; when ``layers`` is not given, such a layer is left alone if its base
    weight has no zeros to keep.
    """
    found = lora_layers(model)
    if layers is None:
        layers = [
            n for n, m in found.items() if why_not_maskable(n, m) is None or _has_zeros(m.get_base_layer())
        ]
    refusals = [why_not_maskable(name, found[name]) for name in layers]
    if any(refusals):
        raise HfpruneError("; ".join(r for r in refusals if r))
    for name in layers:
        module = found[name]
        for adapter in module.lora_A:
            module.lora_variant.setdefault(adapter, SparseLora())
    return layers


def why_not_maskable(name: str, module: nn.Module) -> str | None:
    """Why the update of the adapter layer ``module`` cannot be masked like its base, or None when it can.

    Only plain LoRA on a linear layer can: not another peft method (LoHa, IA3, ...), a LoRA
    variant (DoRA, ...), a LoRA embedding, or ``lora_bias=True`` (its bias would fill pruned outputs).
    """
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear):
        return (
            f"{name} is wrapped by {type(module).__module__}.{type(module).__name__}: hfprune keeps pruned "
            "weights zero "
            "under LoRA on linear layers only; leave this layer out of the adapter's target_modules or the "
            "recipe"
        )
    for adapter, variant in module.lora_variant.items():
        if not isinstance(variant, SparseLora):
            return (
                f"{name} uses the LoRA variant {type(variant).__name__} (adapter {adapter!r}), whose update "
                "hfprune cannot mask: use plain LoRA on pruned layers"
            )
    for adapter in module.lora_A:
        if module.lora_bias.get(adapter):
            return (
                f"{name}: adapter {adapter!r} has lora_bias=True, whose bias would fill pruned outputs; use "
                "lora_bias=False"
            )
    return None


@torch.no_grad()
def _has_zeros(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight has exact zeros, other than an embedding's padding row (zero by
    construction, not pruned)."""
    weight = layer.weight
    padding = getattr(layer, "padding_idx", None)
    if padding is not None:
        weight = torch.cat([weight[:padding], weight[padding + 1 :]])
    return bool(weight.eq(0).any())


def merge_lora(model: nn.Module) -> nn.Module:
    """peft's ``merge_and_unload`` with every pruned (exactly zero) base weight kept zero; returns the plain
    model.

    Works on an adapter just loaded with ``PeftModel.from_pretrained`` too: the pruning
    pattern is read from the base weights, so nothing else has to be saved with it.
    """
    keep_sparse(model)
    return model.merge_and_unload()


def adapter_weights_of_bases(model: nn.Module) -> dict[int, nn.Parameter]:
    """For each LoRA base weight (by ``id``), the ``A`` weight of its first adapter.

    A proximal step on a frozen base weight needs a learning rate: the engine takes the
    one its layer trains with, the adapter's.
    """
    return {
        id(module.get_base_layer().weight): next(iter(module.lora_A.values())).weight
        for module in lora_layers(model).values()
        if len(getattr(module, "lora_A", {}))
    }
