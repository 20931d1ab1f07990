"""Hostile input: whatever a recipe, a command line or a checkpoint folder holds, hfprune answers
with its own error type, says where the problem is, and never runs what the input smuggles in.

Property-based tests (hypothesis) throw random and mutated recipes at ``load_recipe`` and at
``hfprune check``, and garbage at the pruning-state loader; explicit tests cover YAML tags that
build Python objects, state files that are pickles, targets that vanish on resume, and saves
that fail half-way.

Hypothesis runs derandomized with no example database: every run tries the same inputs, so a
failure in CI reproduces on a laptop. ``HFPRUNE_HOSTILE_SCALE=10`` multiplies every example
budget for a longer hunt. Each property prints how many inputs it tried (straight to the
terminal, whatever ``-r`` says) and records the count as the test property
``hypothesis_examples`` (in ``--junitxml`` reports).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import pathlib
import pickle
import re
import signal
import sys
import tracemalloc
import types
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import TrainerControl, TrainerState

from hfprune import PruneCallback, Pruner, RecipeError, StateError, load_recipe
from hfprune import state as state_module
from hfprune.cli import main
from hfprune.plugins import DISABLE_AUTOLOAD_ENV, PLUGINS_ENV, build_registry, default_registry
from hfprune.recipe.builtin import builtin_names, builtin_path
from hfprune.recipe.run_sections import RUN_SECTIONS
from hfprune.recipe.schema import PrunerEntry, Recipe
from hfprune.recipe.yaml_source import MAX_CHARS, format_key_path, parse_yaml
from hfprune.schedule import ScheduleSpec
from hfprune.state import STATE_FILE, load_state

from conftest import BERT_FFN_RECIPE, make_trainer, tiny_bert, training_args

# --- hypothesis set-up and example counts -----------------------------------------------------

settings.register_profile(
    "hfprune-hostile",
    deadline=None,  # a first example pays for imports and model building
    derandomize=True,  # the same examples on every run: CI failures reproduce
    database=None,  # nothing written into the repository
    print_blob=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
SCALE = float(os.environ.get("HFPRUNE_HOSTILE_SCALE", "1"))


def budget(examples: int) -> settings:
    """The hostile profile with ``examples`` examples (times HFPRUNE_HOSTILE_SCALE)."""
    return settings(settings.get_profile("hfprune-hostile"), max_examples=max(1, round(examples * SCALE)))


class Tally:
    """How many generated inputs one property tried; reported when the test ends, pass or fail."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def tally(request, record_property, capsys):
    counter = Tally()
    yield counter
    record_property("hypothesis_examples", counter.count)
    with capsys.disabled():
        print(f"\n[hypothesis] {request.node.name}: {counter.count} generated inputs tried", flush=True)


# --- what the library knows: strategies, keys, built-in recipes -------------------------------

REGISTRY = build_registry()
STRATEGY_NAMES = sorted(REGISTRY.strategies)
CONFIG_KEYS = sorted({key for info in REGISTRY.strategies.values() for key in info.cls.Config.model_fields})
RECIPE_KEYS = sorted(
    set(Recipe.model_fields)
    | set(PrunerEntry.model_fields)
    | set(ScheduleSpec.model_fields)
    | set(CONFIG_KEYS)
    | {key for section in RUN_SECTIONS.values() for key in section.model_fields}
)
BUILTINS = {name: builtin_path(name).read_text() for name in builtin_names()}
# Module and class names of a BERT classifier, and patterns around them: what a mutated target may become.
MODULE_WORDS = [
    "Linear",
    "LayerNorm",
    "Embedding",
    "Dropout",
    "BertLayer",
    "BertAttention",
    "BertSelfAttention",
    "ModuleList",
    "encoder.layer",
    "bert",
    "bert.encoder",
    "classifier",
    "pooler.dense",
    "attention.self",
    "intermediate",
    "intermediate.dense",
    "output.dense",
    "bert.encoder.layer.5",
    "bert.encoder.layer.9",
    "embeddings.word_embeddings",
    "re:.*",
    "re:.*dense",
    r"re:.*encoder\.layer\.\d+",
    r"re:.*encoder\.layer\.\d+\.attention",
    "re:(",
    "re:",
    " ",
]


def strategy_config_of(name: Any):
    info = REGISTRY.strategies.get(name) if isinstance(name, str) else None
    return info.cls.Config if info else None


# --- running things -------------------------------------------------------------------------


def run_cli(*argv: str | os.PathLike) -> tuple[int, str, str]:
    """``hfprune ARGV`` in this process: exit code, stdout, stderr (a usage error's SystemExit becomes its
    code)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 6-layer BERT of width 32 saved with save_pretrained: every built-in recipe fits it (default keeps 4
    layers)."""
    folder = tmp_path_factory.mktemp("bert6")
    tiny_bert(layers=6).save_pretrained(folder)
    return folder


YAML_BREAKS = re.compile(r"\r\n|[\n\r\x85\u2028\u2029]")


def assert_located(error: RecipeError, source: str, text: str | None = None) -> None:
    """Every problem of ``error`` names ``source`` and a line in it or a key path, and renders as one line
    (plus hints)."""
    assert error.source == source, error.source
    assert error.problems, "a RecipeError without problems"
    last_line = len(YAML_BREAKS.findall(text)) + 2 if text is not None else None
    for problem in error.problems:
        assert problem.line is not None or problem.key, f"problem with neither line nor key: {problem}"
        if problem.line is not None and last_line is not None:
            assert 1 <= problem.line <= last_line, f"line {problem.line} outside the recipe: {problem}"
    for line in str(error).split("\n"):
        assert line.startswith(source) or line.startswith("  hint: "), (
            f"unexpected line {line!r} in:\n{error}"
        )


def recipe_error(load, source: str, text: str | None = None) -> RecipeError | None:
    """Run ``load``: None if it accepts the recipe, the (located) RecipeError if it refuses it; anything else
    escapes."""
    try:
        load()
    except RecipeError as error:
        assert_located(error, source, text)
        return error
    return None


def assert_clean_cli_failure(err: str, recipe: Path) -> None:
    """A refused recipe: one line per problem, each naming the file and a line, hints indented; never a
    traceback."""
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert lines[0].startswith(f"error: {recipe}:"), err
    for line in lines:
        assert re.match(rf"(error: )?{re.escape(str(recipe))}:\d+: \S", line) or line.startswith(
            "  hint: "
        ), f"{line!r} in:\n{err}"


def within(key: str, anchor: str) -> bool:
    """Key path ``key`` is ``anchor`` or lies inside it (``pruners[0].config.x`` is inside ``pruners[0]``)."""
    return key == anchor or key.startswith(anchor + ".") or key.startswith(anchor + "[")


# --- generators -----------------------------------------------------------------------------

