"""The hooks a plugin may implement. Each runs once, when the plugin manager is built.

Per-step work never goes through pluggy: a strategy registered here is a class, and the
engine calls methods on its instances directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hfprune.architecture import ArchitectureAdapter
    from hfprune.strategy import Strategy

PROJECT = "hfprune"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def hfprune_register_strategies(register: Callable[[str, type[Strategy]], None]) -> None:
    """Register the strategies this plugin provides.

    Called once per plugin manager, after every plugin is loaded. Call
    ``register(name, StrategyClass)`` for each strategy; ``name`` is what a recipe's
    ``strategy:`` key says and should equal the plugin's entry-point name for its main
    strategy. Registering a name twice is an error that names both plugins. Returns nothing.
    """


@hookspec
def hfprune_register_architectures(register: Callable[[ArchitectureAdapter], None]) -> None:
    """Register adapters that teach hfprune a model family's attention and FFN blocks.

    Called once per plugin manager, after every plugin is loaded. Call ``register(adapter)``
    with an :class:`hfprune.architecture.ArchitectureAdapter` instance; strategies that
    group weights by head or neuron, and compaction, ask adapters in registration order
    which modules they recognize. Two adapters with one ``name`` is an error that names
    both plugins. Returns nothing.
    """
