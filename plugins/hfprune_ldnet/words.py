"""Word vocabularies for LD-Net's word-level models, with one unknown-word token per word shape.

A word outside the vocabulary becomes the unknown token of its shape (capitalized, all
capitals, a number, a user name, a hashtag, a link, punctuation, other), not one ``<unk>``
for all: a language model trained on novels then still tells a rare name ("Wentworth",
``<unk-Cap>``) from a rare verb, which is what a tagger reading it needs for the names in
tweets it has never seen.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PAD = "<pad>"
SHAPES = ("<unk>", "<unk-Cap>", "<unk-CAPS>", "<unk-num>", "<unk-@>", "<unk-#>", "<unk-url>", "<unk-punct>")
WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")  # words (with inner apostrophes) and single punctuation marks


def split_words(text: str) -> list[str]:
    """``text`` as words and punctuation marks, case kept."""
    return WORD.findall(text)


def shape(word: str) -> str:
    """The unknown-word token standing for ``word`` when it is not in a vocabulary."""
    if word.startswith("@") and len(word) > 1:
        return "<unk-@>"
    if word.startswith("#") and len(word) > 1:
        return "<unk-#>"
    if word.lower().startswith(("http:", "https:", "www.")):
        return "<unk-url>"
    if any(c.isdigit() for c in word):
        return "<unk-num>"
    if not any(c.isalnum() for c in word):
        return "<unk-punct>"
    if word.isupper() and len(word) > 1:
        return "<unk-CAPS>"
    if word[:1].isupper():
        return "<unk-Cap>"
    return "<unk>"


class WordVocabulary:
    """Words to ids: ``<pad>`` is 0, the shape tokens come next, then the words in the order given."""

    def __init__(self, words: Iterable[str]):
        self.words = [PAD, *SHAPES]
        self.words += [w for w in dict.fromkeys(words) if w not in self.words]
        self.index = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def most_frequent(cls, words: Iterable[str], size: int) -> WordVocabulary:
        """The ``size`` - 9 most frequent of ``words`` (ties in first-seen order) and the special tokens."""
        counts = Counter(words)
        return cls(word for word, _ in counts.most_common(max(size - 1 - len(SHAPES), 0)))

    def __len__(self) -> int:
        return len(self.words)

    def id(self, word: str) -> int:
        found = self.index.get(word)
        return found if found is not None else self.index[shape(word)]

    def ids(self, words: Iterable[str]) -> list[int]:
        return [self.id(word) for word in words]

    def extended(self, words: Iterable[str]) -> WordVocabulary:
        """This vocabulary with ``words`` it lacks appended: ids it had stay the same."""
        return WordVocabulary([*self.words, *words])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.words, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> WordVocabulary:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))