YAML_TOKENS = [
    *RECIPE_KEYS,
    *STRATEGY_NAMES,
    ":",
    ": ",
    "- ",
    "-",
    "\n",
    "\n  ",
    "\n    ",
    "  ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    '"',
    "# c",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "!!int ",
    "!!float ",
    "!!binary ",
    "!!set ",
    "!!omap ",
    "!!timestamp ",
    "!local ",
    "? ",
    "|",
    ">",
    "---",
    "...",
    "%YAML 1.1\n",
    "%TAG ! tag:x.org,2000:\n",
    "~",
    "null",
    ".nan",
    ".inf",
    "-.inf",
    "1e400",
    "0x1f",
    "0o17",
    "2001-12-14",
    "1",
    "0.5",
    "-3",
    "1e-1",
    "true",
    "yes",
    "\t",
    "\\",
    "\ufeff",
    "\x85",
    "\u2028",
    "\x00",
    "\x07",
    "\r",
    "re:(",
    "re:.*",
    "Linear",
]
yamlish_text = st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=4), max_size=60).map("".join)

interesting_strings = st.sampled_from(
    ["", " ", "re:(", "re:.*", "Linear", "1e-1", ".nan", "~", "null", "yes", "\x00", *STRATEGY_NAMES]
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | interesting_strings
keys = st.sampled_from(RECIPE_KEYS) | st.text(max_size=8)
json_like = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=5), max_leaves=25
)
numbers = st.integers(-5, 10**6) | st.floats() | st.sampled_from([0, 1, 0.5, 1.0, -1, 10**30, 2**63])

schedules = (
    st.fixed_dictionaries({}, optional={"start": numbers, "end": numbers, "every": numbers}) | json_like
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "strategy": st.sampled_from(STRATEGY_NAMES) | json_like,
        "targets": st.lists(st.sampled_from(MODULE_WORDS) | st.text(max_size=12), max_size=3) | json_like,
        "exclude": st.lists(st.sampled_from(MODULE_WORDS), max_size=2) | json_like,
        "schedule": schedules,
        "config": st.dictionaries(
            st.sampled_from(CONFIG_KEYS) | keys, scalars | numbers | json_like, max_size=5
        )
        | json_like,
        "x_unknown": json_like,
    },
)
sections = st.dictionaries(keys, scalars | numbers, max_size=4) | json_like
recipe_shaped = st.fixed_dictionaries(
    {},
    optional={
        "version": st.just(1) | json_like,
        "pruners": st.lists(entries, max_size=3) | json_like,
        "model": sections,
        "data": sections,
        "training": sections,
        "x_unknown": json_like,
    },
)


def dump(value: Any, draw) -> str:
    """``value`` as YAML, in a drawn style."""
    return yaml.safe_dump(
        value,
        sort_keys=draw(st.booleans()),
        default_flow_style=draw(st.sampled_from([None, True, False])),
        allow_unicode=draw(st.booleans()),
        width=draw(st.sampled_from([30, 80, 10_000])),
    )


@dataclass(frozen=True)
class Mutant:
    """A built-in recipe changed in one place.

    ``must_fail_at``: the key path an error must name, when the change certainly breaks the
    recipe. ``anchor``: for a change to one node that may or may not break it, where every
    problem must lie (the rest of the recipe is untouched and valid). ``valid``: a rewrite that
    changes nothing (style, order, comments).
    """

    base: str
    text: str
    change: str
    must_fail_at: str | None = None
    must_fail_line: int | None = None
    anchor: str | None = None
    valid: bool = False


def tree_paths(value: Any, path: tuple = ()) -> list[tuple]:
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found += tree_paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += tree_paths(child, (*path, index))
    return found


def node_at(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def required_key_path(doc: dict, path: tuple) -> str | None:
    """Where the error must be when the node at ``path`` is deleted, or None when deleting it may be fine."""
    if path in (("version",), ("pruners",)):
        return format_key_path(path)
    parent = node_at(doc, path[:-1])
    if isinstance(parent, list) and len(parent) == 1 and path[-2] in ("pruners", "targets"):
        return format_key_path(path[:-1])  # an empty list where at least one item is required
    if len(path) == 3 and path[0] == "pruners" and path[2] in ("strategy", "targets"):
        return format_key_path(path)
    if len(path) >= 3 and path[0] == "pruners" and path[2] == "config":
        config = strategy_config_of(node_at(doc, path[:2]).get("strategy"))
        if config is None:
            return None
        if len(path) == 3 and any(f.is_required() for f in config.model_fields.values()):
            return format_key_path(path)
        if len(path) == 4 and path[3] in config.model_fields and config.model_fields[path[3]].is_required():
            return format_key_path(path)
    return None


def other_type_value(current: Any):
    """A strategy for values whose type differs from ``current``'s."""
    kinds = {
        bool: st.booleans(),
        int: st.integers(),
        float: st.floats(),
        str: st.text(max_size=10) | interesting_strings,
        type(None): st.none(),
        list: st.lists(scalars, max_size=3),
        dict: st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    }
    return st.one_of(*(s for kind, s in kinds.items() if type(current) is not kind))


KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w-]*):(\s|$)")
JUNK = st.sampled_from(
    list(":{}[],'\"#&*!|>%@`\t-?") + ["\n", "  ", "\x00", "\x07", "\ud7ff", "\ufffe"]
) | st.text(max_size=3)


