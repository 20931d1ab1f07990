"""A picture of what was pruned: per layer the share of heads, neurons and weights kept; metrics before and
after.

matplotlib is imported inside :func:`plot_pruning`, so ``import hfprune`` stays light, and
the figure is drawn on its own Agg canvas, never through pyplot: nothing in the caller's
matplotlib state (backend, open figures) changes.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path

SIZE = (10, 4)  # inches
DPI = 100
BARS = (
    ("heads", "heads kept", "tab:blue"),
    ("neurons", "neurons kept", "tab:orange"),
    (None, "non-zero weights", "tab:green"),
)
WIDTH = 0.8  # of one layer's slot, shared by its bars


def plot_pruning(
    structure: dict,
    path: str | os.PathLike,
    metrics: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
    compared: tuple[str, str] = ("before", "after"),
) -> Path:
    """Write a PNG (10x4 inches, 100 dpi) of ``structure`` (from
    :func:`hfprune.compaction.structure.model_structure`) to ``path``.

    Left: per layer, the fraction of heads kept, of neurons kept and of weights that are
    not zero; a deleted layer (``kept`` False) is an empty hatched bar labelled "deleted",
    since its weights say nothing about it. A model without recognized layers gets one bar
    for all its weights. Right, when ``metrics`` is given (label: (before, after), such as
    ``{"entity F1": (0.40, 0.38), "latency ms (batch 32)": (120.0, 55.0)}``): each pair
    as bars scaled to the larger of the two, so an F1 and a latency share one axis, each
    bar labelled with its value; ``compared`` names the two sides (legend and panel title).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    if metrics:
        layers_axes, metrics_axes = figure.subplots(1, 2, width_ratios=(3, 1))
        _draw_metrics(metrics_axes, metrics, compared)
    else:
        layers_axes = figure.subplots()
    _draw_layers(layers_axes, structure)
    figure.suptitle(title or _title(structure))
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def _title(structure: dict) -> str:
    layers = [layer for stack in structure["stacks"] for layer in stack["layers"]]
    kept = sum(layer["kept"] for layer in layers)
    depth = f"{kept} of {len(layers)} layers kept, " if layers else ""
    return f"What was pruned: {structure['model']} ({depth}{structure['sparsity']:.1%} of all weights zero)"


def _draw_layers(axes, structure: dict) -> None:
    stacks = structure["stacks"]
    several = len(stacks) > 1
    layers = [
        (f"{stack['name']}.{layer['index']}" if several else str(layer["index"]), layer)
        for stack in stacks
        for layer in stack["layers"]
    ]
    if not layers:  # no adapter knows the model: all its weights as one bar
        layers = [
            ("all weights", {"kept": True, "heads": None, "neurons": None, "sparsity": structure["sparsity"]})
        ]
    bar = WIDTH / len(BARS)
    for position, (_, layer) in enumerate(layers):
        if not layer["kept"]:
            axes.bar(position, 1.0, WIDTH, fill=False, hatch="//", edgecolor="gray", label="deleted layer")
            axes.text(
                position,
                0.5,
                "deleted",
                ha="center",
                va="center",
                rotation=90,
                color="dimgray",
                backgroundcolor="white",
            )
            continue
        for slot, (key, label, color) in enumerate(BARS):
            value = 1.0 - layer["sparsity"] if key is None else _fraction(layer[key])
            if not math.isnan(value):
                axes.bar(position + (slot - 1) * bar, value, bar, color=color, label=label)
    axes.set_xticks(range(len(layers)), [name for name, _ in layers], rotation=90 if len(layers) > 16 else 0)
    axes.set_xlabel("layer" if structure["stacks"] else "")
    axes.set_ylabel("fraction kept")
    axes.set_ylim(0, 1.25)  # room above full bars for the legend
    axes.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per kind, not per layer
    axes.legend(
        unique.values(), unique.keys(), loc="upper center", ncol=len(unique), fontsize="small", frameon=False
    )


def _fraction(groups: dict | None) -> float:
    """live / of, or NaN (no bar) where the layer has no such units or the config states no total."""
    if groups is None or not groups["of"]:
        return math.nan
    return groups["live"] / groups["of"]


def _draw_metrics(axes, metrics: Mapping[str, tuple[float, float]], compared: tuple[str, str]) -> None:
    bar = WIDTH / 2
    for position, pair in enumerate(metrics.values()):
        scale = max(abs(v) for v in pair) or 1.0
        for slot, (value, label, color) in enumerate(zip(pair, compared, ("silver", "tab:purple"))):
            x = position + (slot - 0.5) * bar
            axes.bar(x, value / scale, bar, color=color, label=label if position == 0 else None)
            axes.text(x, value / scale + 0.02, f"{value:.3g}", ha="center", va="bottom", fontsize="x-small")
    axes.set_xticks(range(len(metrics)), [textwrap.fill(name, 14) for name in metrics], fontsize="small")
    axes.set_ylabel("scaled to the larger value")
    axes.set_ylim(0, 1.25)
    axes.set_yticks([])
    axes.set_title(" vs ".join(compared), fontsize="medium")
    axes.legend(loc="upper center", ncol=2, fontsize="small", frameon=False)
