"""Pruning without retraining: how much accuracy does a fine-tuned MiniLM keep at 60% of its encoder
FLOPs, pruned in minutes from calibration examples, and what does each step of Kwon et al.'s method bring?

For each seed, all-MiniLM-L6-v2 is fine-tuned on the movie-review polarity sentences (the split every
benchmark uses): the dense row. Then copies of it are pruned by ``hfprune.oneshot`` with the
``mask-search`` strategy, keeping ``--keep`` of the heads' and neurons' FLOPs (at the calibration
sentences' mean length), on the first ``--calibration`` training sentences, with no optimizer step:

- ``weight norm``: heads and neurons ranked by their weights' L2 norm, no tuning (the baseline);
- ``fisher``: ranked by the masks' diagonal Fisher information, the same search, no tuning;
- ``+ rearrange``: each layer's choice revised with the batches' gradients together;
- ``+ tune``: the kept heads and neurons rescaled by least squares to reproduce each layer's output.

Each pruned model is compacted (its outputs checked against the masked model), scored on the 800
held-out sentences, counted, and timed against the dense model at batch 32 (alternately in one loop).
The pruning time is the oneshot call alone. Accuracy: mean and range over the seeds, and the mean
of each seed's difference from its own dense model. Target (issue 24): at 60% of the FLOPs at most
1 point below dense, pruned in under 5 minutes. Prints a table, writes JSON.

    python benchmarks/oneshot.py --dense-dir /tmp/dense   # 3 seeds, about 30 minutes on 2 cores
    python benchmarks/oneshot.py --quick                  # smoke run: a few sentences, one seed
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    ENCODER_LAYERS,
    add_limit_arguments,
    add_output_arguments,
    add_polarity_data_argument,
    add_training_arguments,
    benchmark_parser,
    encoder_flops,
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

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "oneshot.json"
# Each row's mask-search settings, in the order each step is added.
METHODS = {
    "weight norm": {"importance": "weight-norm", "rearrange": False, "tune": False},
    "fisher": {"importance": "fisher", "rearrange": False, "tune": False},
    "+ rearrange": {"importance": "fisher", "rearrange": True, "tune": False},
    "+ tune": {"importance": "fisher", "rearrange": True, "tune": True},
}
TARGET_POINTS, TARGET_SECONDS = -1.0, 300.0


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--keep", type=float, default=0.6, help="fraction of the heads' and neurons' FLOPs kept"
    )
    parser.add_argument(
        "--calibration", type=int, default=2000, help="calibration sentences (training split)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--latency-repeats", type=int, default=6, help="timed forward passes at batch 32")
    parser.add_argument("--dense-dir", type=Path, help="keep each seed's dense model in DIR/seed-N, reuse it")
    add_training_arguments(parser, epochs=3.0, epochs_help="epochs of the dense fine-tuning")
    add_polarity_data_argument(parser)
    add_limit_arguments(parser)
    add_output_arguments(parser, DEFAULT_OUTPUT, "smoke run: 64/32 sentences, one seed, 1 timing repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.latency_repeats, args.calibration = [0], 1, 32
    quick_data_limits(args, 64, 32)
    return args


def dense_model(train, tokenizer, args, seed: int, workdir: Path):
    """The seed's dense model: from ``--dense-dir`` when saved there, else fine-tuned now (and saved)."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    saved = args.dense_dir / f"seed-{seed}" if args.dense_dir else None
    if saved is not None and (saved / "config.json").is_file():
        return AutoModelForSequenceClassification.from_pretrained(str(saved))
    dense = minilm_classifier(args, seed)
    Trainer(
        model=dense,
        args=training_arguments(args, str(workdir / "trainer"), seed),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    ).train()
    if saved is not None:
        dense.save_pretrained(str(saved))
    return dense