@st.composite
def mutants(draw) -> Mutant:
    """One change to one built-in recipe: to its data (dumped back to YAML) or to its text (comments and
    all)."""
    base = draw(st.sampled_from(sorted(BUILTINS)))
    text = BUILTINS[base]
    doc = yaml.safe_load(text)
    kind = draw(
        st.sampled_from(
            [
                "delete",
                "retype",
                "unknown-key",
                "strategy",
                "number",
                "targets",  # data
                "truncate",
                "indent",
                "duplicate-key",
                "junk",
                "drop-line",
                "swap-lines",
                "rewrite",  # text
            ]
        )
    )
    nodes = [p for p in tree_paths(doc) if p]
    if kind == "delete":
        path = draw(st.sampled_from(nodes))
        must = required_key_path(doc, path)
        parent = node_at(doc, path[:-1])
        del parent[path[-1]]
        anchor = (
            format_key_path(path[: min(2, len(path) - 1)]) or None
        )  # a deleted list item is missed by its list
        return Mutant(
            base, dump(doc, draw), f"deleted {format_key_path(path)}", must_fail_at=must, anchor=anchor
        )
    if kind == "retype":
        path = draw(st.sampled_from(nodes))
        value = draw(other_type_value(node_at(doc, path)))
        node_at(doc, path[:-1])[path[-1]] = value
        return Mutant(
            base, dump(doc, draw), f"{format_key_path(path)} = {value!r}", anchor=format_key_path(path[:2])
        )
    if kind == "unknown-key":
        path = draw(st.sampled_from([p for p in tree_paths(doc) if isinstance(node_at(doc, p), dict)]))
        key = "x_" + draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", max_size=8))
        node_at(doc, path)[key] = draw(scalars | json_like)
        return Mutant(
            base,
            dump(doc, draw),
            f"unknown key {key!r} in {format_key_path(path) or 'the top level'}",
            must_fail_at=format_key_path((*path, key)),
        )
    if kind == "strategy":
        index = draw(st.integers(0, len(doc["pruners"]) - 1))
        name = draw(
            st.sampled_from(STRATEGY_NAMES)
            | st.text(max_size=12)
            | st.sampled_from(["Magnitude", "magnitude ", "block_lasso", "lasso"])
        )
        doc["pruners"][index]["strategy"] = name
        path = ("pruners", index, "strategy")
        must = None if name in STRATEGY_NAMES else format_key_path(path)
        return Mutant(
            base,
            dump(doc, draw),
            f"{format_key_path(path)} = {name!r}",
            must_fail_at=must,
            anchor=format_key_path(path[:2]),
        )
    if kind == "number":
        path = draw(st.sampled_from([p for p in nodes if type(node_at(doc, p)) in (int, float)]))
        old = node_at(doc, path)
        value = draw(
            st.sampled_from(
                [
                    -old,
                    old * 10**6,
                    10**30,
                    -(10**30),
                    2**63,
                    10**100,
                    math.nan,
                    math.inf,
                    -math.inf,
                    0,
                    -0.0,
                    1e-320,
                    1e308,
                ]
            )
            | numbers
        )
        node_at(doc, path[:-1])[path[-1]] = value
        return Mutant(
            base,
            dump(doc, draw),
            f"{format_key_path(path)}: {old!r} -> {value!r}",
            anchor=format_key_path(path[:2]),
        )
    if kind == "targets":
        index = draw(st.integers(0, len(doc["pruners"]) - 1))
        doc["pruners"][index]["targets"] = draw(
            st.lists(st.sampled_from(MODULE_WORDS), min_size=1, max_size=3)
        )
        return Mutant(
            base,
            dump(doc, draw),
            f"pruners[{index}].targets = {doc['pruners'][index]['targets']}",
            anchor=f"pruners[{index}]",
        )
    if kind == "rewrite":
        style = dict(
            sort_keys=draw(st.booleans()),
            default_flow_style=draw(st.sampled_from([None, True, False])),
            indent=draw(st.integers(2, 6)),
            width=draw(st.sampled_from([20, 80, 10_000])),
            explicit_start=draw(st.booleans()),
        )
        rewritten = (
            "# rewritten\n"
            + yaml.safe_dump(doc, **style)
            + draw(st.sampled_from(["", "\n", "# end\n", "...\n"]))
        )
        return Mutant(base, rewritten, f"rewritten with {style}", valid=True)

    lines = text.split("\n")
    if kind == "truncate":
        cut = draw(st.integers(0, len(text) - 1))
        return Mutant(base, text[:cut], f"truncated at character {cut}")
    if kind == "indent":
        n = draw(st.sampled_from([i for i, line in enumerate(lines) if line.strip()]))
        old = lines[n]
        lines[n] = (
            draw(st.sampled_from([" ", "  ", "\t", "   "])) + old if draw(st.booleans()) else old.lstrip()
        )
        return Mutant(base, "\n".join(lines), f"line {n + 1} re-indented: {lines[n]!r}")
    if kind == "duplicate-key":
        n = draw(st.sampled_from([i for i, line in enumerate(lines) if KEY_LINE.match(line)]))
        key = KEY_LINE.match(lines[n]).group(2)
        located = parse_yaml(text, "<built-in>").lines
        path = min((p for p, line in located.items() if line == n + 1 and p and p[-1] == key), key=len)
        lines.insert(n + 1, lines[n])
        return Mutant(
            base,
            "\n".join(lines),
            f"line {n + 1} duplicated: {lines[n]!r}",
            must_fail_at=format_key_path(path),
            must_fail_line=n + 2,
        )
    if kind == "junk":
        at = draw(st.integers(0, len(text)))
        junk = draw(JUNK)
        return Mutant(base, text[:at] + junk + text[at:], f"{junk!r} inserted at character {at}")
    if kind == "drop-line":
        n = draw(st.integers(0, len(lines) - 1))
        return Mutant(base, "\n".join(lines[:n] + lines[n + 1 :]), f"line {n + 1} deleted: {lines[n]!r}")
    n = draw(st.integers(0, len(lines) - 2))
    lines[n], lines[n + 1] = lines[n + 1], lines[n]
    return Mutant(base, "\n".join(lines), f"lines {n + 1} and {n + 2} swapped")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", errors="surrogatepass", newline="")
    return path


# --- 1. load_recipe under random and mutated recipes ----------------------------------------


def test_load_recipe_refuses_arbitrary_text_only_with_located_recipe_errors(tmp_path, tally):
    """Any text, from a file or as a string: a Recipe or a RecipeError whose every problem names file/line or
    key path."""
    path = tmp_path / "recipe.yaml"

    @budget(400)
    @given(text=st.text(max_size=300) | yamlish_text)
    @example(text="\x1f")  # characters YAML refuses before parsing
    @example(text="version: 1\npruners: [\ufffe]")
    @example(text="!!timestamp")  # tagged scalars whose constructor fails outside PyYAML's own errors
    @example(text="x: !!int abc")
    @example(text="x: !!int ''")
    @example(text="x: !!int 0b2")
    @example(text="x: !!float .")
    @example(text="x: !!bool maybe")
    @example(text="x: !!timestamp 2001-13-45")
    @example(text="x: &a [*a]")  # an alias inside the collection it names
    @example(text="version: 1\npruners: &p [*p]")
    @example(text="x: &a {<<: *a}")
    @example(text="'': 1")  # a key with no name
    def prop(text):
        tally()
        write(path, text)
        recipe_error(lambda: load_recipe(path), str(path), text)
        recipe_error(lambda: load_recipe(text + "\n"), "<string>", text + "\n")

    prop()


def test_load_recipe_refuses_arbitrary_values_only_with_located_recipe_errors(tmp_path, tally):
    """Any JSON-like value (shaped like a recipe or not), as YAML text or as a mapping: located RecipeErrors
    only."""
    path = tmp_path / "recipe.yaml"

    @budget(400)
    @given(value=json_like | recipe_shaped, data=st.data())
    def prop(value, data):
        tally()
        text = dump(value, data.draw)
        write(path, text)
        from_text = recipe_error(lambda: load_recipe(path), str(path), text)
        if isinstance(value, dict):
            from_dict = recipe_error(lambda: load_recipe(copy.deepcopy(value)), "<dict>")
            assert (from_text is None) == (from_dict is None), f"YAML: {from_text}\ndict: {from_dict}"

    prop()


