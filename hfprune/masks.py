"""Keep-masks over a fixed list of parameters, applied in place.

Masked weights are exactly zero after every step, their gradients are zeroed before it,
and when a mask changes the optimizer's per-weight state (momentum, Adam moments) is
zeroed where it bites, so no optimizer can regrow a pruned weight.
"""

from __future__ import annotations

import logging
import statistics
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import nn

from hfprune.errors import StateError
from hfprune.integrations.sharding import WHOLE, Layout, kth_smallest_of_parts, layout_of, shard_group
from hfprune.strategy import StepContext, Strategy, StrategyConfig

MASK_PREFIX = "mask."
ALPHA_PREFIX = "alpha."
logger = logging.getLogger("hfprune.masks")

Scope = Literal["layer", "global"]  # one threshold per tensor, or one across all of them
Lam = (
    Annotated[float, Field(gt=0.0)] | Literal["auto"]
)  # a proximal strategy's penalty weight, or derived (auto_lam)


class ProximalConfig(StrategyConfig):
    """The penalty weight of a proximal strategy (:class:`ReweightedPhaseStrategy`): a number, or ``auto``."""

    lam: Lam = Field(
        default="auto",
        description="penalty weight; 'auto': lam_scale * q^2 / (2 * sum of lr over the phase), q the weight "
        "magnitude (block "
        "norm) at the target's quantile when the phase starts, which brings about the target to zero by the "
        "phase's end",
    )
    lam_scale: float = Field(
        default=1.0, gt=0.0, description="with lam: auto, the fraction of that lam to use"
    )

    @model_validator(mode="after")
    def _scale_goes_with_auto(self) -> ProximalConfig:
        if self.lam != "auto" and self.lam_scale != 1.0:
            raise ValueError("lam_scale scales lam: auto; with a number for lam, scale the number")
        return self


