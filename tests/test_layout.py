"""The package's shape: no import cycle inside hfprune, the library apart from the command, moved paths still
working."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hfprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(path: Path, known: set[str]) -> set[str]:
    """The hfprune modules ``path`` imports anywhere (lazily inside functions too), but not under ``if
    TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from hfprune.cli import run`` imports the submodule when there is one, else the package
            found.update(
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            )
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, set(known)) - {name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_inside_hfprune():
    graph = import_graph()
    assert "hfprune.pruner" in graph and graph["hfprune.pruner"]  # the graph is really read
    assert cycles(graph) == []


def test_the_library_never_imports_the_command():
    graph = import_graph()
    library = [name for name in graph if not name.startswith("hfprune.cli")]
    assert {
        name: sorted(d for d in graph[name] if d.startswith("hfprune.cli"))
        for name in library
        if any(d.startswith("hfprune.cli") for d in graph[name])
    } == {}


def test_the_layer_lasso_strategy_does_not_import_ldnets_models():
    for path in (ROOT / "plugins" / "hfprune_layer_lasso").glob("*.py"):
        assert "hfprune_ldnet" not in path.read_text(encoding="utf-8"), path


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("hfprune.hooks", "hfprune.model_hooks"),
        ("hfprune.sharding", "hfprune.integrations.sharding"),
        ("hfprune.peft_names", "hfprune.integrations.peft_names"),
        ("hfprune.lora", "hfprune.integrations.lora"),
    ],
)
def test_moved_modules_import_by_their_old_path_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
    sys.modules.pop(old, None)
