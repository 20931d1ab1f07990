"""Which modules a recipe entry applies to.

A target is a module name (exact, or a dotted suffix such as ``attention.output.dense``),
``re:PATTERN`` (a regular expression matched against the whole name), or a module
class name such as ``Linear``. Regular expressions are RE2's: they match in time linear in
the name, so no pattern, however it nests its repeats, can stall ``attach`` or ``hfprune
check``; RE2 has no backreferences or lookaround, and a pattern using them is a recipe error.
``exclude`` uses the same forms and also drops everything inside an excluded module. Names are
the user's (:mod:`hfprune.integrations.peft_names`): in a model peft wrapped, a target may also be
spelled as peft does (``base_model.model.`` prefix, ``.base_layer``), and it selects the wrapped
layer, never its adapters.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import re2
from torch import nn

from hfprune.integrations.peft_names import ModelView, model_view
from hfprune.integrations.sharding import plain_class

REGEX_PREFIX = "re:"


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern becomes a located recipe error, not a line on stderr
    return options


_RE2_OPTIONS = _re2_options()


def compile_regex(pattern: str) -> Any:
    """``pattern`` compiled by RE2 (linear-time matching); raises ``re2.error`` when RE2 cannot compile it."""
    return re2.compile(pattern, _RE2_OPTIONS)


@dataclass(frozen=True)
class TargetPattern:
    """One target string, compiled once."""

    text: str

    @cached_property
    def regex(self) -> Any:
        return compile_regex(self.text[len(REGEX_PREFIX) :]) if self.text.startswith(REGEX_PREFIX) else None

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
        return _regex_problem(text[len(REGEX_PREFIX) :])
    return None


def _regex_problem(pattern: str) -> str | None:
    """Why RE2 refuses ``pattern``: in Python's words when it is no regular expression at all, else RE2's."""
    try:
        compile_regex(pattern)
        return None
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if isinstance(exc.args[0], bytes) else str(exc)
    try:
        re.compile(pattern)  # only a pattern RE2 refused, so no match ever runs with Python's engine
    except re.error as exc:
        return f"invalid regular expression: {exc}"
    return (
        f"regular expression not supported by RE2 ({reason}): targets match with RE2, in time linear in "
        "the name, which has no backreferences, lookahead, lookbehind or possessive repeats; write the "
        "pattern without them"
    )


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


# How many module names a hint lists, and how much of a target they are ranked against (ranking is quadratic).
SHOWN_NAMES = 8
RANKED_CHARS = 200
ADAPTER_MARK = "lora_"  # peft's adapter modules: lora_A, lora_B, lora_embedding_A, lora_dropout, ...
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def unmatched_hint(model: nn.Module | ModelView, target: str) -> str:
    """What to do about a target that matched nothing: LoRA's layers are targeted by their own names, else a
    close name, else the model's names most like the target (so the hint itself shows what there is)."""
    view = model if isinstance(model, ModelView) else model_view(model)
    if ADAPTER_MARK in target:
        return _adapter_hint(view)
    close = near_misses(view, target)
    if close:
        return f"did you mean: {', '.join(close)}"
    names = name_patterns(view, target)
    indices = " (* is any index)" if any("*" in name for name in names) else ""
    return f"no module name is close; modules with weights here{indices}: {', '.join(names)}"


def name_patterns(view: ModelView, target: str, limit: int = SHOWN_NAMES) -> list[str]:
    """Names of the modules holding weights, layer indices collapsed to ``*``: the ``limit`` most like
    ``target``, in model order among equals."""
    patterns = dict.fromkeys(
        _LAYER_INDEX.sub("*", name)
        for name, module in view.modules.items()
        if name and next(module.parameters(recurse=False), None) is not None
    )
    matcher = difflib.SequenceMatcher(b=target.removeprefix(REGEX_PREFIX)[:RANKED_CHARS], autojunk=False)

    def likeness(pattern: str) -> float:
        matcher.set_seq1(pattern)
        return matcher.ratio()

    return sorted(patterns, key=likeness, reverse=True)[:limit]


def _adapter_hint(view: ModelView) -> str:
    """LoRA's adapters are never targets: hfprune prunes the base weight of the layer they wrap."""
    kinds = sorted({name.rpartition(".")[2] for name in view.wrapped})
    examples = f"LoRA wraps {', '.join(kinds)} here" if kinds else "such as 'query'"
    return (
        "hfprune prunes the base weights of LoRA-wrapped layers (the adapters keep pruned weights zero), "
        f"never lora_A/lora_B: target the wrapped layer by its own name ({examples})"
    )
