"""Pruning without retraining: how much accuracy does a fine-tuned MiniLM keep at 60% of its encoder
FLOPs, pruned in minutes from calibration examples, and what does each step of Kwon et al.'s method bring?

For each seed, all-MiniLM-L6-v2 is fine-tuned on ``--task``: the movie-review polarity sentences
(accuracy; 3 epochs) or WNUT-16 named entities (entity F1, seqeval; 5 epochs, as ``hfprune run``),
split as every benchmark splits them: the dense row. Then copies of it are pruned by
``hfprune.oneshot`` with the ``mask-search`` strategy, keeping ``--keep`` of the heads' and neurons'
FLOPs (at the calibration examples' mean length), on the first ``--calibration`` training examples
(their labels give the loss), with no optimizer step:

- ``weight norm``: heads and neurons ranked by their weights' L2 norm, no tuning (the baseline);
- ``fisher``: ranked by the masks' diagonal Fisher information, the same search, no tuning;
- ``+ rearrange``: each layer's choice revised with the batches' gradients together;
- ``+ tune``: the kept heads and neurons rescaled by least squares to reproduce each layer's output.

Each pruned model is compacted (its outputs checked against the masked model), scored on the
held-out split, counted, and timed against the dense model at batch 32 (alternately in one loop).
The pruning time is the oneshot call alone. Scores: mean and range over the seeds, and the mean of
each seed's difference from its own dense model. Targets (issue 24): at 60% of the FLOPs at most 1
point of accuracy (2 of entity F1) below dense, pruned in under 5 minutes. Prints a table, writes
JSON.

    python benchmarks/oneshot.py --dense-dir /tmp/dense   # polarity, 3 seeds: about an hour on 2 cores
    python benchmarks/oneshot.py --task wnut              # WNUT-16, 3 seeds
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
    TaskData,
    add_limit_arguments,
    add_output_arguments,
    add_polarity_data_argument,
    benchmark_parser,
    encoder_flops,
    encoder_parameters,
    entry,
    interleaved_latency,
    machine,
    minilm_tokenizer,
    quick_data_limits,
    recipe,
    report,
    settings,
)

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {
    # task: (epochs, batch size, learning rate) of the dense fine-tuning; WNUT-16's are hfprune run's
    "polarity": (3.0, 32, 1e-4),
    "wnut": (5.0, 32, 1e-4),
}
TARGET_POINTS = {"polarity": -1.0, "wnut": -2.0}  # score points below dense, at most
TARGET_SECONDS = 300.0
OUTPUTS = {"polarity": "oneshot.json", "wnut": "oneshot_wnut.json"}
CALIBRATION_BATCH = 32
# Each row's mask-search settings, in the order each step is added.
METHODS = {
    "weight norm": {"importance": "weight-norm", "rearrange": False, "tune": False},
    "fisher": {"importance": "fisher", "rearrange": False, "tune": False},
    "+ rearrange": {"importance": "fisher", "rearrange": True, "tune": False},
    "+ tune": {"importance": "fisher", "rearrange": True, "tune": True},
}


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--keep", type=float, default=0.6, help="fraction of the heads' and neurons' FLOPs kept"
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="polarity")
    parser.add_argument("--calibration", type=int, default=2000, help="calibration examples (training split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--latency-repeats", type=int, default=6, help="timed forward passes at batch 32")
    parser.add_argument(
        "--dense-dir", type=Path, help="keep each seed's dense model in DIR/TASK-seed-N, reuse it"
    )
    add_polarity_data_argument(parser)
    add_limit_arguments(parser)
    add_output_arguments(
        parser,
        None,
        "smoke run: 64/32 examples, one seed, 1 timing repeat",
        "where the JSON goes (default: results/oneshot.json, oneshot_wnut.json for WNUT-16)",
    )
    args = parser.parse_args(argv)
    args.output = args.output or RESULTS / OUTPUTS[args.task]
    if args.quick:
        args.seeds, args.latency_repeats, args.calibration = [0], 1, 32
    quick_data_limits(args, 64, 32)
    return args


def dense_model(task: TaskData, args, seed: int, workdir: Path):
    """The seed's dense model: from ``--dense-dir`` when saved there, else fine-tuned now (and saved)."""
    import torch
    from transformers import Trainer

    saved = args.dense_dir / f"{task.name}-seed-{seed}" if args.dense_dir else None
    if saved is not None and (saved / "config.json").is_file():
        return task.model(saved, fine_tuned=True)
    torch.manual_seed(seed)  # the new head
    dense = task.model(args.model_path)
    Trainer(
        model=dense,
        args=task.arguments(str(workdir / "trainer"), seed),
        train_dataset=task.train,
        data_collator=task.collator,
    ).train()
    if saved is not None:
        dense.save_pretrained(str(saved))
    return dense


