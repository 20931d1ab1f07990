"""What the benchmark scripts share, so that no benchmark imports another.

Every script in ``benchmarks/`` is one experiment, run as ``python benchmarks/<name>.py``
(``--quick`` for the smoke run the tests make). What more than one of them needs lives
here, once, so that a fix reaches every benchmark and a new one starts from these pieces
instead of importing another benchmark's script:

- arguments: the parser, ``--output`` and ``--quick``, the data limits, the fine-tuning
  flags :func:`training_arguments` reads, the flags of the benchmarks that compact and time a model;
- data: the split every benchmark uses, MiniLM's tokenizer and classifier, the polarity sentences, the
  causal-LM task of the LLM benchmarks;
- training: the Trainer's settings, its step count, the learning rate summed over a pruning window;
- recipes: the encoder's target patterns, ``pruners:`` entries as YAML text, block-lasso on
  heads and neurons with its lam rule;
- measures: encoder parameters and FLOPs, test accuracy, latency timed alternately, and how
  busy other processes kept the machine (the warning a table carries when timings were taken on a loaded
  machine);
- results: the JSON's settings and machine sections, shared table cells, and :func:`report`,
  which writes the JSON and prints the tables.

torch, transformers and hfprune are imported inside the functions that use them: ``overhead.py``'s
conductor imports this module and must stay a light process, and its workers import those
libraries only after they have moved stray prints off their protocol channel (stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments


# --- arguments ------------------------------------------------------------------------------------
def benchmark_parser(doc: str, **options) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring: the question the benchmark
    answers."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], **options)


def add_output_arguments(
    parser: argparse.ArgumentParser, output: Path, quick_help: str, output_help: str | None = None
) -> None:
    """``--output`` (where the JSON goes, ``output`` by default) and ``--quick`` (the smoke run), which every
    benchmark takes."""
    parser.add_argument("--output", type=Path, default=output, help=output_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)


def add_limit_arguments(
    parser: argparse.ArgumentParser, train_help: str | None = None, test_help: str | None = None
) -> None:
    """``--train-limit`` and ``--test-limit``: only the first this many examples of each split (what
    ``--quick`` cuts)."""
    parser.add_argument("--train-limit", type=int, help=train_help)
    parser.add_argument("--test-limit", type=int, help=test_help)


def quick_data_limits(args: argparse.Namespace, train: int, test: int) -> None:
    """Under ``--quick``: ``train`` training and ``test`` test examples, unless
    ``--train-limit``/``--test-limit`` say otherwise."""
    if args.quick:
        args.train_limit, args.test_limit = args.train_limit or train, args.test_limit or test


def add_training_arguments(
    parser: argparse.ArgumentParser, epochs: float, epochs_help: str | None = None, lr_help: str | None = None
) -> None:
    """``--epochs``, ``--lr`` and ``--batch-size``: the fine-tuning run that :func:`training_arguments` sets
    up."""
    parser.add_argument("--epochs", type=float, default=epochs, help=epochs_help)
    parser.add_argument("--lr", type=float, default=1e-4, help=lr_help)
    parser.add_argument("--batch-size", type=int, default=32)


def add_polarity_data_argument(parser: argparse.ArgumentParser, flag: str = "--data") -> None:
    """The polarity CSV to read instead of the cached download (the tests pass a small one)."""
    parser.add_argument(flag, type=Path, help="the polarity CSV (default: downloaded once and cached)")


def add_run_arguments(parser: argparse.ArgumentParser, output: Path, quick_help: str) -> None:
    """The flags every compact-and-time benchmark takes: seed, timing repeats, data limits, output,
    --quick."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--latency-repeats", type=int, nargs=2, default=[40, 6], metavar=("BATCH1", "BATCH32")
    )
    add_limit_arguments(parser)
    add_output_arguments(parser, output, quick_help)


def quick_limits(args: argparse.Namespace) -> argparse.Namespace:
    """Under --quick (with :func:`add_run_arguments`): 64 training and 32 test examples (unless given), 2 and
    1 timing repeats."""
    if args.quick:
        args.latency_repeats = [2, 1]
    quick_data_limits(args, 64, 32)
    return args


# --- data -----------------------------------------------------------------------------------------
# Every benchmark's test split, the fraction ``hfprune run`` holds out, drawn with one seed: the
# same examples for every row and every training seed, and across benchmarks on the same data.
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MAX_LENGTH = 64  # tokens per sentence in the fine-tuning benchmarks


