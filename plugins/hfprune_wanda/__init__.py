"""Built-in plugin: Wanda, one-shot unstructured and N:M pruning by weights and activations (Sun et al.
2023, arXiv 2306.11695).

Shipped inside hfprune but found exactly as a third-party plugin is: through the ``wanda``
entry point in the ``hfprune`` group.

A weight's score is ``|W_ij| * ||X_j||``, its magnitude times the L2 norm of its input
feature over the calibration tokens: a small weight on a feature that is large (the
outlier features of LLMs) can matter more than a larger weight on a quiet one. Scores
are compared within each output row (each output loses the same share of its inputs),
which the paper finds matters as much as the activations; no weight is updated. For
N:M, every ``m`` consecutive inputs of a row keep their ``n`` best. ``score: magnitude``
is the baseline, ``|W_ij|`` alone, compared by row or, as magnitude pruning usually is, over
the whole matrix (``compare: matrix``).

As in the paper, the model is pruned a layer at a time (``sequential``, the default): each
layer's input norms are measured on what the layers below, already pruned, give it
(:meth:`hfprune.calibration.Calibration.replay`), so later layers choose knowing what earlier
ones lost. ``sequential: false`` measures every norm in one forward pass of the dense model
instead: the same cost as a single pass, for models without a layer stack hfprune knows.
Targets outside the layer stacks (an LM head) are measured after the stacks are pruned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field, model_validator

from hfprune import OneShotStrategy, StrategyConfig, hookimpl
from hfprune.architecture import stacks_holding, weight_dim
from hfprune.errors import TargetError
from hfprune.masks import MaskingStrategy, pruned_count


class WandaConfig(StrategyConfig):
    """``config:`` of the wanda strategy."""

    sparsity: float = Field(
        default=0.5, ge=0.0, lt=1.0, description="fraction of each matrix's weights zeroed"
    )
    n_m: tuple[int, int] | None = Field(
        default=None,
        strict=False,
        description="[n, m]: every m consecutive inputs of a row keep their n best (2:4 is [2, 4]); "
        "the sparsity is then 1 - n/m",
    )
    score: Literal["wanda", "magnitude"] = Field(
        default="wanda", description="'wanda': |W| times the input feature's norm; 'magnitude': |W|"
    )
    compare: Literal["row", "matrix"] = Field(
        default="row", description="'row': each output row loses the same share; 'matrix': one threshold"
    )
    sequential: bool = Field(
        default=True,
        description="measure each layer's input norms after pruning the layers below it (the paper's "
        "way); false: all from one pass of the dense model",
    )

    @model_validator(mode="after")
    def _consistent(self) -> WandaConfig:
        if self.n_m is not None:
            n, m = self.n_m
            if not 0 < n < m:
                raise ValueError(f"n_m must be [n, m] with 0 < n < m, got {list(self.n_m)}")
            if "sparsity" in self.model_fields_set and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"n_m {list(self.n_m)} prunes {1 - n / m:g} of the weights, not sparsity "
                    f"{self.sparsity:g}: give one of them"
                )
            if self.compare != "row":
                raise ValueError("n_m compares weights within groups of a row: it needs compare 'row'")
        return self

    def planned_sparsity(self) -> float:
        return 1 - self.n_m[0] / self.n_m[1] if self.n_m else self.sparsity


class WandaStrategy(OneShotStrategy, MaskingStrategy):
    """Zero each matrix's lowest-scoring weights, once, from one forward pass over the calibration data."""

    Config = WandaConfig
    min_examples = 8

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        self.modules = {f"{name}.weight": module for name, module in targets.items()}

    @classmethod
    def select_parameters(cls, targets, config):
        selected = super().select_parameters(targets, config)
        for name, module in targets.items():
            try:
                inputs = module.weight.shape[weight_dim(module, "in")]
            except TypeError as exc:
                raise TargetError(f"{name}: {exc}") from None
            if config.n_m and inputs % config.n_m[1]:
                raise TargetError(f"{name} has {inputs} inputs, not a multiple of m = {config.n_m[1]}")
        return selected

    @classmethod
    def planned_sparsity(cls, targets, parameters, config):
        if config.n_m or config.compare == "matrix":
            return config.planned_sparsity()
        pruned = total = 0
        for module in targets.values():
            rows_dim = weight_dim(module, "out")
            rows, inputs = module.weight.shape[rows_dim], module.weight.shape[1 - rows_dim]
            pruned += rows * pruned_count(config.sparsity, inputs)
            total += rows * inputs
        return pruned / max(total, 1)

    def prune(self, calibration) -> None:
        keeps: dict[str, torch.Tensor] = {}
        if self.config.score == "wanda":
            remaining = dict(self.modules)
            if self.config.sequential:
                stacks = stacks_holding(calibration.model, self.modules.values(), self.targets.architectures)
                for stack in stacks:
                    self._prune_stack(calibration, stack, remaining, keeps)
            if remaining:
                with _input_norms(remaining, calibration) as norms:
                    calibration.forward_passes("wanda: input norms")
                keeps |= {name: self._keep(name, norms[name]) for name in remaining}
        else:
            keeps = {name: self._keep(name, None) for name in self.modules}
        self.masks.set([keeps[name] for name in self.masks.names], optimizer=None)

    def _prune_stack(self, calibration, stack, remaining: dict, keeps: dict) -> None:
        """Prune the targets in ``stack`` a layer at a time, each from its input as the pruned layers below
        make it; those done leave ``remaining`` for ``keeps``."""
        in_stack = {id(module) for module in stack.modules()}
        left = sum(id(module) in in_stack for module in remaining.values())
        replay = calibration.replay(stack)
        hidden = replay.inputs()
        for layer in calibration.bar(stack, "wanda: layer by layer"):
            inside = {id(module) for module in layer.modules()}
            targets = {name: module for name, module in remaining.items() if id(module) in inside}
            if targets:
                with _input_norms(targets, calibration) as norms:
                    for index, states in enumerate(hidden):
                        replay.call(layer, index, states)
                for name in targets:
                    keeps[name] = self._keep(name, norms[name])
                    self.modules[name].weight.data.mul_(keeps[name])  # what the layers above will see
                    del remaining[name]
                left -= len(targets)
            if not left:
                break  # no target above: advancing the replay further would be wasted passes
            hidden = replay.run(layer, hidden)

    def _keep(self, name: str, norms: torch.Tensor | None) -> torch.Tensor:
        """The keep-mask of target ``name`` (shaped like its weight) from its squared input norms, if any."""
        module = self.modules[name]
        rows_dim = weight_dim(module, "out")
        score = module.weight.detach().abs().float()
        score = score if rows_dim == 0 else score.t()  # (outputs, inputs)
        if norms is not None:
            score = score * norms.sqrt()
        keep = keep_mask(score, self.config)
        return keep if rows_dim == 0 else keep.t()


