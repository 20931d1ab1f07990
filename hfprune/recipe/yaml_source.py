"""Parse YAML safely while remembering the line of every key and list item.

Recipe errors name a line, so the parser keeps a map from key paths such as
``("pruners", 0, "config", "sparsity")`` to 1-based line numbers. Only PyYAML's safe
constructor is used: tags that would build Python objects are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hfprune.errors import Problem, RecipeError

KeyPath = tuple[str | int, ...]
_PLAIN_KEY = re.compile(r"[^\s.\[\]'\"]+")

# Aliases can make a small file describe an enormous tree; a recipe never needs this many nodes.
MAX_NODES = 100_000
MAX_CHARS = 1_000_000


def format_key_path(path: KeyPath) -> str:
    """``("pruners", 0, "config")`` -> ``pruners[0].config``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:  # an empty key, or one a reader could not tell apart from the path around it
            text += f"[{part!r}]"
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


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, whose constructors' own failures (``!!int abc``, ``!!timestamp x``) become YAML
    errors at the node."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError):
            what = repr(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
            raise yaml.constructor.ConstructorError(
                None, None, f"{what} is not a valid !!{node.tag.rsplit(':', 1)[-1]}", node.start_mark
            ) from None


# YAML 1.1, which PyYAML follows, reads 1e-5 and 1.0e5 as strings; YAML 1.2 and users mean numbers, and recipe
# numbers are strict (a string is never taken for one), so exponents without a dot or a sign are floats too.
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def read_recipe_text(path: Path) -> str:
    """The text of the recipe file at ``path``, read only up to one character past ``MAX_CHARS``: a file too
    long for :func:`parse_yaml` is refused without ever being held in memory whole."""
    with path.open(encoding="utf-8") as file:
        return file.read(MAX_CHARS + 1)


def parse_yaml(text: str, source: str) -> YamlDocument:
    """Parse one YAML document with the safe loader; raise RecipeError with a line on failure."""
    if len(text) > MAX_CHARS:
        past = text.count("\n", 0, MAX_CHARS) + 1  # the line that runs past the limit
        raise RecipeError(
            source, [Problem("", f"recipe is longer than {MAX_CHARS} characters, the most read", line=past)]
        )
    try:
        loader = _SafeLoader(text)  # the reader refuses non-printable characters here, before any parsing
    except yaml.reader.ReaderError as exc:
        raise RecipeError(source, [_unreadable(exc, text)]) from None
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
    except yaml.reader.ReaderError as exc:
        raise RecipeError(source, [_unreadable(exc, text)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(source, [Problem("", f"invalid YAML: {exc}", line=loader.line + 1)]) from None
    except RecursionError:
        raise RecipeError(
            source, [Problem("", "invalid YAML: collections nest too deeply", line=loader.line + 1)]
        ) from None
    finally:
        loader.dispose()
    return YamlDocument(data=data, source=source, lines=lines)


def _unreadable(exc: yaml.reader.ReaderError, text: str) -> Problem:
    """A character YAML does not allow, at its line."""
    character = exc.character if isinstance(exc.character, int) else ord(exc.character)
    line = text.count("\n", 0, exc.position) + 1
    return Problem("", f"invalid YAML: unacceptable character #x{character:04x}: {exc.reason}", line=line)


def _index_lines(
    node: yaml.Node,
    path: KeyPath,
    lines: dict[KeyPath, int],
    source: str,
    budget: list[int],
    inside: frozenset[int] = frozenset(),
) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise RecipeError(
            source, [Problem(format_key_path(path), f"recipe has more than {MAX_NODES} YAML nodes")]
        )
    if id(node) in inside:
        line = lines.get(path, node.start_mark.line + 1)
        raise RecipeError(
            source, [Problem(format_key_path(path), "an alias refers to a collection that contains it", line)]
        )
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        inside = inside | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                raise RecipeError(
                    source, [Problem(format_key_path(path), "mapping keys must be plain scalars", line)]
                )
            key = key_node.value
            child = (*path, key)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(
                    source, [Problem(format_key_path(child), "key appears twice in the same mapping", line)]
                )
            seen.add(key)
            lines[child] = line
            _index_lines(value_node, child, lines, source, budget, inside)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            _index_lines(item, child, lines, source, budget, inside)
