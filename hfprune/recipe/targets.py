"""Which modules a recipe entry applies to.

A target is a module name (exact, or a dotted suffix such as ``attention.output.dense``),
``re:PATTERN`` (a regular expression matched against the whole name), or a module
class name such as ``Linear``. ``exclude`` uses the same forms and also drops everything
inside an excluded module. Names are the user's (:mod:`hfprune.integrations.peft_names`): in a model
peft wrapped, a target may also be spelled as peft does (``base_model.model.`` prefix,
``.base_layer``), and it selects the wrapped layer, never its adapters.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property

from torch import nn

from hfprune.integrations.peft_names import ModelView, model_view
from hfprune.integrations.sharding import plain_class

REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class TargetPattern:
    """One target string, compiled once."""

    text: str

    @cached_property
    def regex(self) -> re.Pattern[str] | None:
        return re.compile(self.text[len(REGEX_PREFIX) :]) if self.text.startswith(REGEX_PREFIX) else None

    def matches(self, names: tuple[str, ...], module: nn.Module) -> bool:
        """Whether the target selects ``module``, known by any of ``names``."""
        if self.regex is None and plain_class(module).__name__ == self.text:
            return True
        return any(self._matches_name(n) for n in names)

    def _matches_name(self, name: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(name) is not None
        return name == self.text or name.endswith("." + self.text)


def check_pattern(text: str) -> str | None:
    """Why ``text`` is not a usable target, or None when it is."""
    if not text.strip():
        return "a target must not be empty"
    if text.startswith(REGEX_PREFIX):
        try:
            re.compile(text[len(REGEX_PREFIX) :])
        except re.error as exc:
            return f"invalid regular expression: {exc}"
    return None


@dataclass(frozen=True)
class TargetMatch:
    """What an entry's targets selected: module names in model order, and the targets that hit nothing."""

    modules: dict[str, nn.Module]
    unmatched: list[int]


def match_targets(model: nn.Module | ModelView, targets: list[str], exclude: list[str]) -> TargetMatch:
    """Modules of ``model`` matched by any target and not inside any excluded module, by the user's names."""
    view = model if isinstance(model, ModelView) else model_view(model)
    patterns = [TargetPattern(t) for t in targets]
    excluded = [TargetPattern(t) for t in exclude]
    hits = [False] * len(patterns)
    excluded_prefixes: list[str] = []
    modules: dict[str, nn.Module] = {}
    for name, module in view.modules.items():
        if not name:
            continue
        if any(name == p or name.startswith(p + ".") for p in excluded_prefixes):
            continue
        names = view.spellings(name)
        if any(p.matches(names, module) for p in excluded):
            excluded_prefixes.append(name)
            continue
        for index, pattern in enumerate(patterns):
            if pattern.matches(names, module):
                hits[index] = True
                modules[name] = module
    return TargetMatch(modules=modules, unmatched=[i for i, hit in enumerate(hits) if not hit])


def near_misses(model: nn.Module | ModelView, target: str, limit: int = 5) -> list[str]:
    """Module names and class names that look like ``target``, for "did you mean" hints."""
    view = model if isinstance(model, ModelView) else model_view(model)
    text = target[len(REGEX_PREFIX) :] if target.startswith(REGEX_PREFIX) else target
    names = [name for name in view.modules if name]
    candidates = sorted(set(names) | {plain_class(m).__name__ for m in view.modules.values()})
    close = difflib.get_close_matches(text, candidates, n=limit, cutoff=0.6)
    if len(close) < limit:
        # Suffix-style targets are short; compare them with name tails too.
        tails = sorted({".".join(n.split(".")[-k:]) for n in names for k in (1, 2, 3)})
        close += [t for t in difflib.get_close_matches(text, tails, n=limit, cutoff=0.6) if t not in close]
    return close[:limit]