def calibration_batches(train, tokenizer, args) -> list[dict]:
    """The first ``--calibration`` training sentences, padded in batches of ``--batch-size``."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    examples = train[: args.calibration]
    return [
        dict(collate(examples[i : i + args.batch_size])) for i in range(0, len(examples), args.batch_size)
    ]


def mask_search_recipe(keep: float, method: dict) -> str:
    config = ", ".join(f"{k}: {str(v).lower()}" for k, v in {"keep": keep, **method}.items())
    return recipe(entry("mask-search", None, f"{{{config}}}", ENCODER_LAYERS))


def pruned_row(name: str, dense, batches, test, tokenizer, args, seed: int, workdir: Path) -> dict:
    """Prune a copy of ``dense`` one-shot with ``name``'s settings, compact it, score and time it."""
    import hfprune

    model = copy.deepcopy(dense)
    started = time.perf_counter()
    pruner = hfprune.oneshot(model, batches, mask_search_recipe(args.keep, METHODS[name]), progress=False)
    seconds = time.perf_counter() - started
    compacted = pruner.compact(model)
    latency = interleaved_latency(dense, compacted, 32, args.latency_repeats, dense.config.vocab_size)
    return {
        "method": name,
        "seed": seed,
        "accuracy": test_accuracy(compacted, test, tokenizer, workdir, args),
        "encoder_parameters": encoder_parameters(compacted),
        "encoder_flops_128": encoder_flops(compacted, 128),
        "speedup_b32": latency["speedup"],
        "latency_b32": latency,
        "pruning_seconds": round(seconds, 1),
        "metrics": {k: round(v, 4) for k, v in pruner.metrics().items()},
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: accuracy mean and range, the mean paired difference from dense, size, speed, time."""
    dense = {row["seed"]: row for row in rows if row["method"] == "dense"}
    summary = []
    for method in ["dense", *METHODS]:
        members = [row for row in rows if row["method"] == method]
        if not members:
            continue
        accuracies = [m["accuracy"] for m in members]
        line = {
            "method": method,
            "seeds": len(members),
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_min": min(accuracies),
            "accuracy_max": max(accuracies),
            "vs_dense_points": 100
            * statistics.mean(m["accuracy"] - dense[m["seed"]]["accuracy"] for m in members),
            "flops_kept": statistics.mean(
                m["encoder_flops_128"] / dense[m["seed"]]["encoder_flops_128"] for m in members
            ),
        }
        if method != "dense":
            line["speedup_b32"] = statistics.mean(m["speedup_b32"] for m in members)
            line["pruning_seconds"] = max(m["pruning_seconds"] for m in members)
        summary.append(line)
    return summary


def table(summary: list[dict]) -> str:
    lines = [
        "| method | accuracy mean (range) | vs dense | encoder FLOPs kept | speed-up b32 | pruning s (max) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        pruned = s["method"] != "dense"
        versus = f"{s['vs_dense_points']:+.2f} pt" if pruned else ""
        speed = f"{s['speedup_b32']:.2f}x" if pruned else ""
        seconds = f"{s['pruning_seconds']:.0f}" if pruned else ""
        accuracy = f"{s['accuracy_mean']:.4f} ({s['accuracy_min']:.4f}-{s['accuracy_max']:.4f})"
        lines.append(
            f"| {s['method']} | {accuracy} | {versus} | {s['flops_kept']:.3f} | {speed} | {seconds} |"
        )
    return "\n".join(lines)


def verdict(summary: list[dict]) -> str:
    full = next(s for s in summary if s["method"] == "+ tune")
    accuracy = (
        "met"
        if full["vs_dense_points"] >= TARGET_POINTS
        else f"missed by {TARGET_POINTS - full['vs_dense_points']:.2f} pt"
    )
    speed = "met" if full["pruning_seconds"] < TARGET_SECONDS else "missed"
    return (
        f"- accuracy at {full['flops_kept']:.0%} of the FLOPs: {full['vs_dense_points']:+.2f} pt "
        f"(target at least {TARGET_POINTS:+.0f}): {accuracy}\n"
        f"- pruning time: at most {full['pruning_seconds']:.0f} s (target under {TARGET_SECONDS:.0f}): "
        f"{speed}"
    )


def main(argv=None) -> None:
    import transformers

    args = parse_args(argv)
    started = time.perf_counter()
    tokenizer = minilm_tokenizer(args)
    train, test = polarity_data(args, tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        for seed in args.seeds:
            dense = dense_model(train, tokenizer, args, seed, workdir)
            dense_row = {
                "method": "dense",
                "seed": seed,
                "accuracy": test_accuracy(dense, test, tokenizer, workdir, args),
                "encoder_parameters": encoder_parameters(dense),
                "encoder_flops_128": encoder_flops(dense, 128),
            }
            rows.append(dense_row)
            batches = calibration_batches(train, tokenizer, args)
            for name in METHODS:
                row = pruned_row(name, dense, batches, test, tokenizer, args, seed, workdir)
                rows.append(row)
                dense_accuracy, accuracy = dense_row["accuracy"], row["accuracy"]
                print(
                    f"seed {seed} {name}: accuracy {accuracy:.4f} (dense {dense_accuracy:.4f}), "
                    f"pruned in {row['pruning_seconds']:.0f} s, {row['speedup_b32']:.2f}x at batch 32"
                )
    summary = summarize(rows)
    result = {
        "settings": settings(args),
        "machine": machine(transformers=transformers.__version__),
        "rows": rows,
        "summary": summary,
    }
    report(result, args.output, table(summary), verdict(summary), seconds=time.perf_counter() - started)


if __name__ == "__main__":
    main()
