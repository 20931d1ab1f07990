"""CPU latency of models compared on the same inputs, measured alternately in one loop.

Shared machines drift: timing one model and then the other lets the drift land on one of
them. Alternating which model runs first and taking medians gives ratios that hold up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn


def random_inputs(vocab_size: int, batch: int, sequence: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids drawn from a fixed generator, with a full attention mask."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab_size, (batch, sequence), generator=generator),
        "attention_mask": torch.ones(batch, sequence, dtype=torch.long),
    }


def inputs_for(model: nn.Module, batch: int, sequence: int) -> dict[str, torch.Tensor]:
    """Random inputs of the kind ``model`` reads: images of its size (compaction's probe images) when its
    input is ``pixel_values``, else :func:`random_inputs` tokens."""
    from hfprune.compaction.compact import probe_batch, reads_images

    if reads_images(model):
        return probe_batch(model, batch_size=batch)
    return random_inputs(model.config.vocab_size, batch, sequence)


def interleaved_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, after one warm-up each, alternating the order every repeat."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


@torch.inference_mode()
def interleaved_latency(
    models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], repeats: int
) -> dict[str, float]:
    """Median milliseconds per forward pass of each model (in eval mode) on ``inputs``:
    :func:`interleaved_times`."""
    return interleaved_times(
        {name: partial(model.eval(), **inputs) for name, model in models.items()}, repeats
    )
