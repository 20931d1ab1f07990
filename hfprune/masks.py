"""Keep-masks over a fixed list of parameters, applied in place.

Masked weights are exactly zero after every step, their gradients are zeroed before it,
and when a mask changes the optimizer's per-weight state (momentum, Adam moments) is
zeroed where it bites, so no optimizer can regrow a pruned weight.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from hfprune.errors import StateError
from hfprune.strategy import StepContext, Strategy

MASK_PREFIX = "mask."
ALPHA_PREFIX = "alpha."
Scope = Literal["layer", "global"]  # one threshold per tensor, or one across all of them


class MaskSet:
    """Keep-masks for named parameters; inactive until first set.

    Masks are held as 0/1 tensors in each parameter's dtype: multiplying by them is about
    three times faster than by booleans, and the hot path does it twice a step. They are
    saved as booleans.
    """

    def __init__(self, parameters: dict[str, nn.Parameter]):
        self.names = list(parameters)
        self.params = list(parameters.values())
        self.masks: list[torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.masks is not None

    @torch.no_grad()
    def set(self, masks: list[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        """Install new masks, zero the weights they remove and the optimizer state of those weights."""
        self.masks = [m.to(device=p.device, dtype=p.dtype) for m, p in zip(masks, self.params, strict=True)]
        self.apply_to_weights()
        if optimizer is not None:
            for param, mask in zip(self.params, self.masks):
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.mul_(mask)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        if self.masks is None:
            return
        pairs = [(p.grad, m) for p, m in zip(self.params, self.masks) if p.grad is not None]
        if pairs:
            grads, masks = zip(*pairs)
            torch._foreach_mul_(list(grads), list(masks))

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        if self.masks is not None:
            torch._foreach_mul_(self.params, self.masks)

    def keep(self) -> list[torch.Tensor]:
        """The masks as booleans (True = kept), for schedule-time logic such as "pruned stays pruned"."""
        if self.masks is None:
            return [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        return [m.bool() for m in self.masks]

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.masks is None:
            return {}
        return {MASK_PREFIX + name: keep.cpu() for name, keep in zip(self.names, self.keep())}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore masks; refuse ones that do not fit these parameters or the weights they guard."""
        found = {k[len(MASK_PREFIX):]: v for k, v in state.items() if k.startswith(MASK_PREFIX)}
        if not found:
            self.masks = None
            return
        missing = [n for n in self.names if n not in found]
        unexpected = [n for n in found if n not in self.names]
        if missing or unexpected:
            raise StateError(f"saved masks do not fit the targeted parameters (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
        masks = []
        for name, param in zip(self.names, self.params):
            mask = found[name].to(device=param.device, dtype=torch.bool)
            if mask.shape != param.shape:
                raise StateError(f"saved mask for {name} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
            if param[~mask].any():
                raise StateError(
                    f"{name} has non-zero weights where the saved mask prunes them: the pruning state "
                    "belongs to another checkpoint than the weights being resumed"
                )
            masks.append(mask.to(param.dtype))
        self.masks = masks


@torch.no_grad()
def largest_magnitude_masks(
    params: list[torch.Tensor], sparsity: float, scope: Scope = "layer"
) -> list[torch.Tensor]:
    """Keep-masks (bool) that zero the ``sparsity`` fraction of smallest-magnitude weights.

    ``scope="layer"`` prunes every tensor to the sparsity; ``"global"`` uses one threshold
    across all of them. Weights tied with the threshold are pruned, so weights that are
    already zero always go, even when there are more of them than ``sparsity`` asks for.
    """
    if scope == "global":
        magnitudes = torch.cat([p.detach().abs().flatten().float() for p in params])
        threshold = kth_smallest(magnitudes, round(sparsity * magnitudes.numel()))
        del magnitudes
        return [p.detach().abs() > threshold for p in params]
    # One tensor at a time, so at most one float copy of a weight exists at once.
    return [_keep_largest(p.detach().abs().float(), sparsity) for p in params]


def _keep_largest(magnitude: torch.Tensor, sparsity: float) -> torch.Tensor:
    return magnitude > kth_smallest(magnitude.flatten(), round(sparsity * magnitude.numel()))


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (k >= 1); below every value when k == 0, so nothing is pruned."""
    if k <= 0:
        return values.new_tensor(-1.0)
    return values.kthvalue(k).values


class MaskingStrategy(Strategy):
    """Base for strategies whose result is a keep-mask per parameter.

    Masks gradients before each optimizer step and weights after it, and saves the masks
    with the checkpoint; a subclass decides when and how to call ``self.masks.set``.
    """

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        self.masks = MaskSet(parameters)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        self.masks.apply_to_grads()

    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.masks.apply_to_weights()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.masks.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state)


class ReweightedPhaseStrategy(MaskingStrategy):
    """Base for penalty methods: push weights toward zero in ``[start, end)``, then fix a mask.

    During the phase a subclass applies its penalty in the step hooks, weighted by
    ``self.alphas`` (one tensor per name in :meth:`alpha_names`), and :meth:`reweight`
    refreshes them every ``config.reweight_every`` steps; at ``end`` :meth:`fix_pattern`
    installs the mask and sets ``self.alphas`` to None, and training goes on masked (which
    :class:`MaskingStrategy` does). The state is the alphas during the phase, the masks after.
    """

    alphas: list[torch.Tensor] | None

    def on_step_end(self, ctx: StepContext) -> None:
        if self.masks.active:
            return
        if ctx.step >= self.schedule.end:
            self.fix_pattern(ctx.optimizer)
        elif self.schedule.in_phase(ctx.step) and (ctx.step - self.schedule.start + 1) % self.config.reweight_every == 0:
            self.reweight()

    def reweight(self) -> None:
        raise NotImplementedError

    def fix_pattern(self, optimizer: torch.optim.Optimizer | None) -> None:
        raise NotImplementedError

    def alpha_names(self) -> list[str]:
        """The state key (after ``alpha.``) of each tensor in ``self.alphas``."""
        raise NotImplementedError

    def new_alphas(self) -> list[torch.Tensor]:
        """Tensors shaped like ``self.alphas``, for restoring a state saved during the phase."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        if self.alphas is None:
            return self.masks.state_dict()
        return {ALPHA_PREFIX + name: alpha.cpu() for name, alpha in zip(self.alpha_names(), self.alphas)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state)
        if self.masks.active:
            self.alphas = None
            return
        found = {key[len(ALPHA_PREFIX):]: value for key, value in state.items() if key.startswith(ALPHA_PREFIX)}
        names = self.alpha_names()
        if sorted(found) != sorted(names):
            missing = [n for n in names if n not in found]
            unexpected = [n for n in found if n not in names]
            parts = ([f"no mask or alpha for {missing[:3]}"] if missing else []) + (
                [f"alphas for {unexpected[:3]}, which the targets no longer match"] if unexpected else [])
            raise StateError(f"saved {type(self).__name__} state does not fit the targets: {'; '.join(parts)}")
        if self.alphas is None:
            self.alphas = self.new_alphas()
        for name, alpha in zip(names, self.alphas):
            if found[name].shape != alpha.shape:
                raise StateError(f"saved alpha for {name} has shape {tuple(found[name].shape)}, expected {tuple(alpha.shape)}")
            alpha.copy_(found[name])