def test_load_recipe_on_mutated_built_in_recipes(tmp_path, tally):
    """A mutated built-in recipe loads or fails with located problems; a certain breakage is reported at its
    key
    (and line), and a change to one node is blamed on that part of the recipe only."""
    path = tmp_path / "recipe.yaml"

    @budget(500)
    @given(mutant=mutants())
    def prop(mutant):
        tally()
        note(f"{mutant.base}: {mutant.change}\n{mutant.text}")
        write(path, mutant.text)
        error = recipe_error(lambda: load_recipe(path), str(path), mutant.text)
        if mutant.valid:
            assert error is None
            assert load_recipe(path).fingerprint() == load_recipe(mutant.base).fingerprint()
        if mutant.must_fail_at is not None:
            assert error is not None, "a certainly broken recipe was accepted"
            assert any(within(p.key, mutant.must_fail_at) for p in error.problems), str(error)
        if mutant.must_fail_line is not None:
            assert error.line == mutant.must_fail_line, str(error)
        if error is not None and mutant.anchor is not None:
            assert all(within(p.key, mutant.anchor) for p in error.problems), (
                f"expected problems in {mutant.anchor}:\n{error}"
            )

    prop()


# --- 1. hfprune check under mutated recipes ---------------------------------------------------


@pytest.mark.parametrize("name", builtin_names())
def test_check_accepts_every_built_in_recipe(name, bert_dir):
    """The unmutated seeds of the property below: exit 0 against a model they fit."""
    code, out, err = run_cli("check", builtin_path(name), "--model", bert_dir)
    assert (code, err) == (0, "") and "recipe OK" in out


def test_check_on_mutated_recipes_exits_0_or_1_with_a_located_one_line_error(tmp_path, bert_dir, tally):
    """``hfprune check`` on a mutated built-in recipe, with or without --total-steps: exit 0 with 'recipe OK'
    (always for
    a rewrite that changes nothing), or exit 1 with one located line per problem on stderr, never a
    traceback."""
    path = tmp_path / "recipe.yaml"

    @budget(150)
    @given(mutant=mutants(), total_steps=st.none() | st.integers(1, 100_000))
    def prop(mutant, total_steps):
        tally()
        note(f"{mutant.base}: {mutant.change}\n{mutant.text}")
        write(path, mutant.text)
        code, out, err = run_cli(
            "check", path, "--model", bert_dir, *(["--total-steps", str(total_steps)] if total_steps else [])
        )
        assert code in (0, 1), f"exit {code}\n{err}"
        if code == 0:
            assert "recipe OK" in out and err == "", err
            load_recipe(path)  # what check accepted, the library loads
        else:
            assert_clean_cli_failure(err, path)
        if mutant.valid:
            assert code == 0, err
        if mutant.must_fail_at is not None:
            assert code == 1 and f": {mutant.must_fail_at}" in err, err

    prop()


def test_check_with_total_steps_that_cannot_resolve_a_schedule_is_a_recipe_error(tmp_path, bert_dir):
    """A schedule from step 5 to half of training is fine in general, impossible in 4 steps: a located error,
    exit 1."""
    recipe = write(
        tmp_path / "recipe.yaml",
        BERT_FFN_RECIPE.replace("schedule: {start: 0, end: 0.5, every: 2}", "schedule: {start: 5, end: 0.5}"),
    )
    code, out, err = run_cli("check", recipe, "--model", bert_dir, "--total-steps", "100")
    assert code == 0, err
    code, out, err = run_cli("check", recipe, "--model", bert_dir, "--total-steps", "4")
    assert code == 1, err
    assert_clean_cli_failure(err, recipe)
    assert "pruners[0].schedule" in err and "step 5" in err


def test_check_with_a_negative_total_steps_is_an_error_not_a_traceback(tmp_path, bert_dir):
    recipe = write(tmp_path / "recipe.yaml", BERT_FFN_RECIPE)
    code, out, err = run_cli("check", recipe, "--model", bert_dir, "--total-steps", "-8")
    assert code in (1, 2) and err.startswith(("error: ", "usage: ")) and "Traceback" not in err, (code, err)


def test_deeply_nested_yaml_is_a_recipe_error(tmp_path, bert_dir):
    """Nesting deeper than Python's recursion limit (a few kB of brackets) is refused like any bad recipe."""
    for depth, nested in (
        (300, "[{}]"),
        (1_000, "[{}]"),
        (5_000, "{{a: {}}}"),
    ):  # deep flow lists parse slowly: 1,000 will do
        value = "1"
        for _ in range(depth):
            value = nested.format(value)
        text = BERT_FFN_RECIPE.replace(
            "config: {sparsity: 0.75}", f"config: {{sparsity: 0.75, deep: {value}}}"
        )
        path = write(tmp_path / "deep.yaml", text)
        error = recipe_error(partial(load_recipe, path), str(path), text)
        assert error is not None
    code, _, err = run_cli("check", path, "--model", bert_dir)
    assert code == 1
    assert_clean_cli_failure(err, path)


def test_control_characters_are_a_located_recipe_error(tmp_path, bert_dir):
    """YAML forbids most C0 controls; one pasted into a recipe is reported at its line, like any syntax
    error."""
    for char in ("\x00", "\x07", "\x1b", "\ufffe"):
        text = BERT_FFN_RECIPE.replace("magnitude", f"magni{char}tude")
        path = write(tmp_path / "recipe.yaml", text)
        error = recipe_error(partial(load_recipe, path), str(path), text)
        assert error is not None and error.line == 4, repr(error and str(error))
        code, _, err = run_cli("check", path, "--model", bert_dir)
        assert code == 1
        assert_clean_cli_failure(err, path)


def non_finite_cases() -> list[tuple[str, tuple]]:
    """Every number in a built-in recipe's pruners, plus the run sections' unbounded numbers."""
    cases = []
    for name, text in BUILTINS.items():
        doc = yaml.safe_load(text)
        cases += [
            (name, p)
            for p in tree_paths(doc)
            if p and p[0] == "pruners" and type(node_at(doc, p)) in (int, float)
        ]
    cases += [
        ("magnitude", ("training", key)) for key in ("epochs", "learning_rate", "batch_size", "max_steps")
    ]
    cases += [("magnitude", ("data", key)) for key in ("test_fraction", "max_length")]
    return cases


def test_non_finite_numbers_are_refused_wherever_a_number_goes():
    """NaN or an infinity (also what YAML's 1e400 becomes) is never a usable hyperparameter: each is a located
    error."""
    accepted = []
    for name, path in non_finite_cases():
        for value in (math.nan, math.inf, -math.inf):
            doc = yaml.safe_load(BUILTINS[name])
            if path[0] != "pruners":
                doc.setdefault(path[0], {})
            node_at(doc, path[:-1])[path[-1]] = value
            text = yaml.safe_dump(doc, sort_keys=False)
            error = recipe_error(partial(load_recipe, text), "<string>", text)
            if error is None or not any(
                within(p.key, format_key_path(path)) or within(format_key_path(path), p.key)
                for p in error.problems
            ):
                accepted.append(f"{name}: {format_key_path(path)} = {value}")
    assert not accepted, "non-finite numbers accepted:\n" + "\n".join(accepted)


