"""The conformance kit, hfprune.testing: every built-in strategy passes it, and each of its checks fails on a
strategy that breaks its rule.

The built-ins are held to the contract a third-party plugin is; the broken strategies show
that a check can fail, and that its message names the problem.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from pydantic import ConfigDict

from hfprune import Strategy, StrategyConfig, hookimpl
from hfprune.plugins import build_registry
from hfprune.testing import (
    Case,
    StrategyConformance,
    check_attaches,
    check_close_restores_the_model,
    check_compaction_plan_fits_the_model,
    check_compaction_plan_is_fixed,
    check_config_forbids_unknown_keys,
    check_describes_what_it_acts_on,
    check_loss_finite,
    check_masked_optimizer_state_stays_zero,
    check_masked_weights_stay_zero,
    check_metrics,
    check_reaches_planned_sparsity,
    check_registered,
    check_resume_is_exact,
    check_state_dict,
    train,
)
from hfprune_magnitude import MagnitudeStrategy


class BuiltIn(StrategyConformance):
    distribution = (
        "hfprune"  # found through hfprune's own entry points, as a third-party plugin is through its
    )


class TestMagnitude(BuiltIn):
    strategy = "magnitude"
    config = {"sparsity": 0.5, "initial_sparsity": 0.2}


class TestRPP(BuiltIn):
    strategy = "rpp"
    config = {"sparsity": 0.5, "lam": 0.01, "reweight_every": 2}


class TestBlockLassoHeads(BuiltIn):
    strategy = "block-lasso"
    targets = ("BertLayer",)
    config = {"group": "head", "ratio": 0.5, "lam": 0.01, "reweight_every": 2}


class TestBlockLassoNeurons(BuiltIn):
    strategy = "block-lasso"
    targets = ("BertLayer",)
    config = {"group": "neuron", "ratio": 0.5, "lam": 0.01, "form": "penalty", "reweight_every": 2}


class TestImportanceHeads(BuiltIn):
    strategy = "importance"
    targets = ("BertLayer",)
    config = {"group": "head", "ratio": 0.5}


class TestImportanceNeurons(BuiltIn):
    strategy = "importance"
    targets = ("BertLayer",)
    config = {"group": "neuron", "ratio": 0.5, "criterion": "fisher", "scope": "global"}


class TestLayerLasso(BuiltIn):
    strategy = "layer-lasso"
    targets = ("bert.encoder.layer",)
    config = {"keep": 1, "gate_lr": 0.2, "dropout": 0.2}


# --- the kit catches what it says it checks -----------------------------------------------------
# Each strategy below breaks one rule; the check for that rule must fail on it and say why.


class LaxConfig(StrategyConfig):
    model_config = ConfigDict(extra="ignore", frozen=True)


class LaxConfigStrategy(Strategy):
    """Accepts any config key."""

    Config = LaxConfig


class MisnamedStrategy(Strategy):
    """Names its parameters without their module path."""

    @classmethod
    def select_parameters(cls, targets, config):
        return {f"{name.rsplit('.', 2)[-2]}.weight": module.weight for name, module in targets.items()}


class SilentStrategy(Strategy):
    """Selects no parameters and does not describe what it acts on."""

    @classmethod
    def select_parameters(cls, targets, config):
        return {}


class UnmaskedStepStrategy(MagnitudeStrategy):
    """Overrides the step hooks without calling super(), so masks are never applied."""

    def before_optimizer_step(self, ctx):
        pass

    def after_optimizer_step(self, ctx):
        pass


class NoOptimizerStrategy(MagnitudeStrategy):
    """Installs masks without the optimizer, so Adam's moments survive where the masks prune."""

    def on_step_end(self, ctx):
        super().on_step_end(replace(ctx, optimizer=None))


class NaNStrategy(MagnitudeStrategy):
    """Breaks a weight at step 3."""

    def after_optimizer_step(self, ctx):
        super().after_optimizer_step(ctx)
        if ctx.step == 3:
            self.masks.params[0].data.fill_(float("nan"))


class OverpromisingStrategy(MagnitudeStrategy):
    """Tells `hfprune check` 90% and reaches its sparsity setting."""

    @classmethod
    def planned_sparsity(cls, targets, parameters, config):
        return 0.9


class TensorMetricsStrategy(MagnitudeStrategy):
    """Logs a tensor."""

    def metrics(self):
        return {"kept": torch.tensor(0.5)}


class NestedStateStrategy(MagnitudeStrategy):
    """Nests its tensors one level down."""

    def state_dict(self):
        return {"masks": super().state_dict()}


class ForgetfulStrategy(MagnitudeStrategy):
    """Saves its bookkeeping but not its masks, so a resumed run trains unmasked."""

    def state_dict(self):
        return {"updated_for": self.updated_for}


class FloatPlanStrategy(MagnitudeStrategy):
    """Offers float masks for compaction."""

    def compaction_plan(self):
        return (
            {name: keep.float() for name, keep in zip(self.masks.names, self.masks.keep())}
            if self.masks.active
            else None
        )


class EarlyPlanStrategy(MagnitudeStrategy):
    """Offers its masks for compaction while the ramp still changes them."""

    def compaction_plan(self):
        return dict(zip(self.masks.names, self.masks.keep())) if self.masks.active else None


class StickyHookStrategy(MagnitudeStrategy):
    """Halves a layer's output through a forward hook that close() leaves behind."""

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        next(iter(targets.values())).register_forward_hook(lambda module, args, output: output * 0.5)