@contextmanager
def _input_norms(modules: dict, calibration) -> Iterator[dict[str, torch.Tensor]]:
    """While open, each module's squared input-feature norms summed over the calibration tokens that pass
    through it (padding left out); on closing, a module that never ran is a TargetError."""
    sums = {name: None for name in modules}

    def hook(name):
        def accumulate(module, args):
            rows = calibration.select_rows(args[0].detach()).float()
            squares = rows.square().sum(0)
            sums[name] = squares if sums[name] is None else sums[name] + squares

        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()
    missed = [name for name, value in sums.items() if value is None]
    if missed:
        raise TargetError(f"{missed[0]} never ran in the calibration passes: its inputs cannot be measured")


def keep_mask(score: torch.Tensor, config: WandaConfig) -> torch.Tensor:
    """Which weights of an (outputs, inputs) score matrix stay: the best by row, N:M group or matrix."""
    if config.n_m:
        n, m = config.n_m
        groups = score.unflatten(1, (-1, m))
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.flatten(1)
    if config.compare == "matrix":
        pruned = pruned_count(config.sparsity, score.numel())
        keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
        keep[score.flatten().argsort()[:pruned]] = False
        return keep.view_as(score)
    pruned = pruned_count(config.sparsity, score.shape[1])
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1)[:, :pruned], False)
    return keep


@hookimpl
def hfprune_register_strategies(register):
    register("wanda", WandaStrategy)