def strategy_entries() -> dict[str, tuple[str, int]]:
    """For each strategy a built-in recipe uses: that recipe's name and the index of an entry using it."""
    found: dict[str, tuple[str, int]] = {}
    for name, text in BUILTINS.items():
        for index, entry in enumerate(yaml.safe_load(text)["pruners"]):
            found.setdefault(entry["strategy"], (name, index))
    return found


STRATEGY_ENTRIES = strategy_entries()


def admitted_types(annotation: Any) -> set:
    """The plain types an annotation admits, through ``Annotated`` and unions."""
    if typing.get_origin(annotation) is typing.Annotated:
        return admitted_types(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*map(admitted_types, typing.get_args(annotation)))
    return {annotation}


NOT_NUMBERS = {float: (False, True, "0.5"), int: (False, True, "3", 3.0)}


@pytest.mark.parametrize("strategy", sorted(STRATEGY_ENTRIES))
def test_bools_and_strings_are_not_numbers_in_any_built_in_strategy(strategy):
    """``sparsity: false`` was 0.0 and ``'0.5'`` was 0.5: every number a built-in strategy takes is strict,
    and each such value is a located error at its own key."""
    name, index = STRATEGY_ENTRIES[strategy]
    fields = REGISTRY.strategies[strategy].cls.Config.model_fields
    tried, accepted = 0, []
    for kind, values in NOT_NUMBERS.items():
        for field in (f for f, info in fields.items() if kind in admitted_types(info.annotation)):
            for value in values:
                doc = yaml.safe_load(BUILTINS[name])
                doc["pruners"][index].setdefault("config", {})[field] = value
                text = yaml.safe_dump(doc, sort_keys=False)
                error = recipe_error(partial(load_recipe, text), "<string>", text)
                key = f"pruners[{index}].config.{field}"
                tried += 1
                if error is None or not any(within(p.key, key) for p in error.problems):
                    accepted.append(f"{field}: {value!r}")
    assert tried >= 3, f"{strategy} has no number settings to try"
    assert not accepted, f"{strategy} took these for numbers: {', '.join(accepted)}"


ENTRY_END = "config: {sparsity: 0.75}"  # the last line of BERT_FFN_RECIPE


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("version: 1", "version: true", "version"),
        ("version: 1", "version: 1.0", "version"),
        (ENTRY_END, ENTRY_END + "\ndistillation: {temperature: true}", "distillation"),
        (ENTRY_END, ENTRY_END + "\ntraining: {epochs: '3'}", "training.epochs"),
        (ENTRY_END, ENTRY_END + "\ndata: {test_fraction: false}", "data"),
        (ENTRY_END, ENTRY_END + "\ntraining: {seed: 4.0}", "training.seed"),
    ],
)
def test_bools_and_strings_are_not_numbers_in_the_recipe_schema(old, new, key):
    assert old in BERT_FFN_RECIPE
    text = BERT_FFN_RECIPE.replace(old, new)
    error = recipe_error(partial(load_recipe, text), "<string>", text)
    assert error is not None and any(within(p.key, key) for p in error.problems), text


def test_ints_are_numbers_where_floats_go_and_exponents_are_numbers():
    """YAML's ``0``, ``1`` and ``1e-4`` (a string to PyYAML's YAML 1.1) are numbers wherever a float goes."""
    recipe = load_recipe(
        BERT_FFN_RECIPE.replace("config: {sparsity: 0.75}", "config: {sparsity: 0, initial_sparsity: 0}")
        + "  - strategy: rpp\n    targets: [attention.self.query]\n    config: {sparsity: 0.5, lam: 1e-4}\n"
        + "  - strategy: rpp\n    targets: [attention.self.key]\n    config: {sparsity: 0.5, lam: 1}\n"
        + "distillation: {temperature: 1, logit_weight: 1}\ntraining: {epochs: 2, learning_rate: 5e-5}\n"
    )
    assert recipe.strategy_config(0).sparsity == 0.0 and isinstance(recipe.strategy_config(0).sparsity, float)
    assert [recipe.strategy_config(i).lam for i in (1, 2)] == [1e-4, 1.0]
    assert recipe.distillation.temperature == 1.0 and recipe.training.learning_rate == 5e-5


