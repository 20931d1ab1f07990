"""hfprune: prune Hugging Face models during training from a YAML recipe."""

from hfprune import _moved
from hfprune.calibration import CalibrationError, oneshot
from hfprune.errors import CompactionError, HfpruneError, PluginError, RecipeError, StateError
from hfprune.hookspecs import hookimpl
from hfprune.integrations.lora import keep_sparse, merge_lora
from hfprune.optimizer import PruneOptimizer
from hfprune.pruner import Pruner
from hfprune.recipe.schema import Recipe, load_recipe
from hfprune.strategy import OneShotStrategy, StepContext, Strategy, StrategyConfig

__version__ = "0.2.0"

_moved.install()

__all__ = [
    "CalibrationError",
    "CompactionError",
    "HfpruneError",
    "PluginError",
    "PruneCallback",
    "PruneOptimizer",
    "OneShotStrategy",
    "Pruner",
    "Recipe",
    "RecipeError",
    "StateError",
    "StepContext",
    "Strategy",
    "StrategyConfig",
    "hookimpl",
    "keep_sparse",
    "load_compacted",
    "load_recipe",
    "merge_lora",
    "oneshot",
]


def __getattr__(name: str):
    # The Trainer callback and the loader import transformers (seconds); plugins and the CLI's fast paths need
    # not pay for it.
    if name == "PruneCallback":
        from hfprune.callback import PruneCallback

        return PruneCallback
    if name == "load_compacted":
        from hfprune.compaction.loading import load_compacted

        return load_compacted
    raise AttributeError(f"module 'hfprune' has no attribute {name!r}")
