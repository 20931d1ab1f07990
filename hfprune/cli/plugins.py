"""``hfprune plugins``: the installed strategies and architecture adapters, and who provides them."""

from __future__ import annotations

import argparse

from hfprune.cli.text_table import print_table
from hfprune.plugins import DISABLE_AUTOLOAD_ENV, default_registry


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``plugins`` subcommand to the ``hfprune`` command line."""
    plugins = commands.add_parser(
        "plugins",
        help="list installed strategies and architecture adapters and the distributions that provide them",
        description="List every strategy and architecture adapter found through the 'hfprune' entry-point "
        "group, with "
        "its plugin, distribution and version, and any plugin that failed to load. "
        f"{DISABLE_AUTOLOAD_ENV}=1 turns autoloading off.",
    )
    plugins.set_defaults(handler=run_plugins)


def run_plugins(args: argparse.Namespace) -> int:
    registry = default_registry()
    rows = [
        (s.name, s.plugin.name, s.plugin.distribution, s.plugin.version, _kind(s.cls), s.description)
        for s in registry.strategies.values()
    ]
    print_table(("strategy", "plugin", "distribution", "version", "prunes", "description"), rows)
    if registry.architectures:
        print()
        owners = registry.architecture_owners
        rows = [
            (
                a.name,
                owners[a.name].name,
                owners[a.name].distribution,
                owners[a.name].version,
                (type(a).__doc__ or "").strip().splitlines()[0],
            )
            for a in registry.architectures
        ]
        print_table(("architecture", "plugin", "distribution", "version", "recognizes"), rows)
    providers = {s.plugin.name for s in registry.strategies.values()} | {
        p.name for p in registry.architecture_owners.values()
    }
    for plugin in registry.plugins:
        if plugin.error:
            print(f"failed: plugin {plugin.name!r} from {plugin.provenance}: {plugin.error}")
        elif plugin.name not in providers:
            print(
                f"note: plugin {plugin.name!r} from {plugin.provenance} registered nothing (is its hook "
                "marked @hfprune.hookimpl?)"
            )
    for message in registry.conflicts.values():
        print(f"conflict: {message}")
    if not registry.autoload:
        print(f"note: plugin autoloading is off ({DISABLE_AUTOLOAD_ENV})")
    return 0


def _kind(strategy_class) -> str:
    """When a strategy prunes: while training (``hfprune run``, the callback) or once (``hfprune prune``)."""
    from hfprune.strategy import OneShotStrategy

    return "one-shot" if issubclass(strategy_class, OneShotStrategy) else "training"
