"""Recipes: the YAML a user writes, validated before any training step.

``load_recipe`` accepts a path, a YAML string or a mapping and returns a :class:`Recipe`
whose entries have passed both the recipe schema and their strategy's own ``Config``.
Every problem found is reported at once, each with file, line and key path.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictStr,
    ValidationError,
)

from hfprune.distill import DistillationConfig
from hfprune.errors import PluginError, Problem, RecipeError
from hfprune.plugins import Registry, default_registry
from hfprune.recipe import builtin as builtin_recipes
from hfprune.recipe.run_sections import DataSection, ModelSection, TrainingSection
from hfprune.recipe.targets import check_pattern
from hfprune.recipe.yaml_source import KeyPath, YamlDocument, format_key_path, parse_yaml, read_recipe_text
from hfprune.schedule import ScheduleSpec
from hfprune.strategy import StrategyConfig


def _usable_target(pattern: str) -> str:
    reason = check_pattern(pattern)
    if reason:
        raise ValueError(f"{pattern!r}: {reason}")
    return pattern


TargetPattern = Annotated[StrictStr, AfterValidator(_usable_target)]


def _an_int(value: object) -> object:
    """Refuse a bool or a float before the ``Literal[1]`` check, which takes ``True`` and ``1.0`` for 1."""
    if isinstance(value, bool | float):
        raise ValueError(f"must be the number 1 (got {type(value).__name__} {value!r})")
    return value


Version = Annotated[Literal[1], BeforeValidator(_an_int)]


class PrunerEntry(BaseModel):
    """One ``pruners:`` item: which strategy, on which modules, when, with what settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    strategy: StrictStr = Field(min_length=1)
    targets: list[TargetPattern] = Field(min_length=1)
    exclude: list[TargetPattern] = Field(default_factory=list)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    config: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    """A validated recipe. Build one with :func:`load_recipe`.

    ``pruners`` is what the engine runs, with a teacher when ``distillation`` is set
    (:mod:`hfprune.distill`); ``model``, ``data`` and ``training`` are read only by
    ``hfprune run`` (:mod:`hfprune.recipe.run_sections`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Version
    pruners: list[PrunerEntry] = Field(min_length=1)
    distillation: DistillationConfig | None = None
    model: ModelSection | None = None
    data: DataSection | None = None
    training: TrainingSection | None = None

    _document: YamlDocument = PrivateAttr()
    _configs: list[StrategyConfig] = PrivateAttr()

    @property
    def source(self) -> str:
        return self._document.source

    def strategy_config(self, index: int) -> StrategyConfig:
        """Entry ``index``'s ``config:`` validated by its strategy, defaults filled in."""
        return self._configs[index]

    def problem(self, path: KeyPath, message: str, hint: str | None = None) -> Problem:
        """A problem located at ``path`` in this recipe's source."""
        return Problem(format_key_path(path), message, self._document.line_of(path), hint)

    def error(self, problems: list[Problem]) -> RecipeError:
        return RecipeError(self.source, problems)

    def to_yaml(self) -> str:
        absent = {
            name for name in ("distillation", "model", "data", "training") if getattr(self, name) is None
        }
        return yaml.safe_dump(self.model_dump(mode="json", exclude=absent), sort_keys=False)

    def fingerprint(self) -> str:
        """Stable hash of what the engine runs (not the run sections), stored with pruning state to catch a
        mismatched resume.

        A recipe without distillation hashes as before the section existed, so earlier checkpoints still
        resume.
        """
        engine = {"version", "pruners"} | ({"distillation"} if self.distillation is not None else set())
        canonical = json.dumps(self.model_dump(mode="json", include=engine), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


RecipeSource = str | os.PathLike | dict | Recipe


def load_recipe(source: RecipeSource, registry: Registry | None = None) -> Recipe:
    """Load and validate a recipe from a path, a built-in recipe's name, a YAML string, a mapping, or return a
    Recipe as is."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        document = YamlDocument(data=source, source="<dict>")
    elif isinstance(source, os.PathLike) or _looks_like_path(source):
        path = (
            builtin_recipes.builtin_path(source)
            if isinstance(source, str) and builtin_recipes.is_builtin_name(source)
            else Path(source)
        )
        try:
            text = read_recipe_text(path)
        except OSError as exc:
            raise RecipeError(
                str(path), [Problem("", f"cannot read recipe: {exc.strerror or exc}")]
            ) from None
        except UnicodeDecodeError as exc:
            raise RecipeError(str(path), [Problem("", f"recipe is not UTF-8 text: {exc.reason}")]) from None
        document = parse_yaml(text, str(path))
    elif isinstance(source, str):
        document = parse_yaml(source, "<string>")
    else:
        raise TypeError(f"a recipe is a path, a YAML string, a dict or a Recipe, not {type(source).__name__}")
    return _validate(document, registry or default_registry())


def _looks_like_path(text: object) -> bool:
    """A one-line string is a path unless it could be a recipe itself (every recipe has a ``key:``)."""
    return (
        isinstance(text, str)
        and "\n" not in text
        and (":" not in text or text.endswith((".yaml", ".yml")) or os.path.isfile(text))
    )


def _validate(document: YamlDocument, registry: Registry) -> Recipe:
    """Check the recipe schema and every entry's strategy config; report all problems together."""
    data = document.data
    if not isinstance(data, dict):
        raise RecipeError(
            document.source, [Problem("", "a recipe is a mapping with the keys 'version' and 'pruners'", 1)]
        )
    problems: list[Problem] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems(exc, document, Recipe, ()))
    configs, config_problems = _validate_strategy_configs(data.get("pruners"), document, registry)
    problems.extend(config_problems)
    if problems:
        raise RecipeError(document.source, sorted(problems, key=lambda p: p.line or 0))
    recipe._document = document
    recipe._configs = configs
    return recipe


