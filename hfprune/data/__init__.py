"""Data for the main job and the benchmarks: built-in sets that load offline, the user's (:mod:`.sources`)."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split(examples: list[T], test_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A shuffled (train, test) split; the same seed always gives the same split."""
    train, test = split_indices(len(examples), test_fraction, seed)
    return [examples[i] for i in train], [examples[i] for i in test]


def split_indices(count: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) positions of a shuffled split of ``count`` examples; a seed always splits the same."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    test_size = round(count * test_fraction)
    return order[test_size:], order[:test_size]
