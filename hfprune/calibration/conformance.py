"""The conformance kit for one-shot strategy plugins: :class:`OneShotConformance`.

In a plugin's test suite::

    from hfprune.calibration.conformance import OneShotConformance


    class TestMyOneShot(OneShotConformance):
        strategy = "my-one-shot"          # the name a recipe uses
        config = {"sparsity": 0.5}        # a valid ``config:`` for the tiny model

Every check runs the strategy as ``hfprune prune`` does: found through the ``hfprune``
entry points, attached by a recipe, run by :func:`hfprune.oneshot` on a random 2-layer
BERT (:func:`hfprune.testing.tiny_bert`) with 32 labelled calibration examples of
:class:`hfprune.testing.TokenDataset`, the last positions of each padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from hfprune.calibration.driver import oneshot
from hfprune.errors import RecipeError
from hfprune.masks import MaskingStrategy
from hfprune.plugins import Registry, build_registry
from hfprune.pruner import Pruner
from hfprune.strategy import OneShotStrategy
from hfprune.testing import (
    FFN_TARGETS,
    Case,
    TokenDataset,
    _describe_items,
    _hook_count,
    _tensor_or_json,
    check_attaches,
    check_config_forbids_unknown_keys,
    check_registered,
    tiny_bert,
)

EXAMPLES, BATCH, LENGTH, PADDED = 32, 8, 16, 4


def calibration_batches(examples: int = EXAMPLES) -> list[dict[str, torch.Tensor]]:
    """Labelled TokenDataset batches whose last ``PADDED`` positions are padding."""
    data = TokenDataset(examples, LENGTH)
    batches = []
    for start in range(0, examples, BATCH):
        items = [data[i] for i in range(start, min(start + BATCH, examples))]
        mask = torch.ones(len(items), LENGTH, dtype=torch.long)
        mask[:, -PADDED:] = 0
        batches.append(
            {
                "input_ids": torch.stack([item["input_ids"] for item in items]),
                "attention_mask": mask,
                "labels": torch.tensor([item["labels"] for item in items]),
            }
        )
    return batches


class OneShotCase(Case):
    """A Case whose recipe has no ``schedule``: a one-shot strategy prunes at no training step."""

    def recipe_data(self, **config_overrides: Any) -> dict:
        data = super().recipe_data(**config_overrides)
        del data["pruners"][0]["schedule"]
        return data


@dataclass
class OneShotRun:
    """What one :func:`hfprune.oneshot` call on a fresh model did."""

    case: Case
    model: nn.Module
    pruner: Pruner
    hooks_before: int
    hooks_after: int  # counted right after pruning: transformers adds its own when asked for hidden states

    @property
    def strategy(self) -> OneShotStrategy:
        return self.pruner.strategies[0]


def prune_once(case: Case, registry: Registry) -> OneShotRun:
    model = case.model_factory()
    hooks = sum(_hook_count(m) for m in model.modules())
    pruner = oneshot(model, calibration_batches(), case.recipe(registry), registry, progress=False)
    return OneShotRun(case, model, pruner, hooks, sum(_hook_count(m) for m in model.modules()))


def check_is_one_shot(case: Case, registry: Registry) -> None:
    """The class derives from OneShotStrategy, and the training drivers refuse it with a recipe error."""
    cls = registry.get(case.strategy).cls
    if not issubclass(cls, OneShotStrategy):
        raise AssertionError(
            f"{cls.__name__} is not a hfprune.OneShotStrategy: derive from it and implement prune()"
        )
    pruner = Pruner(case.recipe(registry), registry)
    pruner.attach(case.model_factory())
    with pytest.raises(RecipeError, match="one-shot strategy"):
        pruner.start(total_steps=8)


def check_weights_match_state(run: OneShotRun) -> None:
    """After pruning, the weights are what the strategy's state says (masked weights zero)."""
    why = run.strategy.disagreement()
    if why:
        raise AssertionError(f"after prune(), {why}: zero what the masks prune (MaskSet.set does)")
    if isinstance(run.strategy, MaskingStrategy) and not run.strategy.masks.active:
        raise AssertionError("prune() set no masks: call self.masks.set(...) with what it decided")


def check_reaches_planned_sparsity(run: OneShotRun) -> None:
    """The sparsity reached is what ``hfprune check`` promised from ``planned_sparsity``."""
    planned = run.pruner.plans[0].planned_sparsity
    if planned is None:
        pytest.skip("planned_sparsity() is None: nothing promised")
    reached = run.pruner.sparsity()["sparsity"]
    if abs(reached - planned) > 1e-6:
        raise AssertionError(
            f"planned sparsity {planned:.6f}, reached {reached:.6f}: count what prune() does"
        )


