"""``hfprune prune``: prune an already fine-tuned model from calibration data, with no retraining.

The one-shot counterpart of ``hfprune run``: the same data sources and tasks
(:mod:`hfprune.data.sources`, :mod:`hfprune.cli.tasks`), a recipe of one-shot strategies
(``mask-search``, ``wanda``, or a plugin's), :func:`hfprune.oneshot` on the first
``--calibration-examples`` training examples, then the same measurements and reports:
the dense and the pruned model scored on the test split, the compacted model (structured
recipes) checked against the pruned one and timed against it, ``model/`` a plain Hugging
Face checkpoint. An unstructured result is saved as it is (its zeros exact) and also as
``sparse.safetensors`` (:mod:`hfprune.compaction.sparse_file`), a fraction of the size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hfprune.cli.arguments import add_data_arguments, data_section, positive
from hfprune.cli.measure import compact_or_why, latency_batches, loader_of, pruning_report
from hfprune.cli.model_sources import load_config, load_processor, resolve_model_source
from hfprune.cli.run_results import MODEL_FOLDER, REPORT_MD, summary, write_results
from hfprune.errors import HfpruneError
from hfprune.plugins import default_registry
from hfprune.pruner import kind_problems
from hfprune.recipe import builtin as builtin_recipes
from hfprune.recipe.schema import load_recipe

DEFAULT_CALIBRATION_EXAMPLES = 2000  # Kwon et al.'s calibration set
DEFAULT_BATCH_SIZE = 32
SPARSE_FILE = "sparse.safetensors"


def register(commands: argparse._SubParsersAction) -> None:
    prune = commands.add_parser(
        "prune",
        help="prune a fine-tuned model from calibration data, no retraining (one-shot recipes)",
        description="Prune a model already fine-tuned on a task, in minutes and without training: RECIPE's "
        "one-shot strategies (mask-search: heads and neurons to a FLOPs or parameter budget, Kwon et al.; "
        "wanda: unstructured or N:M) measure the model on calibration examples, then the model is compacted, "
        "scored beside the dense one on held-out data, timed, and saved with a report, as `hfprune run` "
        "does.",
    )
    prune.add_argument("recipe", help="a YAML recipe of one-shot strategies, or a built-in recipe's name")
    prune.add_argument("--model", metavar="PATH", help="the fine-tuned model: a folder, or smollm2")
    prune.add_argument("--output-dir", metavar="DIR", required=True, help="where the model and reports go")
    prune.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in DIR")
    data = prune.add_argument_group("data (recipe section data:)")
    add_data_arguments(data)
    data.add_argument(
        "--calibration-examples",
        type=positive(int),
        metavar="N",
        default=DEFAULT_CALIBRATION_EXAMPLES,
        help=f"training examples to measure the model on (default: {DEFAULT_CALIBRATION_EXAMPLES})",
    )
    data.add_argument(
        "--test-limit", type=positive(int), metavar="N", help="score on the first N test examples"
    )
    data.add_argument(
        "--batch-size",
        type=positive(int),
        metavar="N",
        default=DEFAULT_BATCH_SIZE,
        help=f"examples per calibration and scoring batch (default: {DEFAULT_BATCH_SIZE})",
    )
    data.add_argument("--seed", type=int, default=42, help="seed of the train/test split (default: 42)")
    prune.set_defaults(handler=prune_main)


def prune_main(args: argparse.Namespace) -> int:
    """The ``prune`` handler: settings first (cheap), then load, score, prune, compact, time, save, report."""
    started = time.perf_counter()
    recipe_path, recipe, model_path, data = _settings(args)
    output_dir = Path(args.output_dir)
    source = resolve_model_source(model_path)
    print(
        f"hfprune prune: {recipe_path} prunes {model_path}, measured on {data.dataset}; results go to "
        f"{output_dir}/"
    )

    import torch

    import hfprune
    from hfprune.cli.tasks import load_task

    task = load_task(data, load_processor(source), load_config(source), args.seed)
    model = task.model(source, fine_tuned=True)
    print(
        f"{task.description}: {len(task.train_examples)} calibration and {len(task.test_examples)} test "
        "examples"
    )
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer that scores wants a folder; nothing stays
        score = _scorer(task, args.batch_size, scratch)
        baseline = score(model)
        print(f"dense: {task.metric} {baseline[task.headline]:.3f}")
        batches = torch.utils.data.DataLoader(
            task.train_set, batch_size=args.batch_size, collate_fn=task.collator()
        )
        pruning_started = time.perf_counter()
        pruner = hfprune.oneshot(model, (dict(batch) for batch in batches), recipe)
        pruning_seconds = round(time.perf_counter() - pruning_started, 1)
        print(f"pruned in {pruning_seconds:.0f} s")
        compacted, compaction = compact_or_why(pruner, model)
        scores = {
            "baseline": baseline,
            "pruned": score(model),
            "compacted": score(compacted) if compacted is not None else None,
        }
    final = compacted if compacted is not None else model
    report = {
        "command": "prune",
        "model": str(source),
        "recipe": str(recipe_path),
        "task": task.description,
        "metric": task.metric,
        "calibration_examples": len(task.train_examples),
        "test_examples": len(task.test_examples),
        "pruning_seconds": pruning_seconds,
        "settings": {
            "dataset": data.dataset,
            "task": task.kind,
            "columns": task.columns._asdict(),
            "max_length": data.max_length,
            "batch_size": args.batch_size,
            "seed": args.seed,
        },
        "scores": scores,
        "compaction": compaction,
        "loader": loader_of(final),
    } | pruning_report(model, compacted, pruner, data.max_length, latency_batches(task.kind))
    _save(final, task.processor, output_dir, sparse=compacted is None)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_results(output_dir, report, task.headline)
    print(summary(report, task.headline))
    print(f"results: {output_dir / REPORT_MD}; model: {output_dir / MODEL_FOLDER}/")
    return 0


def _settings(args: argparse.Namespace):
    """(recipe path, recipe, model path, data section), every problem found before any model or data is
    read: a recipe with training strategies, no model, an output folder holding results."""
    from hfprune.cli.run import check_output_dir

    recipe_path = builtin_recipes.resolve(args.recipe)
    recipe = load_recipe(recipe_path)
    problems = kind_problems(recipe, default_registry(), one_shot=True)
    if problems:
        raise recipe.error(problems)
    model_path = args.model or (recipe.model.path if recipe.model else None)
    if not model_path:
        raise HfpruneError(
            "hfprune prune needs the fine-tuned model to prune: --model PATH (or model: path:)"
        )
    data = data_section(recipe.data, args, args.calibration_examples)
    check_output_dir(Path(args.output_dir), args.overwrite)
    return recipe_path, recipe, model_path, data


def _scorer(task, batch_size: int, scratch: str):
    """A function giving a model's scores on the test split."""
    import torch
    from transformers import TrainingArguments

    arguments = TrainingArguments(
        output_dir=scratch,
        per_device_eval_batch_size=batch_size,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    return lambda model: task.evaluate(model, arguments)


def _save(model, processor, output_dir: Path, sparse: bool) -> None:
    """The model as a plain checkpoint; an unstructured one also as the compact sparse file."""
    from hfprune.compaction.compact import save_compacted
    from hfprune.compaction.sparse_file import save_sparse

    save_compacted(model, output_dir / MODEL_FOLDER, tokenizer=processor, replace=True)
    if sparse:
        save_sparse(model.state_dict(), output_dir / SPARSE_FILE)
