"""Old import paths of modules that moved in 0.2, kept working for one release with a DeprecationWarning.

``import hfprune.sharding`` (and ``from hfprune.sharding import ...``) still gives the module,
now :mod:`hfprune.integrations.sharding`, and warns with the new path. An import hook does
it, so the package tree holds only the modules that exist; remove this file in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "hfprune.hooks": "hfprune.model_hooks",
    "hfprune.sharding": "hfprune.integrations.sharding",
    "hfprune.peft_names": "hfprune.integrations.peft_names",
    "hfprune.lora": "hfprune.integrations.lora",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module name with the module at its new name."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path goes in hfprune 0.3", DeprecationWarning, stacklevel=2
        )
        return importlib.import_module(new)

    def exec_module(self, module):
        """The module is the new one, already executed."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
