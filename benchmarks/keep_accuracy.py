"""Do heads-and-neurons-pruned models keep their accuracy: distillation from the dense model, importance
against norms?

For each seed, all-MiniLM-L6-v2 is fine-tuned dense on the movie-review polarity sentences (the split
every benchmark uses): that model is the reference, the starting point of every pruned row and, in
the rows that distill, the teacher. Then, for each ratio of attention heads and FFN neurons pruned in
every layer (0.5: about 2x fewer encoder parameters; 0.67: about 3x), each method fine-tunes a copy
of the dense model while it prunes:

- ``block-lasso``: block group lasso, heads and neurons chosen by weight norm (``lam: auto``,
  ``lam_scale`` 0.3, the built-in block-lasso recipe's settings);
- ``importance``: heads and neurons chosen by first-order Taylor importance, pruned gradually;
- ``+ distillation``: the same, trained against the dense model (logit distillation, T = 2).

Each pruned model is compacted (its outputs checked against the masked model) and the compacted
model is scored, counted and timed against the dense one at batch 32 (alternately in one loop).
Accuracy: mean and range over the seeds, and the mean of each seed's difference from its own dense
model. Prints a table, writes JSON.

    # 2x: 4 methods x 3 seeds, each seed's dense model kept in /tmp/dense (about 70 minutes on 2 cores)
    python benchmarks/keep_accuracy.py --dense-dir /tmp/dense
    # 3x with the best method, reusing those dense models (about 15 minutes)
    python benchmarks/keep_accuracy.py --ratios 0.67 --methods importance+distillation --dense-dir /tmp/dense
    python benchmarks/keep_accuracy.py --quick           # smoke run: a few sentences, one seed, ratio 0.5
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

from transformers import DataCollatorWithPadding, Trainer

from hfprune import PruneCallback

from common import (
    ENCODER_LAYERS,
    LATENCY_SEQ,
    add_limit_arguments,
    add_output_arguments,
    add_polarity_data_argument,
    add_training_arguments,
    benchmark_parser,
    encoder_parameters,
    entry,
    interleaved_latency,
    machine,
    minilm_classifier,
    minilm_tokenizer,
    polarity_data,
    quick_data_limits,
    recipe,
    report,
    settings,
    test_accuracy,
    training_arguments,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "keep_accuracy.json"
METHODS = ("block-lasso", "block-lasso+distillation", "importance", "importance+distillation")
TARGET_POINTS = {0.5: -0.5, 0.67: -1.5}  # the targets: mean accuracy against dense, in points
WINDOW = (0.05, 0.4)  # pruning phase, fractions of training; the rest retrains with the pattern fixed


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.5], help="fraction of heads and neurons pruned"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--prune-epochs", type=float, default=2.0, help="epochs of the pruning runs (from the dense model)"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--logit-weight", type=float, default=0.9, help="a in (1 - a) task + a T^2 KL")
    parser.add_argument("--latency-repeats", type=int, default=6, help="timed forward passes at batch 32")
    parser.add_argument(
        "--dense-dir",
        type=Path,
        help="keep each seed's dense model in DIR/seed-N and reuse it when it is there: a second run at "
        "other ratios or methods skips the dense fine-tuning",
    )
    add_training_arguments(parser, epochs=3.0, epochs_help="epochs of the dense fine-tuning")
    add_polarity_data_argument(parser)
    add_limit_arguments(parser)
    add_output_arguments(
        parser, DEFAULT_OUTPUT, "smoke run: 64/32 sentences, one seed, ratio 0.5, 1 timing repeat"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.ratios, args.seeds, args.latency_repeats = [0.5], [0], 1
    quick_data_limits(args, 64, 32)
    return args


def method_recipe(method: str, ratio: float, args) -> str:
    """The recipe of ``method`` at ``ratio``: one entry for heads, one for neurons (kept in multiples of
    16)."""
    strategy = method.removesuffix("+distillation")
    schedule = f"{{start: {WINDOW[0]}, end: {WINDOW[1]}" + (
        ", every: 5}" if strategy == "importance" else "}"
    )
    extra = ", lam_scale: 0.3" if strategy == "block-lasso" else ""
    text = recipe(
        entry(strategy, schedule, f"{{group: head, ratio: {ratio}{extra}}}", ENCODER_LAYERS),
        entry(
            strategy, schedule, f"{{group: neuron, ratio: {ratio}, multiple_of: 16{extra}}}", ENCODER_LAYERS
        ),
    )
    if method.endswith("+distillation"):
        text += f"distillation: {{temperature: {args.temperature}, logit_weight: {args.logit_weight}}}\n"
    return text


def fine_tune(
    model, train, tokenizer, args, seed: int, workdir: Path, callbacks=(), epochs: float | None = None
) -> float:
    """Train ``model`` in place with a stock Trainer; the seconds it took."""
    run = copy.copy(args)
    run.epochs = epochs or args.epochs
    trainer = Trainer(
        model=model,
        args=training_arguments(run, str(workdir / "trainer"), seed),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=list(callbacks),
    )
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def dense_model(data, tokenizer, args, seed: int, workdir: Path):
    """(seed's dense model, seconds its fine-tuning took): loaded from ``--dense-dir`` when an earlier run
    saved it there (seconds None), else fine-tuned now (and saved there)."""
    from transformers import AutoModelForSequenceClassification

    saved = args.dense_dir / f"seed-{seed}" if args.dense_dir else None
    if saved is not None and (saved / "config.json").is_file():
        return AutoModelForSequenceClassification.from_pretrained(str(saved)), None
    dense = minilm_classifier(args, seed)
    seconds = fine_tune(dense, data[0], tokenizer, args, seed, workdir)
    if saved is not None:
        dense.save_pretrained(str(saved))
    return dense, seconds


def pruned_row(method: str, ratio: float, dense, data, tokenizer, args, seed: int, workdir: Path) -> dict:
    """Prune a copy of ``dense`` with ``method`` while it fine-tunes, compact it, score and time it."""
    train, test = data
    student = copy.deepcopy(dense)
    callback = PruneCallback(
        method_recipe(method, ratio, args), teacher=dense if "distillation" in method else None
    )
    seconds = fine_tune(student, train, tokenizer, args, seed, workdir, [callback], args.prune_epochs)
    compacted = callback.compact(student)
    callback.pruner.close()
    latency = interleaved_latency(dense, compacted, 32, args.latency_repeats, dense.config.vocab_size)
    return {
        "method": method,
        "ratio": ratio,
        "seed": seed,
        "accuracy": test_accuracy(compacted, test, tokenizer, workdir, args),
        "encoder_parameters": encoder_parameters(compacted),
        "speedup_b32": latency["speedup"],
        "latency_b32": latency,
        "train_seconds": seconds,
        "metrics": {k: round(v, 4) for k, v in callback.pruner.metrics().items()},
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per (ratio, method): accuracy mean and range, the mean paired difference from dense, size and speed."""
    dense = {row["seed"]: row for row in rows if row["method"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["ratio"], row["method"]), []).append(row)
    summary = []
    for (ratio, method), members in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1] != "dense")
    ):
        accuracies = [m["accuracy"] for m in members]
        entry_ = {
            "method": method,
            "ratio": ratio,
            "seeds": len(members),
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_min": min(accuracies),
            "accuracy_max": max(accuracies),
            "vs_dense_points": 100
            * statistics.mean(m["accuracy"] - dense[m["seed"]]["accuracy"] for m in members),
            "parameter_reduction": statistics.mean(
                dense[m["seed"]]["encoder_parameters"] / m["encoder_parameters"] for m in members
            ),
        }
        if method != "dense":
            entry_["speedup_b32"] = statistics.mean(m["speedup_b32"] for m in members)
        summary.append(entry_)
    return summary


