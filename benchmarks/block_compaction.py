"""Is a block-lasso model really smaller and faster once compacted, and how much accuracy does it keep?

Fine-tunes MiniLM (all-MiniLM-L6-v2) on the movie-review polarity sentences (the same
split as ``rpp_vs_magnitude.py``, 4 epochs for every row) dense, and with ``block-lasso``
on attention heads and FFN neurons at two prune ratios (about 2x and 3x fewer encoder
parameters; lasso phase 5% to 40% of training, masked retraining after), then compacts each pruned model and
measures, against the dense one:
accuracy (of the compacted model), encoder parameters, encoder FLOPs at sequence 128, and
CPU latency at batch 1 and 32, sequence 128, dense and compacted timed alternately in one
loop so machine noise falls on both alike. A 16x16-tile row gives accuracy only: tiles
are zeroed, not removable. Prints a table, writes JSON.

    python benchmarks/block_compaction.py            # the full table (about 25 minutes on 2 cores)
    python benchmarks/block_compaction.py --quick    # smoke run: a few steps, one ratio, short timing

``lam`` starts from the rule in the strategy's docs: a block's squared norm falls by about
``2 * lr * lam`` per proximal step, so ``lam = q**2 / (2 * sum of lr over the window)``, with
``q`` the block norm at the prune ratio's quantile in the pretrained weights, zeroes about
the ratio's blocks during the phase. It is then scaled by ``LAM_SCALE`` (0.3), which with
the window was picked on accuracy from a handful of runs (BENCHMARKS.md lists them).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, Trainer

from hfprune import PruneCallback
from hfprune.architecture import find_units
from hfprune.plugins import default_registry

from common import (
    LAM_SCALE,
    LASSO_WINDOW,
    LATENCY_SEQ,
    add_polarity_data_argument,
    add_run_arguments,
    add_training_arguments,
    benchmark_parser,
    block_lasso_from_rule,
    encoder_flops,
    encoder_parameters,
    interleaved_latency,
    machine,
    minilm_classifier,
    minilm_tokenizer,
    polarity_data,
    quick_limits,
    report,
    settings,
    speedup_cells,
    test_accuracy,
    training_arguments,
    training_steps,
    vs_dense_cell,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "block_compaction.json"
TARGET_ACCURACY_POINTS = 1.0  # at 2x: within this many points of dense
TARGET_SPEEDUP_OF_FLOPS = 0.85  # latency speed-up over encoder FLOP reduction


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.5, 0.67], help="fraction of heads and neurons pruned"
    )
    parser.add_argument(
        "--tile-ratio", type=float, default=0.5, help="fraction of 16x16 tiles pruned (0: no tile row)"
    )
    parser.add_argument("--lam-scale", type=float, default=LAM_SCALE, help="multiply the rule's lam by this")
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=list(LASSO_WINDOW),
        metavar=("START", "END"),
        help="lasso phase, fractions of training",
    )
    parser.add_argument(
        "--scope", choices=["layer", "global"], default="layer", help="block-lasso scope of the hard prune"
    )
    add_training_arguments(parser, epochs=4.0)
    add_polarity_data_argument(parser)
    add_run_arguments(parser, DEFAULT_OUTPUT, "smoke run: 64/32 sentences, ratio 0.5, 2 timing repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.ratios = [0.5]
    return quick_limits(args)


def run_row(args, data, tokenizer, kind: str, ratio: float, workdir: Path) -> tuple[dict, torch.nn.Module]:
    train, test = data
    model = minilm_classifier(args, args.seed)
    total_steps = training_steps(args, len(train))
    callbacks, lams = [], None
    if kind != "dense":
        text, lams = block_lasso_from_rule(
            model, ratio, args, total_steps, tile=kind == "tile 16x16", scope=args.scope
        )
        callbacks = [PruneCallback(text)]
    trainer = Trainer(
        model=model,
        args=training_arguments(args, str(workdir / "trainer"), args.seed),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.train()
    row = {
        "kind": kind,
        "ratio": ratio,
        "lam": lams,
        "train_seconds": time.perf_counter() - started,
        "accuracy_masked": test_accuracy(model, test, tokenizer, workdir, args),
    }
    final = model
    if kind == "heads+neurons":
        final = callbacks[0].compact(model)
        row["accuracy"] = test_accuracy(final, test, tokenizer, workdir, args)
        row["layout"] = {
            kind: [u.count for u in find_units(final, kind, default_registry().architectures)]
            for kind in ("head", "neuron")
        }
    else:
        row["accuracy"] = row["accuracy_masked"]
        if kind == "tile 16x16":
            weights = [p for n, p in model.named_parameters() if "encoder" in n and p.dim() == 2]
            row["encoder_matrix_zeros"] = sum(int((w == 0).sum()) for w in weights) / sum(
                w.numel() for w in weights
            )
    row["encoder_parameters"] = encoder_parameters(final)
    row["encoder_flops"] = encoder_flops(final, LATENCY_SEQ)
    return row, final


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = minilm_tokenizer(args)
    data = train, test = polarity_data(args, tokenizer)
    plan = (
        [("dense", 0.0)]
        + [("heads+neurons", r) for r in args.ratios]
        + ([("tile 16x16", args.tile_ratio)] if args.tile_ratio else [])
    )
    print(f"{len(train)} train / {len(test)} test sentences; {len(plan)} runs")
    rows, dense_model = [], None
    for kind, ratio in plan:
        with tempfile.TemporaryDirectory() as workdir:
            row, final = run_row(args, data, tokenizer, kind, ratio, Path(workdir))
        if kind == "dense":
            dense_model = final
        if kind == "heads+neurons":
            vocab = dense_model.config.vocab_size
            row["latency"] = {
                str(b): interleaved_latency(dense_model, final, b, n, vocab)
                for b, n in zip((1, 32), args.latency_repeats)
            }
        rows.append(row)
        print(
            f"  {kind:<14} ratio {ratio:.2f}: accuracy {row['accuracy']:.1%}, {row['train_seconds']:.0f} s",
            flush=True,
        )
    dense = rows[0]
    for row in rows:
        row["vs_dense_points"] = 100 * (row["accuracy"] - dense["accuracy"])
        row["parameter_reduction"] = dense["encoder_parameters"] / row["encoder_parameters"]
        row["flop_reduction"] = dense["encoder_flops"] / row["encoder_flops"]
        for measured in row.get("latency", {}).values():
            measured["speedup_over_flop_reduction"] = measured["speedup"] / row["flop_reduction"]
    result = {
        "benchmark": "block_compaction",
        "settings": settings(args),
        "train_sentences": len(train),
        "test_sentences": len(test),
        "machine": machine(),
        "rows": rows,
        "verdicts": verdicts(rows),
    }
    report(result, args.output, table(rows), "\n".join(result["verdicts"]))
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        "| model | accuracy | vs dense | encoder params | params reduction | FLOP reduction | speed-up b1 "
        "(of FLOPs) | speed-up b32 (of FLOPs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = row["kind"] if row["kind"] == "dense" else f"{row['kind']} {row['ratio']:.0%}"
        speed = speedup_cells(row, lambda m: f" ({m['speedup_over_flop_reduction']:.2f})")
        vs = vs_dense_cell(row)
        reduction = (
            f"{row['parameter_reduction']:.2f}x" if row["kind"] != "tile 16x16" else "(zeroed, not removed)"
        )
        lines.append(
            f"| {name} | {row['accuracy']:.1%} | {vs} | {row['encoder_parameters']:,} | {reduction} | "
            f"{row['flop_reduction']:.2f}x | {speed[0]} | {speed[1]} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["kind"] != "heads+neurons":
            continue
        name = f"ratio {row['ratio']:.2f} ({row['parameter_reduction']:.2f}x fewer encoder parameters)"
        if abs(row["parameter_reduction"] - 2) < 0.25:
            met = "met" if row["vs_dense_points"] >= -TARGET_ACCURACY_POINTS else "NOT met"
            lines.append(
                f"{name}: accuracy {row['vs_dense_points']:+.1f} points vs dense (target within "
                f"{TARGET_ACCURACY_POINTS}): {met}"
            )
        for batch, measured in row["latency"].items():
            met = "met" if measured["speedup_over_flop_reduction"] >= TARGET_SPEEDUP_OF_FLOPS else "NOT met"
            lines.append(
                f"{name}, batch {batch}: speed-up {measured['speedup']:.2f}x for a "
                f"{row['flop_reduction']:.2f}x FLOP "
                f"reduction = {measured['speedup_over_flop_reduction']:.2f} (target >= "
                f"{TARGET_SPEEDUP_OF_FLOPS}): {met}"
            )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
