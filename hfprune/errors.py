"""Exception types users can catch; each says what was wrong and where."""

from __future__ import annotations

from dataclasses import dataclass


class HfpruneError(Exception):
    """Base class of every error hfprune raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: the key path, its line (when known) and why."""

    key: str
    message: str
    line: int | None = None
    hint: str | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class RecipeError(HfpruneError, ValueError):
    """A recipe that cannot be used, raised before any training step.

    Carries every problem found, so a user fixes a recipe in one pass instead of one
    error per run. ``source``, ``line`` and ``key`` describe the first problem.
    """

    def __init__(self, source: str, problems: list[Problem]):
        if not problems:
            raise ValueError("RecipeError needs at least one problem")
        self.source = source
        self.problems = problems
        first = problems[0]
        self.line, self.key, self.hint = first.line, first.key, first.hint
        super().__init__("\n".join(p.render(source) for p in problems))


class TargetError(HfpruneError, ValueError):
    """Raised by a strategy's ``select_parameters`` when matched modules do not suit it; becomes a recipe
    problem."""


class PluginError(HfpruneError):
    """A strategy plugin that cannot be loaded or used; names its distribution."""


class StateError(HfpruneError):
    """Pruning state that cannot be saved, found or restored."""


class CompactionError(HfpruneError):
    """A compaction that was refused; the model it was asked about is unchanged."""