@contextlib.contextmanager
def finishing_within(seconds: int):
    """Raise TimeoutError in the block once it has run ``seconds`` (SIGALRM interrupts even a regex match)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


CATASTROPHIC_TARGET = r"re:(\w+\.?)+!"  # exponential backtracking in Python's re against any dotted name


def test_a_catastrophically_backtracking_target_regex_is_matched_in_seconds(tmp_path, bert_dir):
    """Python's engine spent minutes on this target before a word was printed; RE2 answers at once that it
    matches no module, in the engine and in ``hfprune check``."""
    text = BERT_FFN_RECIPE.replace("targets: [", f"targets: [Linear, '{CATASTROPHIC_TARGET}', ")
    path = write(tmp_path / "recipe.yaml", text)
    with finishing_within(20):
        with pytest.raises(RecipeError) as info:
            Pruner(path).attach(tiny_bert(layers=6))
        code, _, err = run_cli("check", path, "--model", bert_dir)
    assert (info.value.key, info.value.line) == ("pruners[0].targets[1]", 5), str(info.value)
    assert f"{CATASTROPHIC_TARGET!r} matches no module" in str(info.value)
    assert code == 1
    assert_clean_cli_failure(err, path)


@pytest.mark.parametrize(
    "pattern", [r"(query)\1", r".*(?<=self\.)query", r".*(?!key)\.dense", r".*\.\w++", r".*query\Z"]
)
def test_regex_features_re2_lacks_are_located_recipe_errors(pattern):
    """Backreferences, lookaround and possessive repeats are what RE2 gives up to match in linear time: a
    recipe error at the target saying so, when the recipe loads."""
    text = BERT_FFN_RECIPE.replace("targets: [", f"targets: [Linear, 're:{pattern}', ")
    error = recipe_error(partial(load_recipe, text), "<string>", text)
    assert error is not None and (error.key, error.line) == ("pruners[0].targets[1]", 5), text
    assert "not supported by RE2" in str(error) and "\n" not in str(error)


def test_a_recipe_file_past_the_size_limit_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "long.yaml"
    filler = MAX_CHARS - len(BERT_FFN_RECIPE) - 1  # a comment line filling the recipe to the limit
    write(path, BERT_FFN_RECIPE + "#" * filler + "\n")
    assert load_recipe(path).pruners[0].strategy == "magnitude"
    write(path, BERT_FFN_RECIPE + "#" * (filler + 10) + "\n")
    error = recipe_error(partial(load_recipe, path), str(path))
    assert error is not None and f"longer than {MAX_CHARS} characters" in str(error), error


def test_a_huge_recipe_file_is_refused_without_being_read_whole(tmp_path):
    """A 20 MB file cost twice its size in memory before its size was checked; now only the limit is read."""
    path = tmp_path / "huge.yaml"
    with path.open("w") as file:
        for _ in range(20):
            file.write("#" * 1_000_000)
    tracemalloc.start()
    try:
        error = recipe_error(partial(load_recipe, path), str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error is not None and f"longer than {MAX_CHARS} characters" in str(error)
    assert peak < 4 * MAX_CHARS, f"{peak / 1e6:.1f} MB held to refuse a 20 MB recipe"


# --- 2. YAML tags that would build Python objects ------------------------------------------------

PYTHON_TAGS = {
    "apply os.system": "!!python/object/apply:os.system ['touch {marker}']",
    "apply subprocess": "!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
    "new Popen": "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "apply Path.touch": "!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
    "['{marker}']]",
    "object": "!!python/object:argparse.Namespace {{marker: '{marker}'}}",
    "name": "!!python/name:os.system",
    "module": "!!python/module:os",
}
TAG_PLACES = {
    "config value": "version: 1\npruners:\n  - strategy: magnitude\n    targets: [Linear]\n    config: "
    "{{sparsity: 0.5, scope: {tag}}}\n",
    "schedule": "version: 1\npruners:\n  - strategy: magnitude\n    targets: [Linear]\n    schedule: "
    "{tag}\n    config: {{sparsity: 0.5}}\n",
    "target item": "version: 1\npruners:\n  - strategy: magnitude\n    targets:\n      - {tag}\n    config: "
    "{{sparsity: 0.5}}\n",
    "version": "version: {tag}\npruners:\n  - strategy: magnitude\n    targets: [Linear]\n    config: "
    "{{sparsity: 0.5}}\n",
    "anchor, alias": "version: 1\nx: &payload {tag}\npruners:\n  - strategy: *payload\n    targets: "
    "[Linear]\n    config: {{sparsity: 0.5}}\n",
    "mapping key": "version: 1\npruners:\n  - strategy: magnitude\n    targets: [Linear]\n    config:\n     "
    " sparsity: 0.5\n      ? {tag}\n      : 1\n",
    "second document": "version: 1\npruners:\n  - strategy: magnitude\n    targets: [Linear]\n    config: "
    "{{sparsity: 0.5}}\n---\n{tag}\n",
}


@pytest.mark.parametrize("place", TAG_PLACES)
@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_tags_anywhere_are_refused_and_never_run(tmp_path, tag, place):
    """A tag that would import or call Python is a RecipeError at its line (or the stray document's), and runs
    nothing."""
    marker = tmp_path / "pwned"
    text = TAG_PLACES[place].format(tag=PYTHON_TAGS[tag].format(marker=marker))
    path = write(tmp_path / "recipe.yaml", text)
    for load, source in ((lambda: load_recipe(path), str(path)), (lambda: load_recipe(text), "<string>")):
        error = recipe_error(load, source, text)
        assert error is not None
        assert error.line in (
            text[: text.index("!!python")].count("\n") + 1,
            text[: text.find("---")].count("\n") + 1,
        ), str(error)
    assert not marker.exists()


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_check_refuses_python_tags_with_exit_1_and_runs_nothing(tmp_path, bert_dir, tag):
    marker = tmp_path / "pwned"
    text = TAG_PLACES["schedule"].format(tag=PYTHON_TAGS[tag].format(marker=marker))
    path = write(tmp_path / "recipe.yaml", text)
    code, out, err = run_cli("check", path, "--model", bert_dir)
    assert code == 1 and out == ""
    assert_clean_cli_failure(err, path)
    assert err.startswith(f"error: {path}:5: ")  # the schedule line, where the tag is
    assert not marker.exists()


# --- 3. state files that are pickles, garbage, truncated or hand-crafted ------------------------


class Touch:
    """Unpickling this creates ``path``: proof that whoever loaded it ran pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def stepped(recipe: str, model, steps: int, total: int = 8) -> Pruner:
    """A pruner attached to ``model`` that has run ``steps`` optimizer steps of SGD (no loss: weights move
    only by pruning)."""
    pruner = Pruner(recipe)
    pruner.attach(model)
    pruner.start(total_steps=total)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        pruner.before_optimizer_step(optimizer)
        optimizer.step()
        pruner.after_optimizer_step(optimizer)
    return pruner


def fresh_pruner(model, recipe: str = BERT_FFN_RECIPE, total: int = 8) -> Pruner:
    pruner = Pruner(recipe)
    pruner.attach(model)
    pruner.start(total_steps=total)
    return pruner


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint folder with real pruning state (masks after 3 steps) and the model that wrote it."""
    model = tiny_bert()
    folder = tmp_path / "checkpoint-3"
    stepped(BERT_FFN_RECIPE, model, steps=3).save(folder)
    return folder, model


def pickles(marker: Path) -> dict[str, bytes]:
    payload = {"format": 1, "step": 3, "entries": [{"mask.x": Touch(marker)}]}
    buffers = {}
    for name, kwargs in (
        ("torch.save zip", {}),
        ("torch.save legacy", {"_use_new_zipfile_serialization": False}),
    ):
        buffer = io.BytesIO()
        torch.save(payload, buffer, **kwargs)
        buffers[name] = buffer.getvalue()
    buffers |= {
        f"pickle protocol {p}": pickle.dumps(payload, protocol=p) for p in (0, 2, pickle.HIGHEST_PROTOCOL)
    }
    return buffers


@pytest.mark.parametrize("kind", list(pickles(Path("x"))))
def test_a_pickle_in_place_of_the_state_file_is_refused_unopened(tmp_path, checkpoint, kind):
    """Loading the state (directly, in the engine, in the Trainer callback) never unpickles: StateError, no
    marker."""
    folder, model = checkpoint
    marker = tmp_path / "pwned"
    poison = pickles(marker)[kind]
    (folder / STATE_FILE).write_bytes(poison)
    with pytest.raises(StateError, match="unreadable"):
        load_state(folder)
    with pytest.raises(StateError):
        fresh_pruner(model).load(folder)
    callback = PruneCallback(BERT_FFN_RECIPE, resume_from=folder)
    state = TrainerState(global_step=3, max_steps=8)
    with pytest.raises(StateError):
        callback.on_train_begin(training_args(tmp_path / "out"), state, TrainerControl(), model=model)
    assert not marker.exists()
    # The payload is live: what a pickle-based loader would have done.
    (torch.load(io.BytesIO(poison), weights_only=False) if kind.startswith("torch") else pickle.loads(poison))
    assert marker.exists()


def test_compact_refuses_a_pickled_state_with_exit_1_and_runs_nothing(tmp_path, checkpoint):
    folder, model = checkpoint
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"max_steps": 8}))
    marker = tmp_path / "pwned"
    (folder / STATE_FILE).write_bytes(pickles(marker)["torch.save zip"])
    recipe = write(tmp_path / "recipe.yaml", BERT_FFN_RECIPE)
    code, out, err = run_cli("compact", folder, "--recipe", recipe, "--output", tmp_path / "small")
    assert code == 1 and "Traceback" not in err, err
    assert err.rstrip("\n").split("\n")[-1].startswith("error: pruning state at "), (
        err
    )  # after transformers' loading bar
    assert not marker.exists() and not (tmp_path / "small").exists()


def broken_weights(marker: Path) -> dict[str, bytes]:
    """What a checkpoint's pytorch_model.bin may hold instead of weights: pickles that run code, garbage."""
    garbage = {"random bytes": bytes(range(256)) * 20, "empty": b"", "cut short": b"PK\x03\x04"}
    return pickles(marker) | garbage


@pytest.mark.parametrize("kind", list(broken_weights(Path("x"))))
def test_compact_refuses_pickled_or_broken_weights_with_one_line_and_runs_nothing(tmp_path, checkpoint, kind):
    """The checkpoint's weights are a pytorch_model.bin torch's weights-only loader refuses or cannot read:
    one error line (and a hint) with exit 1, not transformers' traceback, and nothing in the pickle runs."""
    folder, model = checkpoint
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(broken_weights(marker)[kind])
    recipe = write(tmp_path / "recipe.yaml", BERT_FFN_RECIPE)
    code, out, err = run_cli("compact", folder, "--recipe", recipe, "--output", tmp_path / "small")
    assert code == 1 and "Traceback" not in err, err
    ours = err[err.index("error: ") :].rstrip("\n").split("\n")  # after transformers' bar, torch's warnings
    assert ours[0].startswith(f"error: cannot load a model from {folder}: "), err
    assert len(ours) == 1 or (len(ours) == 2 and ours[1].startswith("  hint: ")), err
    assert not marker.exists() and not (tmp_path / "small").exists()


def assert_refused_or_loaded(folder: Path, model) -> None:
    """The engine either restores the state or raises StateError: nothing else escapes."""
    try:
        fresh_pruner(model).load(folder)
    except StateError:
        pass


def test_random_bytes_as_state_are_state_errors(tmp_path, checkpoint, tally):
    """Random bytes, or a safetensors-like header of random JSON: StateError (or, if it parses, a state the
    engine checks)."""
    folder, model = checkpoint
    header = st.builds(
        lambda h: json.dumps(h).encode(),
        json_like | st.dictionaries(st.text(max_size=6), json_like, max_size=4),
    )

    @budget(200)
    @given(
        body=st.binary(max_size=600)
        | st.tuples(header, st.binary(max_size=64)).map(
            lambda p: len(p[0]).to_bytes(8, "little") + p[0] + p[1]
        )
    )
    def prop(body):
        tally()
        (folder / STATE_FILE).write_bytes(body)
        try:
            load_state(folder)
        except StateError:
            return
        assert_refused_or_loaded(folder, model)

    prop()


def test_truncated_or_bit_flipped_state_is_refused_or_checked(tmp_path, checkpoint, tally):
    """A real state file cut anywhere is StateError; one with a flipped byte is StateError or a state the
    engine accepts."""
    folder, model = checkpoint
    good = (folder / STATE_FILE).read_bytes()

    @budget(200)
    @given(
        cut=st.integers(0, len(good) - 1),
        flip=st.none() | st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)),
    )
    def prop(cut, flip):
        tally()
        (folder / STATE_FILE).write_bytes(good[:cut])
        with pytest.raises(StateError):
            load_state(folder)
        if flip is not None:
            at, bits = flip
            (folder / STATE_FILE).write_bytes(good[:at] + bytes([good[at] ^ bits]) + good[at + 1 :])
            assert_refused_or_loaded(folder, model)

    prop()