def _validate_strategy_configs(
    entries: Any, document: YamlDocument, registry: Registry
) -> tuple[list[StrategyConfig], list[Problem]]:
    """Validate each entry's ``config`` with its strategy's schema, even when the rest of the recipe is
    broken."""
    configs: list[StrategyConfig] = []
    problems: list[Problem] = []
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("strategy"), str):
            continue
        config = entry.get("config", {})
        if not isinstance(config, dict):
            continue  # the recipe schema reports it
        try:
            config_cls = registry.get(entry["strategy"]).cls.Config
        except PluginError as exc:
            path = ("pruners", index, "strategy")
            problems.append(Problem(format_key_path(path), str(exc), document.line_of(path)))
            continue
        try:
            configs.append(config_cls.model_validate(config))
        except ValidationError as exc:
            problems.extend(_problems(exc, document, config_cls, ("pruners", index, "config")))
    return configs, problems


def _problems(
    exc: ValidationError, document: YamlDocument, model: type[BaseModel], prefix: KeyPath
) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        path = (*prefix, *(part for part in error["loc"] if isinstance(part, str | int)))
        problems.append(
            Problem(format_key_path(path), _describe(error), document.line_of(path), _hint(error, model))
        )
    return problems


def _describe(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    bounds = {"less_than": "<", "less_than_equal": "<=", "greater_than": ">", "greater_than_equal": ">="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit} (got {error['input']!r})"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        return f"{message} (got {type(error['input']).__name__} {error['input']!r})"
    return message


def _hint(error: dict, model: type[BaseModel]) -> str | None:
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        return f"allowed keys here: {', '.join(allowed)}" if allowed else None
    if error["type"] == "missing" and error["loc"] == ("version",):
        return "start the recipe with 'version: 1'"
    if error["type"] in ("float_type", "int_type") and isinstance(error["input"], str):
        return "numbers are strict: write the number without quotes"
    if error["type"] in ("float_type", "int_type") and isinstance(error["input"], bool):
        return "numbers are strict: true and false are not numbers"
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model found by walking ``loc`` through nested model annotations."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        current = _model_in(field.annotation) if field else None
    return list(current.model_fields) if current else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None
