"""Parse YAML safely while remembering the line of every key and list item.

Recipe errors name a line, so the parser keeps a map from key paths such as
``("pruners", 0, "config", "sparsity")`` to 1-based line numbers. Only PyYAML's safe
constructor is used: tags that would build Python objects are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from hfprune.errors import Problem, RecipeError

KeyPath = tuple[str | int, ...]

# Aliases can make a small file describe an enormous tree; a recipe never needs this many nodes.
MAX_NODES = 100_000
MAX_CHARS = 1_000_000


def format_key_path(path: KeyPath) -> str:
    """``("pruners", 0, "config")`` -> ``pruners[0].config``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML document plus the line of each key path in it."""

    data: Any
    source: str
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


def parse_yaml(text: str, source: str) -> YamlDocument:
    """Parse one YAML document with the safe loader; raise RecipeError with a line on failure."""
    if len(text) > MAX_CHARS:
        raise RecipeError(source, [Problem("", f"recipe is {len(text)} characters; at most {MAX_CHARS} are read")])
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError(source, [Problem("", "recipe is empty", line=1)])
        lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
        _index_lines(node, (), lines, source, budget=[MAX_NODES])
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        message = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise RecipeError(source, [Problem("", f"invalid YAML: {message}", line=line)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(source, [Problem("", f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    return YamlDocument(data=data, source=source, lines=lines)


def _index_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], source: str, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise RecipeError(source, [Problem(format_key_path(path), f"recipe has more than {MAX_NODES} YAML nodes")])
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                raise RecipeError(source, [Problem(format_key_path(path), "mapping keys must be plain scalars", line)])
            key = key_node.value
            child = (*path, key)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(source, [Problem(format_key_path(child), "key appears twice in the same mapping", line)])
            seen.add(key)
            lines[child] = line
            _index_lines(value_node, child, lines, source, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            _index_lines(item, child, lines, source, budget)