class MaskSet:
    """Keep-masks for named parameters; inactive until first set.

    Masks are held as 0/1 tensors in each parameter's dtype: multiplying by them is about
    three times faster than by booleans, and the hot path does it twice a step. They are
    saved as booleans. A mask covers what this process holds of its parameter
    (:meth:`weights`): all of it, unless FSDP2 shards it (:mod:`hfprune.integrations.sharding`), in which
    case saving and :meth:`whole_keep` assemble the whole mask, collectively.
    """

    def __init__(self, parameters: dict[str, nn.Parameter]):
        self.names = list(parameters)
        self.params = list(parameters.values())
        self.layouts = [layout_of(p) for p in self.params]
        self._whole = not any(layout.sharded for layout in self.layouts)
        self.masks: list[torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.masks is not None

    def weights(self) -> list[torch.Tensor]:
        """What this process holds of each parameter, to read and change in place: the parameters themselves
        unless sharded.

        Fetched on every call: FSDP2 may move a parameter's local part when it first runs.
        """
        if self._whole:
            return self.params
        return [layout.local(p) for p, layout in zip(self.params, self.layouts)]

    @torch.no_grad()
    def set(self, masks: list[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        """Install new masks (shaped like :meth:`weights`), zero the weights they remove and the optimizer
        state of those weights."""
        weights = self.weights()
        self.masks = [m.to(device=w.device, dtype=w.dtype) for m, w in zip(masks, weights, strict=True)]
        self.apply_to_weights()
        if optimizer is not None:
            for param, layout, mask in zip(self.params, self.layouts, self.masks):
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        layout.local(value).mul_(mask)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        if self.masks is None:
            return
        pairs = [
            (layout.local(p.grad), m)
            for p, layout, m in zip(self.params, self.layouts, self.masks)
            if p.grad is not None
        ]
        if pairs:
            grads, masks = zip(*pairs)
            torch._foreach_mul_(list(grads), list(masks))

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        if self.masks is not None:
            torch._foreach_mul_(self.weights(), self.masks)

    @torch.no_grad()
    def escaped_weights(self) -> tuple[int, int]:
        """How many weights the masks prune are non-zero, and how many they prune, over the whole parameters.

        Summed across processes when FSDP2 shards them, so every process reaches the same verdict.
        """
        weights = self.weights()
        counts = torch.zeros(2, dtype=torch.int64, device=weights[0].device)
        for weight, mask in zip(weights, self.masks):
            pruned = mask == 0
            counts[0] += weight.ne(0).logical_and_(pruned).sum()
            counts[1] += pruned.sum()
        if not self._whole:
            dist.all_reduce(counts, group=shard_group(self.layouts))
        return int(counts[0]), int(counts[1])

    def keep(self) -> list[torch.Tensor]:
        """The masks as booleans (True = kept) shaped like :meth:`weights`, for logic such as "pruned stays
        pruned"."""
        if self.masks is None:
            return [torch.ones_like(w, dtype=torch.bool) for w in self.weights()]
        return [m.bool() for m in self.masks]

    def whole_keep(self) -> list[torch.Tensor]:
        """:meth:`keep` for the whole parameters; collective when sharded: every process must call it."""
        return [layout.gather(keep) for keep, layout in zip(self.keep(), self.layouts)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.masks is None:
            return {}
        return {MASK_PREFIX + name: keep.cpu() for name, keep in zip(self.names, self.whole_keep())}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore masks; refuse ones that do not fit these parameters or the weights they guard."""
        found = {k[len(MASK_PREFIX) :]: v for k, v in state.items() if k.startswith(MASK_PREFIX)}
        if not found:
            self.masks = None
            return
        missing = [n for n in self.names if n not in found]
        unexpected = [n for n in found if n not in self.names]
        if missing or unexpected:
            raise StateError(
                f"saved masks do not fit the targeted parameters (missing: {missing[:3]}, unexpected: "
                f"{unexpected[:3]})"
            )
        masks = []
        for name, weight, layout in zip(self.names, self.weights(), self.layouts):
            mask = found[name].to(device=weight.device, dtype=torch.bool)
            if mask.shape != layout.whole_shape(weight):
                raise StateError(
                    f"saved mask for {name} has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(layout.whole_shape(weight))}"
                )
            mask = layout.rows(mask)
            if weight[~mask].any():
                raise StateError(
                    f"{name} has non-zero weights where the saved mask prunes them: the pruning state "
                    "belongs to another checkpoint than the weights being resumed"
                )
            masks.append(mask.to(weight.dtype))
        self.masks = masks


@torch.no_grad()
def largest_magnitude_masks(
    weights: list[torch.Tensor], sparsity: float, scope: Scope = "layer", layouts: list[Layout] | None = None
) -> list[torch.Tensor]:
    """Keep-masks (bool) that zero the ``sparsity`` fraction of smallest-magnitude weights.

    ``scope="layer"`` prunes every tensor to the sparsity; ``"global"`` uses one threshold
    across all of them. Weights tied with the threshold are pruned, so weights that are
    already zero always go, even when there are more of them than ``sparsity`` asks for.
    With ``layouts`` (:attr:`MaskSet.layouts`), ``weights`` are this process's parts of
    sharded parameters and the thresholds are those of the whole parameters (collective).
    """
    layouts = layouts or [WHOLE] * len(weights)
    if scope == "global":
        magnitudes = [w.detach().abs().float() for w in weights]
        total = sum(layout.whole_shape(w).numel() for w, layout in zip(weights, layouts))
        threshold = kth_smallest_of_parts(magnitudes, layouts, pruned_count(sparsity, total))
        del magnitudes
        return [w.detach().abs() > threshold for w in weights]
    # One tensor at a time, so at most one float copy of a weight exists at once.
    return [_keep_largest(w.detach().abs().float(), sparsity, layout) for w, layout in zip(weights, layouts)]


def pruned_count(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights a magnitude mask at ``sparsity`` prunes: the one rounding masks and plans
    share."""
    return round(sparsity * numel)


def planned_magnitude_sparsity(parameters: list[nn.Parameter], sparsity: float, scope: Scope) -> float:
    """The fraction of ``parameters`` :func:`largest_magnitude_masks` zeroes at ``sparsity``, rounded as it
    rounds: per tensor (``layer``) or over all of them (``global``)."""
    sizes = [p.numel() for p in parameters]
    if scope == "global":
        pruned = pruned_count(sparsity, sum(sizes))
    else:
        pruned = sum(pruned_count(sparsity, n) for n in sizes)
    return pruned / max(sum(sizes), 1)


def _keep_largest(magnitude: torch.Tensor, sparsity: float, layout: Layout) -> torch.Tensor:
    k = pruned_count(sparsity, layout.whole_shape(magnitude).numel())
    return magnitude > kth_smallest_of_parts([magnitude], [layout], k)


@torch.no_grad()
def magnitude_at_quantile(
    weights: list[torch.Tensor], fraction: float, scope: Scope, layouts: list[Layout]
) -> float:
    """The magnitude below which ``fraction`` of the weights lie: one threshold (``global``), or the root mean
    square of
    every tensor's own (``layer``), weighted by size. What ``lam: auto`` aims the proximal phase at
    (collective when sharded)."""
    if scope == "global":
        total = sum(layout.whole_shape(w).numel() for w, layout in zip(weights, layouts))
        magnitudes = [w.detach().abs().float() for w in weights]
        return float(kth_smallest_of_parts(magnitudes, layouts, max(1, round(fraction * total))))
    squares, total = 0.0, 0
    for weight, layout in zip(weights, layouts):
        numel = layout.whole_shape(weight).numel()
        threshold = float(
            kth_smallest_of_parts([weight.detach().abs().float()], [layout], max(1, round(fraction * numel)))
        )
        squares, total = squares + numel * threshold**2, total + numel
    return (squares / total) ** 0.5


def auto_lam(quantile: float, summed_lr: float, scale: float) -> float:
    """``scale * q**2 / (2 * sum(lr))``: with reweighting, a weight (block) of magnitude (norm) ``q`` loses
    about
    ``2 * lr * lam`` of its square per proximal step, so this lam brings it to zero by the phase's end
    (docs/strategies.md)."""
    if summed_lr <= 0:
        raise ValueError("lam: auto needs a positive learning rate during the proximal phase")
    return scale * quantile**2 / (2 * summed_lr)


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (k >= 1); below every value when k == 0, so nothing is pruned."""
    return kth_smallest_of_parts([values], [WHOLE], k)


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

    @torch.no_grad()
    def disagreement(self) -> str | None:
        if not self.masks.active:
            return None
        escaped, pruned = self.masks.escaped_weights()
        if not escaped:
            return None
        return f"{escaped:,} of the {pruned:,} weights its masks prune are non-zero"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.masks.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state)

    def keep_plan(self) -> dict[str, torch.Tensor] | None:
        """Each parameter's keep-mask, whole (collective when sharded), or None before any is set: the
        :meth:`compaction_plan` of a structured strategy once its pattern is fixed (compaction removes the
        all-False slices)."""
        if not self.masks.active:
            return None
        return dict(zip(self.masks.names, self.masks.whole_keep()))


class ReweightedPhaseStrategy(MaskingStrategy):
    """Base for penalty methods: push weights toward zero in ``[start, end)``, then fix a mask.

    During the phase a subclass applies its penalty in the step hooks, weighted by
    ``self.alphas`` (one tensor per name in :meth:`alpha_names`), and :meth:`reweight`
    refreshes them every ``config.reweight_every`` steps; at ``end`` :meth:`fix_pattern`
    installs the mask and sets ``self.alphas`` to None, and training goes on masked (which
    :class:`MaskingStrategy` does). The state is the alphas during the phase, the masks after.
    """

    alphas: list[torch.Tensor] | None

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        # The penalty weight in use: the config's, or with ``lam: auto`` derived at the phase's first step.
        self.lam: float | None = None if config.lam == "auto" else config.lam

    def penalty_weight(self, ctx: StepContext, params: list[torch.Tensor]) -> float:
        """``lam``; with ``lam: auto`` derived on first use (:func:`auto_lam`) from :meth:`phase_quantile` and
        the
        learning rates of ``params``' group summed from this step to the phase's end, then kept (and
        saved)."""
        if self.lam is None:
            # The mean over the parameters (not weighted by size, so every rank computes the same lam when
            # parameters are sharded): parameter groups with their own rates (layer-wise decay) shrink at
            # their own pace around it.
            summed = statistics.fmean(ctx.summed_learning_rates(params, self.schedule.end))
            self.lam = auto_lam(self.phase_quantile(), summed, self.config.lam_scale)
            logger.info(
                "%s: lam: auto is %.4g (target magnitude %.4g, learning rates summed over the phase %.4g)",
                type(self).__name__,
                self.lam,
                self.phase_quantile(),
                summed,
            )
            if ctx.lr_scheduler is None:
                logger.warning(
                    "%s: lam: auto reads the learning rates ahead from the run's scheduler, and none was "
                    "given%s: the current rate is taken to hold over the phase (pass the scheduler to "
                    "Pruner.start, or set lam by hand)",
                    type(self).__name__,
                    " although the optimizer has one (its groups carry initial_lr)"
                    if "initial_lr" in ctx.optimizer.param_groups[0]
                    else "",
                )
        return self.lam

    def phase_quantile(self) -> float:
        """The magnitude (block norm) the proximal phase should bring to zero: that at the target's quantile
        now."""
        raise NotImplementedError

    def on_step_end(self, ctx: StepContext) -> None:
        if self.masks.active:
            return
        if self.schedule.has_ended(ctx.step):
            self.fix_pattern(ctx.optimizer)
        elif (
            self.schedule.in_phase(ctx.step)
            and (ctx.step - self.schedule.start + 1) % self.config.reweight_every == 0
        ):
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

    def alpha_layouts(self) -> list[Layout]:
        """How each alpha lies across processes: whole (one per block, the default), or sharded like its
        weight."""
        return [WHOLE] * len(self.alpha_names())

    def state_dict(self) -> dict:
        derived = {"lam": self.lam} if self.config.lam == "auto" else {}
        if self.alphas is None:
            return self.masks.state_dict() | derived
        pieces = zip(self.alpha_names(), self.alphas, self.alpha_layouts())
        return {ALPHA_PREFIX + name: layout.gather(alpha).cpu() for name, alpha, layout in pieces} | derived

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if self.config.lam == "auto":
            lam = state.get("lam")
            if lam is not None and (type(lam) is not float or not lam > 0):
                raise StateError(f"saved lam {lam!r} is not a positive number")
            self.lam = lam
        self.masks.load_state_dict(state)
        if self.masks.active:
            self.alphas = None
            return
        found = {
            key[len(ALPHA_PREFIX) :]: value for key, value in state.items() if key.startswith(ALPHA_PREFIX)
        }
        names = self.alpha_names()
        if sorted(found) != sorted(names):
            missing = [n for n in names if n not in found]
            unexpected = [n for n in found if n not in names]
            parts = ([f"no mask or alpha for {missing[:3]}"] if missing else []) + (
                [f"alphas for {unexpected[:3]}, which the targets no longer match"] if unexpected else []
            )
            raise StateError(
                f"saved {type(self).__name__} state does not fit the targets: {'; '.join(parts)}"
            )
        if self.alphas is None:
            self.alphas = self.new_alphas()
        for name, alpha, layout in zip(names, self.alphas, self.alpha_layouts()):
            if found[name].shape != layout.whole_shape(alpha):
                raise StateError(
                    f"saved alpha for {name} has shape {tuple(found[name].shape)}, expected "
                    f"{tuple(layout.whole_shape(alpha))}"
                )
            alpha.copy_(layout.rows(found[name]))
