"""Command-line arguments shared by ``hfprune run`` and ``hfprune prune``."""

from __future__ import annotations

import argparse

from hfprune.recipe.run_sections import TASKS, DataSection, merge


def positive(kind: type):
    """An argparse type that refuses zero, negatives and non-numbers with a usage error (exit 2)."""
    expected = "a positive integer" if kind is int else "a positive number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:  # "not >" also refuses nan
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def add_data_arguments(group) -> None:
    """The data flags (recipe section ``data:``): the source, the task, its columns, the length."""
    group.add_argument(
        "--data",
        "--dataset",
        dest="dataset",
        metavar="SOURCE",
        help="wnut: WNUT-16 entities, entity F1 (default); polarity: movie-review sentences, accuracy; or "
        "the user's data: a CSV/TSV/JSON/JSON-lines/parquet file or folder of them, a folder of images (one "
        "subfolder per class), a save_to_disk folder, or a dataset name in the local datasets cache",
    )
    group.add_argument(
        "--task",
        choices=TASKS,
        help="what to fine-tune for (default: inferred; word-tag lists: token-classification, one label per "
        "row: sequence-classification, images with labels: image-classification, text without labels and a "
        "causal LM: causal-lm)",
    )
    for column, meaning in (
        ("text", "the text, or the words of token classification"),
        ("text-pair", "the second text of a pair"),
        ("label", "the labels, or the tags of token classification"),
        ("image", "the images of image classification"),
    ):
        group.add_argument(
            f"--{column}-column",
            metavar="NAME",
            help=f"the column holding {meaning} (default: found by name)",
        )
    group.add_argument(
        "--max-length",
        type=positive(int),
        metavar="N",
        help=f"sub-tokens per example after truncation; tokens per block of text (default: "
        f"{DataSection().max_length})",
    )


def data_section(recipe_data: DataSection | None, args: argparse.Namespace, train_limit: int | None):
    """The recipe's ``data:`` section with the flags of :func:`add_data_arguments` given on the command line
    (and ``train_limit``, which each command names its own way) put over it."""
    return merge(
        recipe_data,
        DataSection,
        {
            "dataset": args.dataset,
            "task": args.task,
            "text_column": args.text_column,
            "text_pair_column": args.text_pair_column,
            "label_column": args.label_column,
            "image_column": args.image_column,
            "max_length": args.max_length,
            "train_limit": train_limit,
            "test_limit": args.test_limit,
        },
    )
