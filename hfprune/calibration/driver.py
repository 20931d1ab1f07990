"""``hfprune.oneshot``: prune a trained model from calibration data, with no retraining.

The same recipes, plugins, targets and compaction as training, driven differently: the
pruner attaches to the model as for training, then each one-shot strategy
(:class:`hfprune.strategy.OneShotStrategy`) prunes once from the calibration passes
it asks for. Nothing is half done: if any step fails, the model's weights are put back
as they were and the error is raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hfprune.calibration.passes import Calibration, CalibrationError
from hfprune.plugins import Registry
from hfprune.pruner import Pruner, unwrap_model
from hfprune.recipe.schema import RecipeSource


def oneshot(
    model: nn.Module,
    data: Iterable[Mapping[str, torch.Tensor]],
    recipe: RecipeSource,
    registry: Registry | None = None,
    progress: bool = True,
) -> Pruner:
    """Prune ``model`` in place by ``recipe``'s one-shot strategies, measured on ``data``; the pruner.

    ``data`` is the calibration batches, as a data loader gives them (``input_ids``,
    ``attention_mask``, and ``labels`` for strategies that rank by the loss). The returned
    :class:`~hfprune.Pruner` holds what was decided: ``pruner.compact(model)`` gives the
    smaller model of a structured recipe, ``pruner.sparsity()`` what each entry zeroed.
    A RecipeError (before any pass) names a recipe problem, a CalibrationError data that
    cannot be used; after any failure the model's weights are what they were.
    """
    pruner = Pruner(recipe, registry)
    pruner.attach(model)
    pruner.start(total_steps=1, one_shot=True)
    calibration = Calibration(unwrap_model(model), data, progress=progress)
    for plan, strategy in zip(pruner.plans, pruner.strategies):
        if calibration.examples < strategy.min_examples:
            pruner.close()
            raise CalibrationError(
                f"pruners[{plan.index}] ({plan.label}) needs at least {strategy.min_examples} calibration "
                f"examples to rank by, and the data has {calibration.examples}"
            )
    saved = {name: value.detach().clone() for name, value in model.state_dict().items()}
    was_training = model.training
    model.eval()  # dropout off: every pass measures the model that will be used
    try:
        for strategy in pruner.strategies:
            strategy.prune(calibration)
    except BaseException:
        pruner.close()
        with torch.no_grad():
            model.load_state_dict(saved)
        raise
    finally:
        model.train(was_training)
    return pruner
