"""A plugin that cannot be imported: it needs a module that is not installed anywhere.

hfprune must record the failure with this distribution's name, keep every other strategy
usable, and explain the failure only when a recipe asks for ``strategy: broken``.
"""

import hfprune_broken_missing_dependency  # noqa: F401  (does not exist, on purpose)

from hfprune import hookimpl


@hookimpl
def hfprune_register_strategies(register):  # never reached
    raise AssertionError("hfprune_broken should have failed to import")
