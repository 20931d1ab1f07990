"""Which columns of the user's data hold the text (or images) and the labels, which task that makes, and what
is wrong.

Names given in the recipe's ``data:`` section or on the command line win; otherwise the
usual names of Hugging Face datasets are tried (``text``, ``sentence``, ``sentence1`` and
``sentence2``, ``tokens`` and ``ner_tags``, ``label``), and an image column is the one that
holds images. Every problem is one line naming the
data and the column, raised before any model is built.
"""

from __future__ import annotations

from typing import NamedTuple

from hfprune.errors import HfpruneError
from hfprune.recipe.run_sections import DataSection

LABEL_NAMES = ("label", "labels", "ner_tags", "tags")
TEXT_NAMES = {
    "token-classification": ("tokens", "words"),
    "sequence-classification": ("text", "sentence", "sentence1", "premise", "question", "content", "review"),
    "causal-lm": ("text", "content"),
}
PAIRED = {"sentence1": "sentence2", "premise": "hypothesis", "question": "sentence"}
CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")


class Columns(NamedTuple):
    text: str | None  # None for image classification, which reads ``image``
    text_pair: str | None
    label: str | None
    image: str | None = None


def infer_task(data: DataSection, dataset, model_config) -> str:
    """Token classification for word-tag lists, sequence classification for single labels, language
    modelling for unlabelled text given to a causal language model."""
    features = _train(data, dataset).features
    label = _label_column(data, features)
    if label is not None and _image_column(data, features) is not None:
        return "image-classification"
    if label is not None:
        return "token-classification" if _is_list(features[label]) else "sequence-classification"
    if any(name.endswith(CAUSAL_LM_HEADS) for name in getattr(model_config, "architectures", None) or []):
        return "causal-lm"
    raise _no_label_column(data, features, ", or pass --task causal-lm with a causal language model")


def find_columns(data: DataSection, dataset, task: str) -> Columns:
    """The columns ``task`` reads, each checked in every split: present, of the right type, never empty."""
    features = _train(data, dataset).features
    label = None if task == "causal-lm" else _label_column(data, features)
    if task != "causal-lm" and label is None:
        raise _no_label_column(data, features, f" ({task} needs one)")
    if task == "image-classification":
        return _image_columns(data, dataset, label)
    text = data.text_column or _first_present(features, TEXT_NAMES[task], exclude=label)
    if text is None:
        raise HfpruneError(
            f"data {data.dataset} has no text column (looked for {', '.join(TEXT_NAMES[task])}; its columns: "
            f"{', '.join(features)}); name it with --text-column"
        )
    pair = data.text_pair_column or (PAIRED.get(text) if PAIRED.get(text) in features else None)
    columns = Columns(text, pair if task == "sequence-classification" else None, label)
    for split in dataset.values():
        _check_columns(data, split, columns, task)
    if label is not None:
        names, _ = label_classes(dataset, label)
        if len(names) < 2:
            raise HfpruneError(
                f"data {data.dataset}: label column {label!r} holds one class "
                f"({names[0] if names else 'none'}); there is nothing to tell apart"
            )
    return columns


def _image_columns(data: DataSection, dataset, label: str) -> Columns:
    features = _train(data, dataset).features
    image = _image_column(data, features)
    if image is None:
        raise HfpruneError(
            f"data {data.dataset} has no image column (its columns: {', '.join(features)}); image "
            "classification reads a folder of images, one subfolder per class"
        )
    columns = Columns(None, None, label, image)
    for split in dataset.values():
        _check_columns(data, split, columns, "image-classification")
    return columns


def _image_column(data: DataSection, features) -> str | None:
    """The column named ``image_column`` (which must hold images), else the first that holds images."""
    from datasets import Image

    if data.image_column is not None:
        found = features.get(data.image_column)
        if found is None:
            raise HfpruneError(
                f"data {data.dataset} has no image column {data.image_column!r}; its columns: "
                f"{', '.join(features)}"
            )
        if not isinstance(found, Image):
            raise HfpruneError(
                f"data {data.dataset}: image column {data.image_column!r} holds {found}, not images"
            )
        return data.image_column
    return next((name for name, feature in features.items() if isinstance(feature, Image)), None)


