"""What the commands measure about a pruned model and its compacted copy: sizes, sparsity, structure, speed.

Shared by ``hfprune run`` and ``hfprune prune``, whose reports have the same parts.
"""

from __future__ import annotations

LATENCY_BATCHES = {1: 30, 32: 10}  # batch size: timed forward passes of each model
# A causal LM's batch of 32 x 128 tokens takes seconds per pass on a CPU: smaller batches, fewer repeats.
CAUSAL_LM_LATENCY_BATCHES = {1: 10, 8: 5}


def latency_batches(task_kind: str) -> dict[int, int]:
    """The batch sizes a task's models are timed at, and the timed passes at each."""
    return CAUSAL_LM_LATENCY_BATCHES if task_kind == "causal-lm" else LATENCY_BATCHES


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sparsity_report(pruner) -> dict:
    """Fraction of exactly-zero targeted weights, overall and per recipe entry (keyed 'INDEX.STRATEGY')."""
    values = pruner.sparsity()
    return {
        "global": round(values.get("sparsity", 0.0), 4),
        "entries": {
            key.removeprefix("sparsity/"): round(v, 4) for key, v in values.items() if key != "sparsity"
        },
    }


def latency_rows(model, compacted, sequence: int, batches: dict[int, int]) -> list[dict]:
    """Per batch size, median ms per forward of the full-size pruned model and of the compacted one, timed
    alternately, on random inputs: ``sequence`` tokens, or images of the model's size (``sequence`` None)."""
    from hfprune.cli.latency import inputs_for, interleaved_latency
    from hfprune.compaction.compact import reads_images

    if compacted is None:
        return []
    images = reads_images(model)
    sequence = None if images else sequence
    print(
        f"timing the full-size and the compacted model (batch {' and '.join(map(str, batches))}, "
        f"{'images' if images else f'{sequence} tokens'})"
    )
    rows = []
    for batch, repeats in batches.items():
        inputs = inputs_for(model, batch, sequence)
        times = interleaved_latency({"full_size": model, "compacted": compacted}, inputs, repeats)
        rows.append(
            {
                "batch": batch,
                "sequence": sequence,
                "full_size_ms": round(times["full_size"], 2),
                "compacted_ms": round(times["compacted"], 2),
                "speedup": round(times["full_size"] / times["compacted"], 3),
            }
        )
    return rows


def structure_of(model, pruner) -> dict:
    """What is left of each layer of the trained full-size model: deleted layers (the stacks in the pruner's
    plan),
    live heads and neurons, sparsity."""
    from hfprune.compaction.structure import model_structure

    return model_structure(model, pruner.registry.architectures, pruner.layer_plan(model))


def layer_parameters(structure: dict) -> int:
    """Parameters in the layers of every layer stack: the part pruning shrinks (embeddings and heads are not
    in it)."""
    return sum(layer["parameters"] for stack in structure["stacks"] for layer in stack["layers"])


def loader_of(model) -> str:
    """How to load the saved model: plain transformers when its config is stock."""
    from hfprune.compaction.compact import LAYOUT_KEY

    if getattr(model.config, LAYOUT_KEY, None):
        return "hfprune.load_compacted"
    return f"transformers.{type(model).__name__}.from_pretrained"


def compact_or_why(pruner, model):
    """(compacted model, 'ok'), or (None, why nothing could be removed: unstructured sparsity leaves nothing
    whole). ``pruner`` is a Pruner or a PruneCallback."""
    from hfprune.errors import CompactionError

    try:
        return pruner.compact(model), "ok"
    except CompactionError as exc:
        return None, str(exc)


def pruning_report(model, compacted, pruner, sequence: int, latency_batches: dict[int, int]) -> dict:
    """The report's parts about what was pruned: sparsity, strategy metrics, sizes, speed and structure."""
    from hfprune.compaction.structure import model_structure

    structure = structure_of(model, pruner)
    return {
        "sparsity": sparsity_report(pruner),
        "strategy_metrics": {
            k: round(v, 4) for k, v in pruner.metrics().items() if not k.startswith("sparsity")
        },
        "parameters": {
            "full_size": count_parameters(model),
            "targeted": sum(plan.numel for plan in pruner.plans),
            "compacted": count_parameters(compacted) if compacted is not None else None,
            "layers_full_size": layer_parameters(structure),
            "layers_compacted": layer_parameters(model_structure(compacted, pruner.registry.architectures))
            if compacted is not None
            else None,
        },
        "latency": latency_rows(model, compacted, sequence, latency_batches),
        "structure": structure,
    }