def test_hand_crafted_state_metadata_is_a_state_error(tmp_path, checkpoint, tally):
    """A well-formed safetensors file whose hfprune metadata was edited (any JSON, a node replaced or
    removed):
    the engine restores it or raises StateError, never AttributeError, KeyError or TypeError."""
    folder, model = checkpoint
    skeleton = json.loads(load_state_metadata(folder))
    tensors = load_tensors(folder)
    for deep in (
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 100_000 + "1" + "}" * 100_000,
    ):  # past json's recursion limit
        save_file(tensors, str(folder / STATE_FILE), metadata={"hfprune": deep})
        with pytest.raises(StateError):
            fresh_pruner(model).load(folder)

    @st.composite
    def edited(draw):
        if draw(st.booleans()):
            return draw(json_like)
        doc = copy.deepcopy(skeleton)
        path = draw(st.sampled_from([p for p in tree_paths(doc) if p]))
        parent = node_at(doc, path[:-1])
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_like)
        return doc

    @budget(200)
    @given(metadata=edited())
    def prop(metadata):
        tally()
        save_file(tensors, str(folder / STATE_FILE), metadata={"hfprune": json.dumps(metadata)})
        assert_refused_or_loaded(folder, model)

    prop()


def load_state_metadata(folder: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(folder / STATE_FILE), framework="pt") as handle:
        return handle.metadata()["hfprune"]


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(folder / STATE_FILE), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# --- 4. a strategy whose plugin fails to import, through `hfprune check` --------------------------