def encode(examples, tokenizer) -> list[dict]:
    """``(text, label)`` pairs tokenized (at most ``MAX_LENGTH`` tokens) with their labels: what
    ``DataCollatorWithPadding`` batches."""
    return [
        {**tokenizer(text, truncation=True, max_length=MAX_LENGTH), "labels": label}
        for text, label in examples
    ]


def minilm_tokenizer(args: argparse.Namespace):
    """The built-in MiniLM's tokenizer; sets ``args.model_path`` and quiets transformers' per-run messages."""
    import transformers
    from transformers import AutoTokenizer

    from hfprune.cli.model_sources import default_model_path

    transformers.logging.set_verbosity_error()  # no load reports or shard progress bars between table lines
    args.model_path = default_model_path()
    return AutoTokenizer.from_pretrained(str(args.model_path))


def minilm_classifier(args: argparse.Namespace, seed: int) -> torch.nn.Module:
    """MiniLM (``args.model_path``) with a new two-class head, initialised from ``seed`` so that every row
    starts alike."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(args.model_path), num_labels=2)


def polarity_data(args: argparse.Namespace, tokenizer) -> tuple[list, list]:
    """The polarity split, cut to ``--train-limit``/``--test-limit``, encoded: (train, test)."""
    from hfprune.data import split
    from hfprune.data.polarity import read_polarity

    train, test = split(read_polarity(args.data), TEST_FRACTION, SPLIT_SEED)
    return encode(train[: args.train_limit], tokenizer), encode(test[: args.test_limit], tokenizer)


def causal_lm_task(args: argparse.Namespace):
    """(pretrained model, task): the causal-LM task ``hfprune run`` builds on ``args.model`` and
    ``args.data``, blocks of ``args.block`` tokens from ``args.train_limit`` / ``args.test_limit``
    paragraphs."""
    from hfprune.cli.model_sources import load_config, load_pretrained, load_tokenizer, resolve_model_source
    from hfprune.cli.tasks import load_task
    from hfprune.recipe.run_sections import DataSection

    source = resolve_model_source(args.model)
    data = DataSection(
        dataset=args.data,
        task="causal-lm",
        max_length=args.block,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
    )
    task = load_task(data, load_tokenizer(source), load_config(source), args.seed)
    return load_pretrained(source, "AutoModelForCausalLM"), task


class TaskData:
    """One dataset as ``hfprune run`` reads it (:mod:`hfprune.cli.tasks`: split, encoding, head, score), with
    the benchmarks' split seed, and a fine-tuning run's ``training`` settings: (epochs, batch size, learning
    rate). ``polarity`` reads ``polarity_csv`` when given (the tests pass a small one)."""

    def __init__(
        self,
        name: str,
        args: argparse.Namespace,
        tokenizer,
        training: tuple[float, int, float],
        polarity_csv: Path | None = None,
    ):
        from hfprune.cli.tasks import load_task
        from hfprune.data.polarity import read_polarity
        from hfprune.data.sources import polarity_dataset
        from hfprune.recipe.run_sections import DataSection

        self.name = name
        self.epochs, self.batch_size, self.lr = training
        data = DataSection(
            dataset=name,
            test_fraction=TEST_FRACTION,
            train_limit=args.train_limit,
            test_limit=args.test_limit,
        )
        dataset = polarity_dataset(read_polarity(polarity_csv)) if name == "polarity" else None
        self.task = load_task(data, tokenizer, None, SPLIT_SEED, dataset)
        self.train, self.test = self.task.train_set, self.task.test_set
        self.collator, self.metric = self.task.collator(), self.task.metric

    def model(self, path, fine_tuned: bool = False):
        return self.task.model(path, fine_tuned=fine_tuned)

    def arguments(self, output_dir: str, seed: int) -> TrainingArguments:
        return training_arguments(self, output_dir, seed, group_by_length=False)

    def steps(self) -> int:
        return training_steps(self, len(self.train))

    def score(self, model, output_dir: str, seed: int) -> float:
        return self.task.evaluate(model, self.arguments(output_dir, seed))[self.task.headline]


# --- training -------------------------------------------------------------------------------------
def training_arguments(run, output_dir: str, seed: int, group_by_length: bool = True) -> TrainingArguments:
    """The Trainer's settings for a fine-tuning run on the CPU: ``run`` has ``epochs``, ``batch_size`` and
    ``lr``
    (the flags of :func:`add_training_arguments`, or a task's own settings)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=run.epochs,
        per_device_train_batch_size=run.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=run.lr,
        weight_decay=0.01,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
        # batches of similar length: about half the padding, same for every row
        train_sampling_strategy="group_by_length" if group_by_length else "random",
    )