class PatchingStrategy(MagnitudeStrategy):
    """Replaces a Linear's forward with one that halves its output, and never restores it."""

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        module = next(iter(targets.values()))
        module.forward = lambda inputs: 0.5 * torch.nn.Linear.forward(module, inputs)


BROKEN = {
    "lax-config": LaxConfigStrategy,
    "misnamed": MisnamedStrategy,
    "silent": SilentStrategy,
    "unmasked-step": UnmaskedStepStrategy,
    "no-optimizer": NoOptimizerStrategy,
    "nan": NaNStrategy,
    "overpromising": OverpromisingStrategy,
    "tensor-metrics": TensorMetricsStrategy,
    "nested-state": NestedStateStrategy,
    "forgetful": ForgetfulStrategy,
    "float-plan": FloatPlanStrategy,
    "early-plan": EarlyPlanStrategy,
    "sticky-hook": StickyHookStrategy,
    "patching": PatchingStrategy,
}
MAGNITUDE_CONFIG = {"sparsity": 0.5}


class BrokenPlugin:
    @hookimpl
    def hfprune_register_strategies(self, register):
        for name, cls in BROKEN.items():
            register(name, cls)


@pytest.fixture(scope="module")
def registry():
    return build_registry(extra_plugins={"broken": BrokenPlugin()})


def test_registration_check_names_what_is_missing_or_foreign(registry):
    with pytest.raises(
        AssertionError,
        match=r"(?s)'magnitud' is not available .*did you mean "
        r"'magnitude'.*\[project\.entry-points\.hfprune\]",
    ):
        check_registered(Case("magnitud", MAGNITUDE_CONFIG), registry)
    with pytest.raises(
        AssertionError, match="comes from distribution hfprune 0.2.0 .*not 'hfprune-magnitude'"
    ):
        check_registered(Case("magnitude", MAGNITUDE_CONFIG, distribution="hfprune-magnitude"), registry)


def test_config_check_catches_a_config_that_ignores_unknown_keys(registry):
    with pytest.raises(AssertionError, match="LaxConfig accepted the unknown key"):
        check_config_forbids_unknown_keys(Case("lax-config"), registry)


def test_attach_check_catches_parameter_names_the_model_does_not_use(registry):
    with pytest.raises(
        AssertionError,
        match="select_parameters returned 'intermediate.weight', which is not the model's parameter",
    ):
        check_attaches(Case("misnamed"), registry)


def test_attach_check_shows_the_recipe_error(registry):
    with pytest.raises(
        AssertionError,
        match="does not attach to BertForSequenceClassification:\n.*'no_such_module' matches no module",
    ):
        check_attaches(Case("magnitude", MAGNITUDE_CONFIG, targets=("no_such_module",)), registry)


def test_describe_check_catches_a_strategy_that_selects_nothing_and_says_nothing(registry):
    with pytest.raises(AssertionError, match=r"SilentStrategy selects no parameters.*returned \[\]"):
        check_describes_what_it_acts_on(Case("silent"), registry)


CAUGHT_BY = {  # a broken strategy: the check that must fail on its run, and what it must say
    "unmasked-step": (
        check_masked_weights_stay_zero,
        r"after optimizer step 3, \d+ weights of .* are non-zero where the mask prunes",
    ),
    "no-optimizer": (
        check_masked_optimizer_state_stays_zero,
        r"after optimizer step 2, the optimizer state 'exp_avg' of .*self\.masks\.set\(masks, "
        r"ctx\.optimizer\)",
    ),
    "nan": (check_loss_finite, r"the mean training loss over 8 steps is nan"),
    "overpromising": (
        check_reaches_planned_sparsity,
        r"planned_sparsity\(\) is 0\.9000 .*the targets are 0\.5000 zeros",
    ),
    "tensor-metrics": (check_metrics, r"metrics\(\) after step 0 has 'kept': Tensor"),
    "nested-state": (check_state_dict, r"state_dict\(\) after step 0 has 'masks': dict"),
    "float-plan": (
        check_compaction_plan_fits_the_model,
        r"compaction_plan\(\)\['bert\.encoder\.layer\.0\.intermediate\.dense\.weight'\] after step 0 is a "
        r"torch\.float32 tensor",
    ),
    "early-plan": (
        check_compaction_plan_is_fixed,
        r"compaction_plan\(\) after step 2 differs from the one after step 0",
    ),
    "sticky-hook": (
        check_close_restores_the_model,
        r"modules \['bert\.encoder\.layer\.0\.intermediate\.dense'\] still have hooks",
    ),
    "patching": (check_close_restores_the_model, r"outputs differ from a fresh model's"),
}


@pytest.mark.parametrize("name", CAUGHT_BY)
def test_run_checks_catch_the_strategy_that_breaks_their_rule(registry, tmp_path, name):
    check, message = CAUGHT_BY[name]
    run = train(Case(name, MAGNITUDE_CONFIG), registry, tmp_path)
    with pytest.raises(AssertionError, match=message):
        check(run)


def test_resume_check_catches_state_that_is_not_saved(registry, tmp_path):
    run = train(Case("forgetful", MAGNITUDE_CONFIG), registry, tmp_path / "run")
    with pytest.raises(AssertionError, match=r"after step 5 \(after-end\) .*: weights \[.*\] differ"):
        check_resume_is_exact(run, "after-end", tmp_path / "resumed")