def calibration_batches(task: TaskData, args) -> list[dict]:
    """The first ``--calibration`` training examples, padded in batches of 32."""
    examples = [task.train[i] for i in range(min(args.calibration, len(task.train)))]
    return [
        dict(task.collator(examples[i : i + CALIBRATION_BATCH]))
        for i in range(0, len(examples), CALIBRATION_BATCH)
    ]


def mask_search_recipe(keep: float, method: dict) -> str:
    config = ", ".join(f"{k}: {str(v).lower()}" for k, v in {"keep": keep, **method}.items())
    return recipe(entry("mask-search", None, f"{{{config}}}", ENCODER_LAYERS))


def pruned_row(name: str, dense, batches, task: TaskData, args, seed: int, workdir: Path) -> dict:
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
        "score": task.score(compacted, str(workdir / "eval"), seed),
        "encoder_parameters": encoder_parameters(compacted),
        "encoder_flops_128": encoder_flops(compacted, 128),
        "speedup_b32": latency["speedup"],
        "latency_b32": latency,
        "pruning_seconds": round(seconds, 1),
        "metrics": {k: round(v, 4) for k, v in pruner.metrics().items()},
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: score mean and range, the mean paired difference from dense, size, speed, time."""
    dense = {row["seed"]: row for row in rows if row["method"] == "dense"}
    summary = []
    for method in ["dense", *METHODS]:
        members = [row for row in rows if row["method"] == method]
        if not members:
            continue
        scores = [m["score"] for m in members]
        line = {
            "method": method,
            "seeds": len(members),
            "score_mean": statistics.mean(scores),
            "score_min": min(scores),
            "score_max": max(scores),
            "vs_dense_points": 100 * statistics.mean(m["score"] - dense[m["seed"]]["score"] for m in members),
            "flops_kept": statistics.mean(
                m["encoder_flops_128"] / dense[m["seed"]]["encoder_flops_128"] for m in members
            ),
        }
        if method != "dense":
            line["speedup_b32"] = statistics.mean(m["speedup_b32"] for m in members)
            line["pruning_seconds"] = max(m["pruning_seconds"] for m in members)
        summary.append(line)
    return summary


def table(summary: list[dict], metric: str) -> str:
    lines = [
        f"| method | {metric} mean (range) | vs dense | encoder FLOPs kept | speed-up b32 | pruning s (max) "
        "|",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        pruned = s["method"] != "dense"
        versus = f"{s['vs_dense_points']:+.2f} pt" if pruned else ""
        speed = f"{s['speedup_b32']:.2f}x" if pruned else ""
        seconds = f"{s['pruning_seconds']:.0f}" if pruned else ""
        score = f"{s['score_mean']:.4f} ({s['score_min']:.4f}-{s['score_max']:.4f})"
        lines.append(f"| {s['method']} | {score} | {versus} | {s['flops_kept']:.3f} | {speed} | {seconds} |")
    return "\n".join(lines)


def verdict(summary: list[dict], task: TaskData) -> str:
    full = next(s for s in summary if s["method"] == "+ tune")
    target = TARGET_POINTS[task.name]
    score = (
        "met" if full["vs_dense_points"] >= target else f"missed by {target - full['vs_dense_points']:.2f} pt"
    )
    speed = "met" if full["pruning_seconds"] < TARGET_SECONDS else "missed"
    return (
        f"- {task.metric} at {full['flops_kept']:.0%} of the FLOPs: {full['vs_dense_points']:+.2f} pt "
        f"(target at least {target:+.0f}): {score}\n"
        f"- pruning time: at most {full['pruning_seconds']:.0f} s (target under {TARGET_SECONDS:.0f}): "
        f"{speed}"
    )


def main(argv=None) -> None:
    import transformers

    args = parse_args(argv)
    started = time.perf_counter()
    task = TaskData(args.task, args, minilm_tokenizer(args), TASKS[args.task], args.data)
    print(f"{task.task.description}: {len(task.train)} training and {len(task.test)} test examples")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        batches = calibration_batches(task, args)
        for seed in args.seeds:
            dense = dense_model(task, args, seed, workdir)
            dense_row = {
                "method": "dense",
                "seed": seed,
                "score": task.score(dense, str(workdir / "eval"), seed),
                "encoder_parameters": encoder_parameters(dense),
                "encoder_flops_128": encoder_flops(dense, 128),
            }
            rows.append(dense_row)
            for name in METHODS:
                row = pruned_row(name, dense, batches, task, args, seed, workdir)
                rows.append(row)
                print(
                    f"seed {seed} {name}: {task.metric} {row['score']:.4f} (dense {dense_row['score']:.4f}), "
                    f"pruned in {row['pruning_seconds']:.0f} s, {row['speedup_b32']:.2f}x at batch 32",
                    flush=True,
                )
    summary = summarize(rows)
    result = {
        "settings": settings(args) | {"metric": task.metric},
        "machine": machine(transformers=transformers.__version__),
        "rows": rows,
        "summary": summary,
    }
    report(
        result,
        args.output,
        table(summary, task.metric),
        verdict(summary, task),
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
