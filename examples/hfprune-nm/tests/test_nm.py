"""hfprune-nm's tests: hfprune's conformance kit over the strategy, and the N:M pattern itself.

Run against the installed package (``pip install -e .``): the kit finds the strategy through
its entry point, as a recipe does.
"""

from __future__ import annotations

import json

import pytest
import torch
from hfprune_nm import nm_masks

from hfprune import Pruner, RecipeError
from hfprune.testing import FFN_TARGETS, StrategyConformance, tiny_bert


class TestNM(StrategyConformance):
    strategy = "nm"
    config = {"n": 2, "m": 4}
    distribution = "hfprune-nm"

    def test_every_group_of_m_holds_n_weights_after_training(self, conformance_run):
        """At most N non-zeros in every group of M (what the hardware needs); exactly N, since trained weights
        are never exactly 0."""
        for name in conformance_run.plan.parameters:
            nonzero = conformance_run.final_weights[name].reshape(-1, 4).count_nonzero(dim=1)
            assert int(nonzero.max()) <= 2, (
                f"{name}: a group of 4 holds {int(nonzero.max())} non-zero weights"
            )
            assert bool((nonzero == 2).all()), (
                f"{name}: {int((nonzero < 2).sum())} groups of 4 hold fewer than 2 non-zero weights"
            )


def test_masks_keep_the_largest_n_of_every_m_consecutive_inputs():
    weight = torch.tensor(
        [
            [0.1, -0.9, 0.3, 0.2, 5.0, -4.0, 3.0, 0.0],
            [0.0, 0.0, 0.0, 0.5, -1.0, 1.5, -2.0, 0.25],
        ]
    )
    pruned = torch.tensor(
        [
            [0.0, -0.9, 0.3, 0.0, 5.0, -4.0, 0.0, 0.0],
            [
                0.0,
                0.0,
                0.0,
                0.5,
                0.0,
                1.5,
                -2.0,
                0.0,
            ],  # a group with one non-zero weight keeps it and one zero
        ]
    )
    mask = nm_masks(weight, 2, 4)
    assert mask.dtype == torch.bool and torch.equal(weight * mask, pruned)
    assert mask.reshape(-1, 4).sum(dim=1).tolist() == [2, 2, 2, 2]


def started(
    config: str, schedule: str = "{start: 0, end: 4}", targets: tuple[str, ...] = FFN_TARGETS
) -> Pruner:
    recipe = (
        f"version: 1\npruners:\n  - strategy: nm\n    targets: {json.dumps(list(targets))}\n    schedule: "
        f"{schedule}\n    config: {config}\n"
    )
    pruner = Pruner(recipe)
    pruner.attach(tiny_bert())
    pruner.start(total_steps=8)
    return pruner


def test_kept_per_group_falls_from_m_to_n_along_the_cubic_ramp():
    strategy = started("{n: 2, m: 4}").strategies[0]
    # progress 0, 1/4, 1/2, 3/4, 1: 2 + round(2 * (1 - p)^3) = 2 + round(2, 0.84, 0.25, 0.03, 0)
    assert [strategy.kept_per_group(step) for step in range(6)] == [4, 3, 2, 2, 2, 2]


def test_m_must_divide_every_targeted_matrix_s_inputs():
    with pytest.raises(RecipeError) as info:
        started("{n: 1, m: 3}")
    assert info.value.key == "pruners[0].targets" and info.value.line == 4, str(info.value)
    assert (
        "m=3 does not divide the input features of bert.encoder.layer.0.intermediate.dense (32), "
        "bert.encoder.layer.0.output.dense (64), bert.encoder.layer.1.intermediate.dense (32) and 1 more"
    ) in str(info.value)


def test_targets_must_be_linear():
    with pytest.raises(
        RecipeError,
        match=r"applies to nn\.Linear weights, and these matched modules are not: "
        r"bert\.embeddings\.word_embeddings \(Embedding\)",
    ):
        started("{n: 2, m: 4}", targets=("bert.embeddings.word_embeddings",))


def test_n_must_be_below_m():
    with pytest.raises(RecipeError, match=r"pruners\[0\]\.config: n \(4\) must be below m \(4\)"):
        started("{n: 4, m: 4}")
