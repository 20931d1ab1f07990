"""The recipes that ship with hfprune, usable by name wherever a recipe path is accepted.

``hfprune run block-lasso``, ``hfprune check default`` and ``PruneCallback("layer-lasso")``
find them here, in the installed package, so they work from a wheel as well as from a
source checkout. A file of the same name in the working directory wins.
"""

from __future__ import annotations

from pathlib import Path

from hfprune.errors import HfpruneError

FOLDER = Path(__file__).parent


def builtin_names() -> list[str]:
    return sorted(path.stem for path in FOLDER.glob("*.yaml"))


def builtin_path(name: str) -> Path:
    """The file of the built-in recipe ``name`` (e.g. 'default', 'block-lasso')."""
    path = FOLDER / f"{name}.yaml"
    if not path.is_file():
        raise HfpruneError(f"no built-in recipe {name!r}; built-in recipes: {', '.join(builtin_names())}")
    return path


def is_builtin_name(text: str) -> bool:
    """``text`` names a built-in recipe and is not a file here."""
    return text in builtin_names() and not Path(text).exists()


def resolve(argument: str) -> Path:
    """A recipe named on the command line: an existing file, else a built-in recipe's name."""
    path = Path(argument)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise HfpruneError(
            f"recipe file {argument} does not exist (built-in recipes by name: {', '.join(builtin_names())})"
        )
    return builtin_path(argument)
