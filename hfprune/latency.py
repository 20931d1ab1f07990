"""CPU latency of models compared on the same inputs, measured alternately in one loop.

Shared machines drift: timing one model and then the other lets the drift land on one of
them. Alternating which model runs first and taking medians gives ratios that hold up.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def random_inputs(vocab_size: int, batch: int, sequence: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids drawn from a fixed generator, with a full attention mask."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab_size, (batch, sequence), generator=generator),
        "attention_mask": torch.ones(batch, sequence, dtype=torch.long),
    }


@torch.inference_mode()
def interleaved_latency(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Median milliseconds per forward pass of each model, after one warm-up each, alternating the order every repeat."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()(**inputs)
    names = list(models)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            models[name](**inputs)
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}
