"""Does learned layer selection beat fixed choices at the same depth, and is the speed-up close to the layer
ratio?

Fine-tunes MiniLM (all-MiniLM-L6-v2, 6 layers) on two tasks: WNUT-16 named entities
(entity F1, seqeval) and the movie-review polarity sentences (accuracy). For every task:
dense; ``layer-lasso`` keeping 4, 3 and 2 layers (gates learn during the selection window,
then the kept layers train on with the others gated off; the compacted model is what is
scored and timed); and two fixed choices at the same depths, trained for the same number
of optimizer steps from the start: the bottom layers (top layers dropped) and evenly
spaced layers ending at the top (every other layer at depth 3). Reports which layers
survived and the CPU latency of each compacted model against dense at sequence 128,
timed alternately in one loop. Prints a table, writes JSON.

    python benchmarks/layer_selection.py            # the full table (about 35 minutes on 2 cores)
    python benchmarks/layer_selection.py --quick    # smoke run: a few steps, keep 3, short timing
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer

from hfprune import PruneCallback
from hfprune.architecture import delete_residual_layers

from common import (
    LATENCY_SEQ,
    TaskData,
    add_polarity_data_argument,
    add_run_arguments,
    benchmark_parser,
    encoder_flops,
    entry,
    interleaved_latency,
    machine,
    minilm_tokenizer,
    quick_limits,
    recipe,
    report,
    settings,
    speedup_cells,
    vs_dense_cell,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "layer_selection.json"
STACK = "encoder.layer"
# Gates learn from 5% to 50% of training (as in the built-in layer-lasso recipe); kept layers train on after.
SELECTION_WINDOW = (0.05, 0.5)
TASKS = {
    # task: (epochs, batch size, learning rate); about 200-360 optimizer steps each
    "wnut": (3.0, 16, 5e-5),
    "polarity": (2.0, 32, 1e-4),
}


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--keeps", type=int, nargs="+", default=[4, 3, 2], help="depths to compare")
    parser.add_argument("--baselines", nargs="*", choices=["bottom", "spaced"], default=["bottom", "spaced"])
    parser.add_argument("--l0", type=float, default=0.05, help="layer-lasso regularizer weight")
    parser.add_argument("--gate-lr", type=float, default=0.05, help="layer-lasso gate learning rate")
    parser.add_argument(
        "--window", type=float, nargs=2, default=list(SELECTION_WINDOW), metavar=("START", "END")
    )
    add_polarity_data_argument(parser, "--polarity-data")
    add_run_arguments(parser, DEFAULT_OUTPUT, "smoke run: 64/32 examples, keep 3, 2 timing repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.keeps = [3]
    return quick_limits(args)


def selection_recipe(keep: int, args) -> str:
    schedule = f"{{start: {args.window[0]}, end: {args.window[1]}}}"
    return recipe(
        entry("layer-lasso", schedule, f"{{keep: {keep}, l0: {args.l0}, gate_lr: {args.gate_lr}}}", STACK)
    )


def fixed_layers(kind: str, keep: int, depth: int) -> list[int]:
    """'bottom': the first ``keep`` layers; 'spaced': ``keep`` layers evenly spaced, ending at the top."""
    if kind == "bottom":
        return list(range(keep))
    return sorted(depth - 1 - round(j * depth / keep) for j in range(keep))


def truncate(model, layers: list[int]):
    """``model`` with only ``layers`` of its encoder, before any training."""
    keep = torch.zeros(model.config.num_hidden_layers, dtype=torch.bool)
    keep[layers] = True
    delete_residual_layers(model, {f"{model.base_model_prefix}.{STACK}": keep})
    return model


def run_row(task: TaskData, args, kind: str, keep: int, workdir: Path) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(args.seed)
    model = task.model(args.model_path)
    depth = model.config.num_hidden_layers
    callbacks, layers = [], list(range(depth))
    if kind in ("bottom", "spaced"):
        layers = fixed_layers(kind, keep, depth)
        truncate(model, layers)
    elif kind == "layer-lasso":
        callbacks = [PruneCallback(selection_recipe(keep, args))]
    trainer = Trainer(
        model=model,
        args=task.arguments(str(workdir / "trainer"), args.seed),
        train_dataset=task.train,
        data_collator=task.collator,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.train()
    row = {
        "task": task.name,
        "kind": kind,
        "depth": depth,
        "keep": keep if kind != "dense" else depth,
        "train_seconds": time.perf_counter() - started,
    }
    final = model
    if callbacks:
        strategy = callbacks[0].pruner.strategies[0]
        row["gates_history"] = [
            {k.split("/")[1]: v for k, v in log.items() if k.startswith("gate/")} | {"step": log["step"]}
            for log in trainer.state.log_history
            if any(k.startswith("gate/") for k in log)
        ]
        row["settle_shift"] = strategy.settle_shift
        layers = [i for i, kept in enumerate(strategy.settled) if kept]
        row["score_gated"] = task.score(model, str(workdir / "eval"), args.seed)
        final = callbacks[0].compact(model)
    row["layers"] = layers
    row["score"] = task.score(final, str(workdir / "eval"), args.seed)
    row["encoder_flops"] = encoder_flops(final, LATENCY_SEQ)
    return row, final


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = minilm_tokenizer(args)
    rows = []
    for name in args.tasks:
        task = TaskData(name, args, tokenizer, TASKS[name], args.polarity_data)
        plan = [("dense", 0)] + [(kind, k) for k in args.keeps for kind in ("layer-lasso", *args.baselines)]
        print(
            f"{name}: {len(task.train)} train / {len(task.test)} test examples, {task.steps()} steps per "
            f"run, {len(plan)} runs",
            flush=True,
        )
        dense_model = None
        for kind, keep in plan:
            with tempfile.TemporaryDirectory() as workdir:
                row, final = run_row(task, args, kind, keep, Path(workdir))
            if kind == "dense":
                dense_model, dense_row = final, row
            else:
                row["vs_dense_points"] = 100 * (row["score"] - dense_row["score"])
                row["flop_reduction"] = dense_row["encoder_flops"] / row["encoder_flops"]
            if kind == "layer-lasso":
                vocab = dense_model.config.vocab_size
                row["latency"] = {
                    str(b): interleaved_latency(dense_model, final, b, n, vocab)
                    for b, n in zip((1, 32), args.latency_repeats)
                }
            rows.append(row)
            print(
                f"  {kind:<12} keep {row['keep']}: layers {row['layers']}, {task.metric} {row['score']:.3f}, "
                f"{row['train_seconds']:.0f} s",
                flush=True,
            )
    result = {
        "benchmark": "layer_selection",
        "settings": settings(args),
        "tasks": {name: dict(zip(("epochs", "batch_size", "lr"), TASKS[name])) for name in args.tasks},
        "machine": machine(),
        "rows": rows,
        "verdicts": verdicts(rows),
    }
    report(result, args.output, table(rows), "\n".join(result["verdicts"]))
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        "| task | model | depth | layers kept | score | vs dense | speed-up b1 | speed-up b32 | layer ratio "
        "|",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        vs, speed = vs_dense_cell(row), speedup_cells(row)
        ratio = f"{row['depth'] / row['keep']:.2f}x" if row.get("latency") else ""
        lines.append(
            f"| {row['task']} | {row['kind']} | {row['keep']} | {row['layers']} | {row['score']:.3f} | {vs} "
            "| "
            f"{speed[0]} | {speed[1]} | {ratio} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """Per task and depth: learned vs the best fixed choice; speed-up over the layer ratio."""
    lines = []
    for row in rows:
        if row["kind"] != "layer-lasso":
            continue
        fixed = [
            r
            for r in rows
            if r["task"] == row["task"] and r["keep"] == row["keep"] and r["kind"] in ("bottom", "spaced")
        ]
        if fixed:
            best = max(fixed, key=lambda r: r["score"])
            verdict = "beats" if row["score"] > best["score"] else "does not beat"
            lines.append(
                f"{row['task']}, depth {row['keep']}: learned {row['layers']} scores {row['score']:.3f}, "
                "best fixed "
                f"({best['kind']} {best['layers']}) {best['score']:.3f}: learned selection {verdict} it"
            )
        for batch, measured in row["latency"].items():
            lines.append(
                f"{row['task']}, depth {row['keep']}, batch {batch}: speed-up {measured['speedup']:.2f}x "
                "for a "
                f"{row['depth'] / row['keep']:.2f}x layer ratio "
                f"({measured['speedup'] * row['keep'] / row['depth']:.2f} of it)"
            )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
