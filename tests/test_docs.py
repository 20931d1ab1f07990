"""The docs hold together: every worked recipe loads, and every relative link in the markdown resolves."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DOCS = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "BENCHMARKS.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
REQUIRED_PAGES = [
    "recipes",
    "strategies",
    "distillation",
    "compaction",
    "distributed",
    "peft",
    "ldnet",
    "main-job",
]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where link syntax is only text."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, punctuation dropped, spaces as
    hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links in ``path`` whose file does not exist, or whose #anchor names no heading of its
    markdown file."""

    def shown(file: Path) -> Path:
        return file.relative_to(ROOT if file.is_relative_to(ROOT) else path.parent)

    broken = []
    for target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no file {shown(resolved)}")
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {shown(resolved)}")
    return broken


def test_there_are_worked_recipes():
    assert len(RECIPES) >= 5, "recipes/ holds worked example recipes, one per use case"


@pytest.mark.parametrize("path", RECIPES, ids=[path.name for path in RECIPES])
def test_every_worked_recipe_loads_and_is_commented(path):
    import hfprune

    recipe = hfprune.load_recipe(path)
    assert recipe.pruners
    assert path.read_text(encoding="utf-8").startswith("#"), (
        f"{path.name} opens with a comment saying what it is for"
    )


def test_the_readme_stays_short():
    """The README is the first screen and a map; the reference lives in docs/ (``wc -w`` counts the same
    words)."""
    words = len((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert words <= 1500, f"README.md has {words} words; move reference material into docs/"


def test_every_worked_recipe_is_linked_from_the_recipes_page():
    linked = {
        (ROOT / "docs" / target.partition("#")[0]).resolve()
        for target in links((ROOT / "docs" / "recipes.md").read_text())
    }
    assert [path.name for path in RECIPES if path.resolve() not in linked] == []


def test_the_readme_links_every_docs_page():
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert {page.stem for page in pages} >= set(REQUIRED_PAGES)
    linked = {
        (ROOT / target.partition("#")[0]).resolve() for target in links((ROOT / "README.md").read_text())
    }
    assert [page.name for page in pages if page.resolve() not in linked] == []


@pytest.mark.parametrize("path", DOCS, ids=[str(path.relative_to(ROOT)) for path in DOCS])
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def config_tables(text: str) -> dict[str, list[str]]:
    """Per ``## name`` section of a page, the keys its ``| `key` | default | meaning |`` table lists."""
    tables: dict[str, list[str]] = {}
    for section in re.split(r"^## ", FENCE.sub("", text), flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        keys = re.findall(r"^\| `(\w+)` \|", body, re.M)
        if keys:
            tables[title.strip()] = keys
    return tables


def test_the_strategy_pages_config_tables_list_every_setting():
    """docs/strategies.md's table for each strategy names exactly the keys its Config accepts, no more, no
    fewer."""
    from hfprune.plugins import build_registry

    strategies = build_registry().strategies
    tables = config_tables((ROOT / "docs" / "strategies.md").read_text(encoding="utf-8"))
    assert set(tables) >= {"magnitude", "rpp", "block-lasso", "layer-lasso"}
    for name, keys in tables.items():
        assert name in strategies, (
            f"docs/strategies.md documents {name!r}, which no installed plugin registers"
        )
        fields = list(strategies[name].cls.Config.model_fields)
        assert sorted(keys) == sorted(fields), (
            f"docs/strategies.md's {name} table lists {sorted(keys)}; its Config has {sorted(fields)}: "
            f"document {sorted(set(fields) - set(keys))}, drop {sorted(set(keys) - set(fields))}"
        )


def test_the_link_check_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text(
        "# Other page\n\n## Choosing `lam` (rpp, block-lasso)\n\n## Twice\n\n## Twice\n"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#choosing-lam-rpp-block-lasso) [ok](other.md#twice-1) [ok](#here)\n"
        "[web](https://example.org/x) `[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n\n## "
        "Here\n"
        "[gone](missing.md) [no anchor](other.md#nowhere) [self](#not-here)\n"
    )
    assert broken_links(page) == [
        "missing.md: no file missing.md",
        "other.md#nowhere: no heading with anchor #nowhere in other.md",
        "#not-here: no heading with anchor #not-here in page.md",
    ]


def test_slugs_follow_github():
    assert slug(
        "Block-lasso and compaction: smaller, faster, how accurate (`benchmarks/block_compaction.py`)"
    ) == ("block-lasso-and-compaction-smaller-faster-how-accurate-benchmarksblock_compactionpy")
    assert slug("Layers that read other layers' outputs") == "layers-that-read-other-layers-outputs"