def table(summary: list[dict]) -> str:
    lines = [
        "| ratio | method | accuracy, mean (range) | vs dense (paired) | encoder params | speed-up b32 |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        ratio = "" if s["method"] == "dense" else f"{s['ratio']:.2f}"
        accuracy = (
            f"{s['accuracy_mean']:.1%} ({s['accuracy_min']:.1%}-{s['accuracy_max']:.1%}, {s['seeds']} seeds)"
        )
        vs = "" if s["method"] == "dense" else f"{s['vs_dense_points']:+.2f} pt"
        speed = f"{s['speedup_b32']:.2f}x" if "speedup_b32" in s else ""
        lines.append(
            f"| {ratio} | {s['method']} | {accuracy} | {vs} | {s['parameter_reduction']:.2f}x fewer | "
            f"{speed} |"
        )
    return "\n".join(lines)


def verdicts(summary: list[dict]) -> list[str]:
    lines = []
    for s in summary:
        target = TARGET_POINTS.get(round(s["ratio"], 2))
        if s["method"] == "dense" or target is None:
            continue
        met = "met" if s["vs_dense_points"] >= target else f"missed by {target - s['vs_dense_points']:.2f} pt"
        lines.append(
            f"{s['method']} at {s['ratio']:.2f}: {s['vs_dense_points']:+.2f} pt against the target "
            f"{target:+.1f}: {met}"
        )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = minilm_tokenizer(args)
    data = train, test = polarity_data(args, tokenizer)
    runs = len(args.seeds) * (1 + len(args.ratios) * len(args.methods))
    print(f"{len(train)} train / {len(test)} test sentences; {runs} fine-tuning runs", flush=True)
    started, rows = time.perf_counter(), []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as workdir:
            dense, seconds = dense_model(data, tokenizer, args, seed, Path(workdir))
            rows.append(
                {
                    "method": "dense",
                    "ratio": 0.0,
                    "seed": seed,
                    "train_seconds": seconds,
                    "accuracy": test_accuracy(dense, test, tokenizer, Path(workdir), args),
                    "encoder_parameters": encoder_parameters(dense),
                }
            )
            took = "loaded from --dense-dir" if seconds is None else f"{seconds:.0f} s"
            print(f"seed {seed} dense: {rows[-1]['accuracy']:.1%} ({took})", flush=True)
            dense.eval()
            for ratio in args.ratios:
                for method in args.methods:
                    row = pruned_row(method, ratio, dense, data, tokenizer, args, seed, Path(workdir))
                    rows.append(row)
                    print(
                        f"seed {seed} {method} {ratio:.2f}: {row['accuracy']:.1%}, "
                        f"{row['speedup_b32']:.2f}x at "
                        f"batch 32 ({row['train_seconds']:.0f} s)",
                        flush=True,
                    )
    summary = summarize(rows)
    result = {
        "benchmark": "keep_accuracy",
        "settings": settings(args),
        "train_sentences": len(train),
        "test_sentences": len(test),
        "latency_sequence": LATENCY_SEQ,
        "machine": machine(),
        "summary": summary,
        "verdicts": verdicts(summary),
        "rows": rows,
    }
    report(
        result,
        args.output,
        table(summary),
        "\n".join(result["verdicts"]),
        seconds=time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