def label_classes(dataset, column: str) -> tuple[list[str], list]:
    """(name, stored value) of each class, in class-id order: a ClassLabel's names and ids, else the values
    found in every split, sorted."""
    feature = next(iter(dataset.values())).features[column]
    named = getattr(feature, "feature", feature)  # a list column's item
    if hasattr(named, "names"):
        return list(named.names), list(range(len(named.names)))
    values = set()
    for split in dataset.values():
        for value in split[column]:
            values.update(value if isinstance(value, list) else [value])
    ordered = sorted(values)
    return [str(value) for value in ordered], ordered


def _check_columns(data: DataSection, split, columns: Columns, task: str) -> None:
    if len(split) == 0:
        return  # a split nothing reads may be empty; one that is read is refused when it is split off
    for role, column in zip(("text", "text pair", "label", "image"), columns):
        if column is None:
            continue
        if column not in split.features:
            raise HfpruneError(
                f"data {data.dataset} has no {role} column {column!r}; "
                f"its columns: {', '.join(split.features)}"
            )
        if role == "image":
            continue  # reading the column would decode every image; imagefolder lists only image files
        values = split[column]
        empty = next(
            (row for row, value in enumerate(values) if value is None or value == "" or value == []), None
        )
        if empty is not None:
            raise HfpruneError(f"data {data.dataset}: row {empty} of {role} column {column!r} is empty")
    if task == "image-classification":
        return
    wants_words = task == "token-classification"
    if wants_words != _is_list(split.features[columns.text]) or not _holds_text(split.features[columns.text]):
        shape = "lists of words" if wants_words else "text"
        raise HfpruneError(
            f"data {data.dataset}: text column {columns.text!r} must hold {shape} for {task}, "
            f"not {split.features[columns.text]}"
        )
    if wants_words:
        tags = split.features[columns.label]
        if not hasattr(getattr(tags, "feature", None), "names") and not _holds_text(tags):
            raise HfpruneError(
                f"data {data.dataset}: label column {columns.label!r} must hold tag names "
                "(B-PER, I-PER, O) or named classes for entity scoring, not numbers"
            )


def _train(data: DataSection, dataset):
    return named_split(data, dataset, data.train_split)


def named_split(data: DataSection, dataset, name: str):
    """The split ``name`` of ``dataset``; a one-line error listing the splits when there is none."""
    if name not in dataset:
        raise HfpruneError(f"data {data.dataset} has no {name!r} split; its splits: {', '.join(dataset)}")
    return dataset[name]


def _no_label_column(data: DataSection, features, advice: str) -> HfpruneError:
    return HfpruneError(
        f"data {data.dataset} has no label column (looked for {', '.join(LABEL_NAMES)}; its columns: "
        f"{', '.join(features)}): name one with --label-column{advice}"
    )


def _label_column(data: DataSection, features) -> str | None:
    if data.label_column is not None and data.label_column not in features:
        raise HfpruneError(
            f"data {data.dataset} has no label column {data.label_column!r}; "
            f"its columns: {', '.join(features)}"
        )
    return data.label_column or _first_present(features, LABEL_NAMES)


def _first_present(features, names, exclude: str | None = None) -> str | None:
    return next((name for name in names if name in features and name != exclude), None)


def _is_list(feature) -> bool:
    from datasets import LargeList, List, Sequence

    return isinstance(feature, (List, LargeList, Sequence, list))


def _holds_text(feature) -> bool:
    """A string column, or a list of strings."""
    inner = getattr(feature, "feature", feature)
    return getattr(inner, "dtype", None) in ("string", "large_string")
