"""``hfprune report MODEL_DIR``: the sparsity and structure of any saved model folder.

Stock checkpoints and compacted ones (whose config.json records per-block sizes under
``hfprune_layout``) load the same way, through :func:`hfprune.compaction.loading.load_compacted`.
transformers is imported inside the handler, so ``--help`` and usage errors stay fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfprune.cli.text_table import print_table
from hfprune.errors import HfpruneError

CONFIG = "config.json"


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand to the ``hfprune`` command line."""
    report = commands.add_parser(
        "report",
        help="show the sparsity and structure of a saved model: heads, neurons, parameters and zeros per "
        "layer",
        description="Load the model saved in MODEL_DIR (a save_pretrained folder, stock or compacted) and "
        "print, per "
        "layer, the attention heads and FFN neurons still live out of those its config states (a head or "
        "neuron whose "
        "output weights are all exactly zero is not live), its parameters and the fraction of its weights "
        "that are "
        "exactly zero; then the model's parameters and zeros in all. Layers are found through the installed "
        "architecture adapters (hfprune plugins); other models get totals and per-matrix sparsity. --json "
        "prints all "
        "of it, per weight matrix too, for scripts.",
    )
    report.add_argument(
        "model_dir", metavar="MODEL_DIR", help="folder with config.json and model.safetensors"
    )
    report.add_argument("--json", action="store_true", help="print the structure as JSON instead of tables")
    report.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    path = Path(args.model_dir)
    model = _load(path)
    from hfprune.compaction.structure import model_structure
    from hfprune.plugins import default_registry

    structure = model_structure(model, default_registry().architectures)
    if args.json:
        print(json.dumps(structure, indent=2))
    else:
        _print_structure(structure, path)
    return 0


def _load(path: Path):
    """The model in ``path``, in the class its config names; HfpruneError with one line when it cannot be
    read."""
    if not path.is_dir():
        raise HfpruneError(f"{path} is not a folder; pass a model folder written by save_pretrained")
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HfpruneError(
            f"{path} has no {CONFIG}; pass a model folder written by save_pretrained"
        ) from None
    except (OSError, ValueError) as exc:
        raise HfpruneError(f"cannot read {path / CONFIG}: {exc}") from None
    if not config.get("architectures"):
        raise HfpruneError(
            f"{path / CONFIG} names no model class ('architectures' is empty), so there is no telling which "
            "one to load"
        )

    # Imported only now: transformers takes seconds to import.
    from safetensors import SafetensorError
    from transformers.utils import logging

    from hfprune.compaction.loading import load_compacted

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # the report is the output; a weight-loading bar would only clutter it
    try:
        return load_compacted(path)
    except SafetensorError as exc:
        raise HfpruneError(
            f"the weights in {path} are not a readable safetensors file: {_first_line(exc)}"
        ) from None
    except (HfpruneError, OSError, ValueError, RuntimeError) as exc:
        raise HfpruneError(f"cannot load the model in {path}: {_first_line(exc)}") from None
    finally:
        if bar:
            logging.enable_progress_bar()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _print_structure(structure: dict, path: Path) -> None:
    print(f"{path}: {structure['model']} ({structure['model_type']})")
    for stack in structure["stacks"]:
        print(f"\n{stack['name']}: {len(stack['layers'])} layers")
        rows = [
            (
                layer["index"],
                _share(layer["heads"]),
                _share(layer["neurons"]),
                f"{layer['parameters']:,}",
                f"{layer['sparsity']:.1%}",
            )
            for layer in stack["layers"]
        ]
        print_table(("layer", "heads", "neurons", "parameters", "zero weights"), rows)
    if not structure["stacks"]:
        print("\nno installed architecture adapter recognizes its layers; per weight matrix:")
        print_table(
            ("matrix", "shape", "zero weights"),
            [
                (m["name"], "x".join(map(str, m["shape"])), f"{m['sparsity']:.1%}")
                for m in structure["matrices"]
            ],
        )
    print(
        f"\ntotal: {structure['parameters']:,} parameters, {structure['zero_parameters']:,} exactly zero "
        f"({structure['sparsity']:.1%})"
    )
    if structure["hfprune_layout"]:
        print(
            f"compacted with per-block sizes (hfprune_layout in {CONFIG}): load it with "
            f"hfprune.load_compacted({str(path)!r}); "
            "plain from_pretrained stops with a size mismatch"
        )


def _share(groups: dict | None) -> str:
    """'live/of' heads or neurons; '-' for a layer without any, '?' where the config states no total."""
    if groups is None:
        return "-"
    return f"{groups['live']}/{'?' if groups['of'] is None else groups['of']}"
