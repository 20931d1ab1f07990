"""``hfprune compact CHECKPOINT``: turn a pruned Trainer checkpoint into a smaller model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfprune.cli.model_sources import AUTO_CLASSES, load_model
from hfprune.pruner import Pruner
from hfprune.recipe import builtin as builtin_recipes

TRAINER_STATE = "trainer_state.json"


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``compact`` subcommand to the ``hfprune`` command line."""
    compact = commands.add_parser(
        "compact",
        help="turn a pruned Trainer checkpoint into a smaller model without its pruned layers, heads and "
        "neurons",
        description="Load the model in CHECKPOINT (a Trainer checkpoint folder holding "
        "hfprune_state.safetensors), remove "
        "the layers, heads and neurons RECIPE's structured strategies pruned, check the smaller model's "
        "outputs against the "
        "pruned one's, and save it (with the tokenizer, if the checkpoint has one) to OUTPUT. A checkpoint "
        "of a LoRA run "
        "(adapter_config.json) is loaded over the base model its config names, and the adapters are merged "
        "with the "
        "pruned weights kept zero before compacting. Load the result with "
        "hfprune.load_compacted(OUTPUT); when every layer kept the same sizes and the config can state "
        "them, plain "
        "AutoModelFor*.from_pretrained(OUTPUT) loads it too.",
    )
    compact.add_argument(
        "checkpoint",
        help="Trainer checkpoint folder (config.json and weights, or a LoRA adapter; "
        "hfprune_state.safetensors)",
    )
    compact.add_argument(
        "--recipe", required=True, help="the recipe the run trained with (a file or a built-in recipe's name)"
    )
    compact.add_argument(
        "--output", required=True, help="folder to write the compacted model to (must not exist or be empty)"
    )
    compact.add_argument(
        "--task",
        choices=sorted(AUTO_CLASSES),
        default="sequence-classification",
        help="which head the checkpoint has",
    )
    compact.set_defaults(handler=run_compact)


def run_compact(args: argparse.Namespace) -> int:
    from hfprune.compaction.compact import LAYOUT_KEY, save_compacted

    checkpoint = Path(args.checkpoint)
    pruner = Pruner(builtin_recipes.resolve(args.recipe))
    model = load_model(checkpoint, args.task)
    pruner.attach(model)
    pruner.start(_max_steps(checkpoint))
    pruner.load(checkpoint)
    before = sum(p.numel() for p in model.parameters())
    compacted = pruner.compact(model)
    save_compacted(compacted, args.output, tokenizer_from=checkpoint)
    after = sum(p.numel() for p in compacted.parameters())
    print(
        f"compacted {before:,} -> {after:,} parameters ({before / after:.2f}x fewer); outputs checked on a "
        "probe batch"
    )
    if getattr(compacted.config, LAYOUT_KEY, None):
        how = (
            f"hfprune.load_compacted({str(args.output)!r}) (the config records per-block sizes a stock "
            "config cannot state)"
        )
    else:
        how = (
            f"plain {AUTO_CLASSES[args.task]}.from_pretrained({str(args.output)!r}) (stock config) or "
            "hfprune.load_compacted"
        )
    print(f"saved to {args.output}; load it with {how}")
    return 0


def _max_steps(checkpoint: Path) -> int | None:
    """The run length the Trainer recorded, which fractional schedules resolve against."""
    state = checkpoint / TRAINER_STATE
    return json.loads(state.read_text()).get("max_steps") if state.is_file() else None