def check_metrics_and_state(run: OneShotRun) -> None:
    """``metrics()`` is ``{str: float}``, ``state_dict()`` flat str keys with tensor or JSON values."""
    bad = [
        (k, v)
        for k, v in run.strategy.metrics().items()
        if not isinstance(k, str) or not isinstance(v, float)
    ]
    if bad:
        raise AssertionError(f"metrics() has {_describe_items(bad)}: str keys, Python float values")
    bad = [
        (k, v)
        for k, v in run.strategy.state_dict().items()
        if not isinstance(k, str) or not _tensor_or_json(v)
    ]
    if bad:
        raise AssertionError(f"state_dict() has {_describe_items(bad)}: str keys, tensor or JSON values")


def check_compacts(run: OneShotRun) -> None:
    """A structured strategy's plan compacts into a smaller model whose outputs equal the pruned model's."""
    if not run.strategy.compaction_plan():
        pytest.skip("no compaction plan: unstructured sparsity")
    small = run.pruner.compact(run.model)  # checks the outputs against the masked model
    if sum(p.numel() for p in small.parameters()) >= sum(p.numel() for p in run.model.parameters()):
        raise AssertionError("the compacted model is not smaller: the plan removes no head or neuron")


def check_hooks_removed(run: OneShotRun) -> None:
    """Every hook a calibration pass registered is gone afterwards."""
    if run.hooks_after != run.hooks_before:
        raise AssertionError(
            f"the model has {run.hooks_after - run.hooks_before} more hooks after prune(): remove them"
        )


def check_failure_restores_the_model(case: Case, registry: Registry) -> None:
    """When pruning fails halfway (here: right after the strategy's prune()), the weights are put back."""
    model = case.model_factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = registry.get(case.strategy).cls
    original = cls.prune

    def prune_then_fail(self, calibration):
        original(self, calibration)
        raise RuntimeError("failure injected after prune()")

    cls.prune = prune_then_fail
    try:
        with pytest.raises(RuntimeError, match="failure injected"):
            oneshot(model, calibration_batches(), case.recipe(registry), registry, progress=False)
    finally:
        cls.prune = original
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise AssertionError(f"after a failed one-shot run {changed[:3]} differ from before it")


class OneShotConformance:
    """Subclass in a plugin's tests; pytest collects a test per check (name the subclass ``Test...``).

    Set ``strategy`` and ``config``; optionally ``targets`` (default: tiny_bert's FFN matrices)
    and ``model_factory`` (a sequence classifier over at least 100 tokens; default tiny_bert).
    """

    strategy: ClassVar[str]
    config: ClassVar[dict[str, Any]] = {}
    targets: ClassVar[tuple[str, ...]] = FFN_TARGETS
    distribution: ClassVar[str | None] = None
    model_factory: ClassVar = staticmethod(tiny_bert)

    @pytest.fixture(scope="class")
    @classmethod
    def case(cls) -> Case:
        return OneShotCase(
            cls.strategy,
            dict(cls.config),
            tuple(cls.targets),
            distribution=cls.distribution,
            model_factory=cls.model_factory,
        )

    @pytest.fixture(scope="class")
    @classmethod
    def registry(cls) -> Registry:
        return build_registry()

    @pytest.fixture(scope="class")
    @classmethod
    def run(cls, case, registry) -> OneShotRun:
        check_attaches(case, registry)
        return prune_once(case, registry)

    def test_found_through_entry_points(self, case, registry):
        check_registered(case, registry)

    def test_config_forbids_unknown_keys(self, case, registry):
        check_config_forbids_unknown_keys(case, registry)

    def test_is_one_shot_and_refused_by_training(self, case, registry):
        check_is_one_shot(case, registry)

    def test_weights_match_state(self, run):
        check_weights_match_state(run)

    def test_reaches_planned_sparsity(self, run):
        check_reaches_planned_sparsity(run)

    def test_metrics_and_state(self, run):
        check_metrics_and_state(run)

    def test_compacts(self, run):
        check_compacts(run)

    def test_hooks_removed(self, run):
        check_hooks_removed(run)

    def test_failure_restores_the_model(self, case, registry):
        check_failure_restores_the_model(case, registry)