def test_check_names_the_distribution_of_a_strategy_plugin_that_fails_to_import(
    tmp_path, monkeypatch, bert_dir
):
    """The recipe naming the broken plugin's strategy: exit 1, its file:line:key, the distribution and the
    import error."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    site = tmp_path / "site"
    info = site / "hostile_broken-3.1.dist-info"
    info.mkdir(parents=True)
    (site / "hostile_broken_plugin.py").write_text(
        "import hostile_missing_dependency  # not installed anywhere\n"
    )
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hostile-broken\nVersion: 3.1\n")
    (info / "entry_points.txt").write_text("[hfprune]\nhostile = hostile_broken_plugin\n")
    monkeypatch.syspath_prepend(site)
    default_registry.cache_clear()

    broken = write(
        tmp_path / "broken.yaml", BERT_FFN_RECIPE.replace("strategy: magnitude", "strategy: hostile")
    )
    code, out, err = run_cli("check", broken, "--model", bert_dir)
    assert code == 1
    assert_clean_cli_failure(err, broken)
    assert err.startswith(
        f"error: {broken}:4: pruners[0].strategy: strategy 'hostile' is provided by plugin 'hostile' of "
        "distribution "
        "hostile-broken 3.1, which failed to load: ModuleNotFoundError: No module named "
        "'hostile_missing_dependency'"
    ), err
    fine = write(tmp_path / "fine.yaml", BERT_FFN_RECIPE)
    assert (
        run_cli("check", fine, "--model", bert_dir)[0] == 0
    )  # the broken plugin blocks only its own strategy
    sys.modules.pop("hostile_broken_plugin", None)


# --- 5. a target that vanishes on resume --------------------------------------------------------


def one_layer_copy(model) -> torch.nn.Module:
    """A 1-layer BERT holding ``model``'s weights for everything but layer 1: the resumed model lost a
    layer."""
    smaller = tiny_bert(layers=1)
    smaller.load_state_dict({k: v for k, v in model.state_dict().items() if k in smaller.state_dict()})
    return smaller


LAYER1_RECIPE = """
version: 1
pruners:
  - strategy: magnitude
    targets: [bert.encoder.layer.1.intermediate.dense]
    schedule: {start: 0, end: 2, every: 1}
    config: {sparsity: 0.5}
"""


def test_a_named_target_missing_from_the_resumed_model_is_a_recipe_error(tmp_path):
    """The recipe names layer 1; the run resumes with a 1-layer model: RecipeError at the target, before
    training."""
    model = tiny_bert()
    folder = tmp_path / "checkpoint-3"
    stepped(LAYER1_RECIPE, model, steps=3).save(folder)
    with pytest.raises(RecipeError) as info:
        make_trainer(
            tmp_path / "out", one_layer_copy(model), [PruneCallback(LAYER1_RECIPE, resume_from=folder)]
        )
    assert info.value.key == "pruners[0].targets[0]" and info.value.line == 5
    assert "'bert.encoder.layer.1.intermediate.dense' matches no module" in str(info.value)


PATTERN_RECIPES = {
    "magnitude, masks fixed": r"""
version: 1
pruners:
  - strategy: magnitude
    targets: ['re:.*encoder\.layer\.\d+\.intermediate\.dense']
    schedule: {start: 0, end: 2, every: 1}
    config: {sparsity: 0.5}
""",
    "rpp, in its proximal phase": r"""
version: 1
pruners:
  - strategy: rpp
    targets: ['re:.*encoder\.layer\.\d+\.intermediate\.dense']
    schedule: {start: 0, end: 6}
    config: {sparsity: 0.5, lam: 0.1, reweight_every: 1}
""",
    "rpp, pattern fixed": r"""
version: 1
pruners:
  - strategy: rpp
    targets: ['re:.*encoder\.layer\.\d+\.intermediate\.dense']
    schedule: {start: 0, end: 2}
    config: {sparsity: 0.5, lam: 0.1, reweight_every: 1}
""",
    "block-lasso, in its phase": r"""
version: 1
pruners:
  - strategy: block-lasso
    targets: ['re:.*encoder\.layer\.\d+']
    schedule: {start: 0, end: 6}
    config: {group: neuron, ratio: 0.5, lam: 0.1, reweight_every: 1}
""",
}


@pytest.mark.parametrize("case", PATTERN_RECIPES)
def test_a_pattern_target_that_matches_less_after_resume_is_a_state_error_naming_it(tmp_path, case):
    """The pattern matches layers 0 and 1 when training starts, only layer 0 in the resumed model: the state
    saved
    for layer 1 cannot be restored, and the error says so by name (no KeyError, no silent partial restore)."""
    recipe = PATTERN_RECIPES[case]
    model = tiny_bert()
    folder = tmp_path / "checkpoint-3"
    stepped(recipe, model, steps=3).save(folder)
    callback = PruneCallback(recipe, resume_from=folder)
    with pytest.raises(StateError) as info:
        callback.on_train_begin(
            training_args(tmp_path / "out"),
            TrainerState(global_step=3, max_steps=8),
            TrainerControl(),
            model=one_layer_copy(model),
        )
    assert "bert.encoder.layer.1" in str(info.value), str(info.value)


# --- 7. a save that fails half-way ----------------------------------------------------------------


def half_written(exception: BaseException):
    """A save_file that writes the first half of the real file, then fails with ``exception``."""
    real = state_module.save_file

    def broken(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise exception

    return broken


def failing_replace(src, dst):
    raise OSError(30, "Read-only file system", str(dst))


FAILURES = {
    "disk full half-way": lambda mp: mp.setattr(
        state_module, "save_file", half_written(OSError(28, "No space left on device"))
    ),
    "interrupted half-way": lambda mp: mp.setattr(
        state_module, "save_file", half_written(KeyboardInterrupt())
    ),
    "rename refused": lambda mp: mp.setattr(state_module.os, "replace", failing_replace),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_save_that_fails_half_way_leaves_the_last_good_checkpoint_byte_identical(
    tmp_path, monkeypatch, failure
):
    """Engine state saved at step 3; at step 5 the save into the same folder fails mid-way: the step-3 file is
    byte-identical and restores step 3, and no temporary file is left."""
    model = tiny_bert()
    pruner = stepped(BERT_FFN_RECIPE, model, steps=3)
    folder = tmp_path / "checkpoint"
    pruner.save(folder)
    good, listing = (folder / STATE_FILE).read_bytes(), sorted(os.listdir(folder))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        pruner.before_optimizer_step(optimizer)
        pruner.after_optimizer_step(optimizer)

    with monkeypatch.context() as patch:
        FAILURES[failure](patch)
        with pytest.raises((OSError, KeyboardInterrupt)):
            pruner.save(folder)
    assert (folder / STATE_FILE).read_bytes() == good
    assert sorted(os.listdir(folder)) == listing
    restored = fresh_pruner(model)
    restored.load(folder)
    assert restored.step == 3


@pytest.mark.parametrize("failure", FAILURES)
def test_a_first_save_that_fails_leaves_no_state_file_and_no_temporary(tmp_path, monkeypatch, failure):
    """With no earlier state, the trainer callback's failed save leaves the checkpoint folder without a state
    file at all,
    so a resume reports a missing state instead of reading half a file."""
    model = tiny_bert()
    callback = PruneCallback(BERT_FFN_RECIPE)
    callback.pruner.attach(model)
    callback.pruner.start(total_steps=8)
    args = training_args(tmp_path)
    (tmp_path / "checkpoint-2").mkdir()
    with monkeypatch.context() as patch:
        FAILURES[failure](patch)
        with pytest.raises((OSError, KeyboardInterrupt)):
            callback.on_save(args, TrainerState(global_step=2), TrainerControl())
    assert os.listdir(tmp_path / "checkpoint-2") == []
    with pytest.raises(StateError, match="no pruning state"):
        load_state(tmp_path / "checkpoint-2")
