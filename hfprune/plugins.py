"""Finding plugins: the plugin manager, entry points, and the registry of what they provide.

Every strategy and architecture adapter, built-in or third-party, arrives the same way: a
distribution declares a module in the ``hfprune`` entry-point group, the module implements
``hfprune_register_strategies`` and/or ``hfprune_register_architectures``, and the
registry records who provided what.

``HFPRUNE_DISABLE_PLUGIN_AUTOLOAD=1`` stops entry points from loading;
``HFPRUNE_PLUGINS=name,name`` then loads just those entry points.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
from dataclasses import dataclass, replace

import pluggy

from hfprune import hookspecs
from hfprune.architecture import ArchitectureAdapter
from hfprune.errors import PluginError
from hfprune.strategy import Strategy

ENTRY_POINT_GROUP = "hfprune"
DISABLE_AUTOLOAD_ENV = "HFPRUNE_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "HFPRUNE_PLUGINS"
NOT_DISTRIBUTED = "(registered in code)"


@dataclass(frozen=True)
class PluginInfo:
    """One plugin: its entry-point name, where it came from, and why it failed if it did."""

    name: str
    distribution: str
    version: str
    error: str | None = None

    @property
    def provenance(self) -> str:
        return f"{self.distribution} {self.version}".strip()


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy and the plugin that registered it."""

    name: str
    cls: type[Strategy]
    plugin: PluginInfo

    @property
    def description(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class Registry:
    """The strategies (looked up by recipe name) and architecture adapters available in this process.

    Faults (a plugin that failed to load, two plugins claiming one name) are kept, not
    raised, so one broken package blocks only the recipes that ask for what it touches.
    """

    def __init__(
        self,
        plugins: list[PluginInfo],
        strategies: dict[str, StrategyInfo],
        conflicts: dict[str, str],
        autoload: bool,
        architectures: list[ArchitectureAdapter] | None = None,
        architecture_owners: dict[str, PluginInfo] | None = None,
    ):
        self.plugins = plugins
        self.strategies = strategies
        self.architectures = architectures or []
        self.architecture_owners = architecture_owners or {}  # adapter name -> the plugin that registered it
        self.conflicts = conflicts
        self.autoload = autoload

    def get(self, name: str) -> StrategyInfo:
        """The strategy called ``name``; PluginError explains why when there is none."""
        if name in self.conflicts:
            raise PluginError(self.conflicts[name])
        if name in self.strategies:
            return self.strategies[name]
        raise PluginError(self.explain_missing(name))

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def explain_missing(self, name: str) -> str:
        same_name = [p for p in self.failed if p.name == name]
        if same_name:
            plugin = same_name[0]
            return (
                f"strategy {name!r} is provided by plugin {name!r} of distribution {plugin.provenance}, "
                f"which failed to load: {plugin.error}"
            )
        parts = [f"unknown strategy {name!r}"]
        close = difflib.get_close_matches(name, list(self.strategies), n=1)
        if close:
            parts.append(f"did you mean {close[0]!r}?")
        installed = ", ".join(f"{s.name} ({s.plugin.provenance})" for s in self.strategies.values()) or "none"
        parts.append(f"installed strategies: {installed}")
        if self.failed:
            parts.append(
                "plugins that failed to load: "
                + ", ".join(f"{p.name} ({p.provenance}): {p.error}" for p in self.failed)
            )
        if not self.autoload:
            parts.append(f"plugin autoloading is off ({DISABLE_AUTOLOAD_ENV}); name plugins in {PLUGINS_ENV}")
        return "; ".join(parts)


def _autoload_setting() -> tuple[bool, set[str]]:
    disabled = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")
    wanted = {n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()}
    return not disabled, wanted


class _Loader:
    """Builds one registry: loads plugins, records every fault against the plugin that caused it."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.modules: dict[str, object] = {}
        self.strategies: dict[str, StrategyInfo] = {}
        self.conflicts: dict[str, str] = {}
        self.architectures: list[ArchitectureAdapter] = []
        self.architecture_owners: dict[str, PluginInfo] = {}

    def fail(self, name: str, error: str) -> None:
        self.infos[name] = replace(self.infos[name], error=error)
        if self.manager.has_plugin(name):
            self.manager.unregister(name=name)

    def add(self, name: str, info: PluginInfo, load) -> None:
        if name in self.infos:
            first = self.infos[name]
            self.conflicts.setdefault(
                name, f"plugin name {name!r} is declared by both {first.provenance} and {info.provenance}"
            )
            return
        self.infos[name] = info
        try:
            plugin = load()
            self.manager.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001 - any failure is reported with its distribution
            self.fail(name, f"{type(exc).__name__}: {exc}")
            return
        unknown = [c.name for c in self.manager.get_hookcallers(plugin) or [] if c.spec is None]
        if unknown:
            self.fail(
                name,
                f"implements unknown hook(s) {', '.join(unknown)}; hooks are listed in hfprune.hookspecs",
            )
        else:
            self.modules[name] = plugin

    def collect(self) -> None:
        """Ask each loaded plugin alone what it registers, so a fault is pinned on the plugin that caused
        it."""
        for name, plugin in self.modules.items():
            strategies = self._registrations("hfprune_register_strategies", name, plugin)
            adapters = self._registrations("hfprune_register_architectures", name, plugin)
            if strategies is None or adapters is None:
                continue
            for strategy_name, cls in strategies:
                self.register(self.infos[name], strategy_name, cls)
            for (adapter,) in adapters:
                self.register_architecture(self.infos[name], adapter)

    def _registrations(self, hook: str, name: str, plugin: object) -> list[tuple] | None:
        """The argument tuples ``plugin`` passed to ``register`` in ``hook``; None (plugin marked failed) if
        it raised."""
        calls: list[tuple] = []
        caller = self.manager.subset_hook_caller(
            hook, remove_plugins=[p for p in self.modules.values() if p is not plugin]
        )
        try:
            caller(register=lambda *args: calls.append(args))
        except Exception as exc:  # noqa: BLE001 - a failing plugin must not take the others down
            self.fail(name, f"{hook} raised {type(exc).__name__}: {exc}")
            return None
        return calls

    def register_architecture(self, plugin: PluginInfo, adapter: ArchitectureAdapter) -> None:
        if not isinstance(adapter, ArchitectureAdapter):
            self.conflicts[f"architecture {adapter!r}"] = (
                f"plugin {plugin.name!r} ({plugin.provenance}) registered {adapter!r}, not an "
                "ArchitectureAdapter instance"
            )
            return
        owner = self.architecture_owners.get(adapter.name)
        if owner is not None:
            self.conflicts[f"architecture {adapter.name}"] = (
                f"architecture adapter {adapter.name!r} is registered by both {owner.name!r} "
                f"({owner.provenance}) "
                f"and {plugin.name!r} ({plugin.provenance}); the first is used"
            )
            return
        self.architecture_owners[adapter.name] = plugin
        self.architectures.append(adapter)

    def register(self, plugin: PluginInfo, name: str, cls: type[Strategy]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            self.conflicts[name] = (
                f"plugin {plugin.name!r} ({plugin.provenance}) registered {name!r} as {cls!r}, not a "
                "Strategy subclass"
            )
        elif name in self.strategies:
            other = self.strategies[name].plugin
            self.conflicts[name] = (
                f"strategy {name!r} is registered by both {other.name!r} ({other.provenance}) and "
                f"{plugin.name!r} ({plugin.provenance}); "
                "uninstall one of them"
            )
        else:
            self.strategies[name] = StrategyInfo(name, cls, plugin)


def build_registry(extra_plugins: dict[str, object] | None = None) -> Registry:
    """Load plugins from entry points (as the environment allows) plus ``extra_plugins``; collect what they
    register.

    ``extra_plugins`` maps a plugin name to a module or object with hook implementations,
    registered in code (for tests and embedding) beside the installed ones.
    """
    autoload, wanted = _autoload_setting()
    loader = _Loader()
    found_names = set()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found_names.add(entry_point.name)
        if autoload or entry_point.name in wanted:
            dist = entry_point.dist
            info = (
                PluginInfo(entry_point.name, dist.name, dist.version)
                if dist
                else PluginInfo(entry_point.name, "(unknown distribution)", "")
            )
            loader.add(entry_point.name, info, entry_point.load)
    for name in sorted(wanted - found_names):
        loader.infos[name] = PluginInfo(
            name,
            f"({PLUGINS_ENV})",
            "",
            error=f"no installed distribution has an entry point {name!r} in group {ENTRY_POINT_GROUP!r}",
        )
    for name, plugin in (extra_plugins or {}).items():
        loader.add(name, PluginInfo(name, NOT_DISTRIBUTED, ""), lambda plugin=plugin: plugin)
    loader.collect()
    return Registry(
        list(loader.infos.values()),
        loader.strategies,
        loader.conflicts,
        autoload,
        loader.architectures,
        loader.architecture_owners,
    )


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry, built on first use."""
    return build_registry()
