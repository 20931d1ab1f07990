"""Where the main job's examples come from, read by ``datasets``: a built-in set, files, or a cache.

A source is one string, as ``--data`` or a recipe's ``data: {dataset: ...}`` gives it:

- ``wnut``, ``polarity`` or ``austen``, the built-in offline sets (WNUT-16 entities, movie-review
  polarity, Jane Austen's novels as text for a language model);
- a CSV / TSV / JSON / JSON-lines / parquet file, or a folder of them (``datasets`` reads file
  names such as ``train.csv`` and ``test.csv`` as splits);
- a folder of images, one subfolder per class (``datasets``' imagefolder: an ``image`` and a
  ``label`` column; ``train/`` and ``test/`` subfolders are splits);
- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
- the name of a dataset already in the local ``datasets`` cache (nothing is downloaded when offline).

Every source comes back as a ``DatasetDict``; a single table is its ``train`` split.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hfprune.errors import HfpruneError

# datasets' packaged builder for each file type; a TSV is a CSV with tabs.
FILE_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top of its folder


def builtin_sources() -> dict[str, Callable]:
    """Each built-in source's loader, by name."""
    return {"wnut": wnut_dataset, "polarity": polarity_dataset, "austen": austen_dataset}


def load_source(source: str):
    """The ``DatasetDict`` that ``source`` names; a one-line error saying what it is not when it cannot be
    read."""
    loader = builtin_sources().get(source)
    if loader is not None:
        return loader()
    path = Path(source)
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_folder(path)
    return _load_cached(source)


def wnut_dataset(examples: list | None = None):
    """WNUT-16 tweets as ``tokens`` and ``tags`` columns, the tags a sequence of named classes."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    from hfprune.data import wnut

    examples = wnut.read_wnut() if examples is None else examples
    features = Features(
        {"tokens": Sequence(Value("string")), "tags": Sequence(ClassLabel(names=wnut.label_list(examples)))}
    )
    columns = {"tokens": [tokens for tokens, _ in examples], "tags": [tags for _, tags in examples]}
    return DatasetDict({"train": Dataset.from_dict(columns, features=features)})


def polarity_dataset(examples: list | None = None):
    """Movie-review sentences as ``text`` and ``label`` columns (0 negative, 1 positive)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from hfprune.data.polarity import read_polarity

    examples = read_polarity() if examples is None else examples
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    columns = {"text": [text for text, _ in examples], "label": [label for _, label in examples]}
    return DatasetDict({"train": Dataset.from_dict(columns, features=features)})


def austen_dataset(novels: dict[str, list[str]] | None = None):
    """Jane Austen's six novels as a ``text`` column, one paragraph per row: text for a language model."""
    from datasets import Dataset, DatasetDict

    from hfprune.data.austen import read_austen

    novels = read_austen() if novels is None else novels
    paragraphs = [paragraph for lines in novels.values() for paragraph in _paragraphs(lines)]
    return DatasetDict({"train": Dataset.from_dict({"text": paragraphs})})


def _paragraphs(lines: list[str]) -> list[str]:
    """Runs of non-blank lines, each joined into one line."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def _load_file(path: Path):
    builder, options = _builder(path)
    return _read(path, lambda load_dataset, _: load_dataset(builder, data_files=str(path), **options))


def _load_folder(path: Path):
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        return _read(path, lambda _, load_from_disk: _as_dict(load_from_disk(str(path))))
    suffixes = {file.suffix.lower() for file in path.rglob("*") if file.is_file()}
    if suffixes & FILE_BUILDERS.keys():
        return _read(path, lambda load_dataset, _: load_dataset(str(path)))
    if suffixes & IMAGE_SUFFIXES:
        return _read(path, lambda load_dataset, _: load_dataset("imagefolder", data_dir=str(path)))
    raise HfpruneError(
        f"data folder {path} holds no {'/'.join(sorted(FILE_BUILDERS))} files, no images and is not a "
        "save_to_disk folder"
    )


def _load_cached(name: str):
    return _read(
        name,
        lambda load_dataset, _: load_dataset(name),
        hint=f"{name!r} is not a built-in set ({', '.join(builtin_sources())}), a file, a folder, or a "
        "dataset in the local datasets cache",
    )


def _read(source, load: Callable, hint: str | None = None):
    """``load(load_dataset, load_from_disk)``, with whatever ``datasets`` raises turned into one line."""
    from datasets import load_dataset, load_from_disk

    try:
        return load(load_dataset, load_from_disk)
    except (
        Exception
    ) as exc:  # datasets raises a dozen types (builder, cast, pyarrow, hub); the reason is in text
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise HfpruneError(f"cannot read data {source}: {hint or reason}") from None


def _builder(path: Path) -> tuple[str, dict]:
    try:
        return FILE_BUILDERS[path.suffix.lower()]
    except KeyError:
        raise HfpruneError(
            f"cannot read data {path}: {path.suffix or 'no suffix'} is not one of {', '.join(FILE_BUILDERS)}"
        ) from None


def _as_dict(loaded):
    """A ``DatasetDict``; a saved single ``Dataset`` becomes its ``train`` split."""
    from datasets import DatasetDict

    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
