"""Recipes: the YAML a user writes, read with line tracking and validated before any training step.

- :mod:`~hfprune.recipe.schema`: the :class:`Recipe` model and :func:`load_recipe`.
- :mod:`~hfprune.recipe.yaml_source`: safe YAML parsing that remembers each key's line.
- :mod:`~hfprune.recipe.targets`: which modules an entry's ``targets`` select.
- :mod:`~hfprune.recipe.run_sections`: the ``model:``, ``data:`` and ``training:`` sections ``hfprune run``
reads.
- :mod:`~hfprune.recipe.builtin`: the recipes that ship with hfprune, usable by name.
"""

from hfprune.recipe.schema import PrunerEntry, Recipe, RecipeSource, load_recipe

__all__ = ["PrunerEntry", "Recipe", "RecipeSource", "load_recipe"]
