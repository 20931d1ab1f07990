"""Datasets that ship as packages and load offline, for the main job and the benchmarks."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split(examples: list[T], test_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A shuffled (train, test) split; the same seed always gives the same split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    test_size = round(len(examples) * test_fraction)
    return [examples[i] for i in order[test_size:]], [examples[i] for i in order[:test_size]]