def training_steps(run, examples: int) -> int:
    """The optimizer steps of ``run`` (``epochs``, ``batch_size``) over ``examples``: what a schedule's
    fractions are of."""
    return int(math.ceil(examples / run.batch_size) * run.epochs)


def lr_sum_over_window(args, total_steps: int, window: tuple[float, float]) -> float:
    """Sum of the Trainer's default (linear decay, no warm-up) learning rate over the pruning window.

    The lam rules divide by it: a proximal step shrinks a squared norm by about ``2 * lr * lam``.
    """
    start, end = (round(f * total_steps) for f in window)
    return sum(args.lr * (1 - step / total_steps) for step in range(start, end))


# --- recipes --------------------------------------------------------------------------------------
# Every encoder Linear of a BERT: query/key/value, attention.output.dense, intermediate.dense, output.dense.
ENCODER_LINEARS = (
    r"re:.*encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
ENCODER_LAYERS = r"re:.*encoder\.layer\.\d+"  # whole layers: block-lasso finds heads and FFN neurons inside


def entry(strategy: str, schedule: str | None, config: str, targets: str = ENCODER_LINEARS) -> str:
    """One ``pruners:`` item as YAML text (schedule and config in YAML flow style; no schedule for a one-shot
    strategy)."""
    when = f"    schedule: {schedule}\n" if schedule is not None else ""
    return f"  - strategy: {strategy}\n    targets: ['{targets}']\n{when}    config: {config}\n"


def recipe(*entries: str) -> str:
    """A recipe's YAML text from :func:`entry` items."""
    return "version: 1\npruners:\n" + "".join(entries)


# Block-lasso on MiniLM, chosen from six single-seed runs at ratio 0.5 (BENCHMARKS.md, block
# compaction): the rule's full lam shrinks the blocks that survive too much in a fine-tuning-length
# phase, and a structured prune needs a longer masked retraining than an unstructured one.
LAM_SCALE = 0.3
LASSO_WINDOW = (0.05, 0.4)


def block_recipe(
    ratio: float, lams: dict[str, float], tile: bool, window=LASSO_WINDOW, scope: str = "layer"
) -> str:
    """Block-lasso on every encoder layer's heads and FFN neurons (or on 16x16 tiles of its matrices,
    ``tile``)."""
    schedule = f"{{start: {window[0]}, end: {window[1]}}}"
    if tile:
        return recipe(
            entry(
                "block-lasso",
                schedule,
                f"{{group: tile, block: [16, 16], ratio: {ratio}, lam: {lams['tile']:.6g}, scope: {scope}}}",
            )
        )
    # Neurons kept in multiples of 16 (at ratio 0.67, 512 rather than 507): odd sizes cost about 8% of FFN
    # speed on CPU.
    rounding = {"head": "", "neuron": ", multiple_of: 16" if scope == "layer" else ""}
    return recipe(
        *(
            entry(
                "block-lasso",
                schedule,
                f"{{group: {group}, ratio: {ratio}, lam: {lams[group]:.6g}, scope: "
                f"{scope}{rounding[group]}}}",
                ENCODER_LAYERS,
            )
            for group in ("head", "neuron")
        )
    )


def lams_from_rule(model, ratio: float, lr_sum: float, tile: bool) -> dict[str, float]:
    """``q**2 / (2 * sum lr)`` per entry of :func:`block_recipe`, q the pretrained block norm at the ratio's
    quantile
    (before any ``--lam-scale``)."""
    import torch

    from hfprune import Pruner

    placeholder = {"head": 1.0, "neuron": 1.0, "tile": 1.0}
    pruner = Pruner(block_recipe(ratio, placeholder, tile))
    pruner.attach(model)
    pruner.start(100)
    groups = ["tile"] if tile else ["head", "neuron"]
    lams = {}
    for group, strategy in zip(groups, pruner.strategies):
        norms = torch.cat([s.norms().flatten() for s in strategy.sets])
        lams[group] = norms.quantile(ratio).item() ** 2 / (2 * lr_sum)
    return lams


def block_lasso_from_rule(
    model, ratio: float, args: argparse.Namespace, total_steps: int, tile: bool = False, scope: str = "layer"
) -> tuple[str, dict[str, float]]:
    """Block-lasso at ``ratio`` over the ``--window`` fractions of ``total_steps``, lams from
    :func:`lams_from_rule` times
    ``--lam-scale``: (the recipe's text, the lams), so that a benchmark's rows prune by the same rule."""
    rule = lams_from_rule(model, ratio, lr_sum_over_window(args, total_steps, args.window), tile)
    lams = {group: args.lam_scale * lam for group, lam in rule.items()}
    return block_recipe(ratio, lams, tile, args.window, scope), lams


# --- measures -------------------------------------------------------------------------------------
LATENCY_SEQ = 128  # tokens per sequence where FLOPs are counted and latency timed


def encoder_parameters(model) -> int:
    """Parameters of the encoder: what structured pruning and compaction make smaller."""
    return sum(p.numel() for p in model.base_model.encoder.parameters())


def encoder_flops(model, seq: int) -> int:
    """Multiply-adds x2 of the encoder per sequence: every Linear, plus attention scores and mixing."""
    import torch

    from hfprune.architecture import find_units
    from hfprune.plugins import default_registry

    encoder = model.base_model.encoder
    linear = sum(m.weight.numel() for m in encoder.modules() if isinstance(m, torch.nn.Linear))
    heads = find_units(encoder, "head", default_registry().architectures)
    head_dims = sum(u.count * u.members[0].size for u in heads)  # query features per layer, summed
    return 2 * seq * linear + 2 * 2 * seq * seq * head_dims


def interleaved_latency(dense, compacted, batch: int, repeats: int, vocab: int) -> dict:
    """Median milliseconds per forward of the dense and the compacted model on the same inputs, timed
    alternately."""
    import torch

    from hfprune.cli import latency

    with torch.no_grad():
        inputs = latency.random_inputs(vocab, batch, LATENCY_SEQ, seed=batch)
        times = latency.interleaved_latency({"dense": dense, "compacted": compacted}, inputs, repeats)
    return {
        "dense_ms": times["dense"],
        "compacted_ms": times["compacted"],
        "speedup": times["dense"] / times["compacted"],
    }


def test_accuracy(model, test, tokenizer, workdir: Path, args) -> float:
    """Accuracy of a sequence classifier on the encoded ``test`` split, predicted by a Trainer with ``args``'
    settings."""
    from transformers import DataCollatorWithPadding, Trainer

    trainer = Trainer(
        model=model,
        args=training_arguments(args, str(workdir / "eval"), seed=0),  # prediction draws nothing at random
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    predictions = trainer.predict(test)
    return float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())


# How busy other processes kept the machine while a benchmark timed: timings taken on oversubscribed
# cores are distorted, so a table says so rather than let a reader trust them.
OTHER_LOAD_WARNING = 0.25  # cores busy with other processes above which the table carries a warning


def busy_cpu_seconds() -> float:
    """CPU time all processes on this machine have used since boot (``/proc/stat``), in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_load_line(load: float, cpu_count: int | None) -> str:
    """The table's last line: a warning if other processes kept more than ``OTHER_LOAD_WARNING`` cores busy on
    average
    (``load``) while the timed steps ran, otherwise how idle the machine was."""
    if load > OTHER_LOAD_WARNING:
        return (
            f"WARNING: other processes kept {load:.1f} of {cpu_count} cores busy while the steps ran; "
            "oversubscribed cores slow every parallel kernel, which distorts these times and typically "
            "inflates the ratios"
        )
    return f"machine otherwise idle while timing (other processes: {load:.2f} cores busy on average)"


# --- results --------------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict:
    """The parsed flags as the JSON's ``settings``: paths as strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def machine(**versions: str) -> dict:
    """The JSON's ``machine``: platform, torch, ``versions`` of other libraries the benchmark times, torch's
    threads."""
    import torch

    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        **versions,
        "threads": torch.get_num_threads(),
    }


def vs_dense_cell(row: dict) -> str:
    """A table cell: the row's score against dense, in points ('' on the dense row)."""
    return "" if row["kind"] == "dense" else f"{row['vs_dense_points']:+.1f} pt"


def speedup_cells(row: dict, note=lambda measured: "") -> list[str]:
    """Table cells for the batch-1 and batch-32 speed-ups of a row ('' where it was not timed)."""
    return [
        f"{m['speedup']:.2f}x{note(m)}" if (m := row.get("latency", {}).get(b)) else "" for b in ("1", "32")
    ]


def report(result: dict, output: Path, *sections: str, seconds: float | None = None) -> None:
    """Write the JSON, then print each section (a table, the verdicts) and where the JSON went (and how long
    the run took)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for section in sections:
        print()
        print(section)
    print(f"\nwrote {output}" + ("" if seconds is None else f" ({seconds:.0f} s)"))
