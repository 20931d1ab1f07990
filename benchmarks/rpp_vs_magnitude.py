"""Does RPP keep more accuracy than magnitude pruning at the same sparsity?

Fine-tunes MiniLM (all-MiniLM-L6-v2) on the movie-review polarity sentences (Pang & Lee,
4,000 sentences, a fixed 80/20 split) with one training budget for every row: dense, and
``magnitude`` and ``rpp`` at each target sparsity of the encoder's Linear weights, for
every seed. Both pruners act over the same window (10% to 60% of training) and train with
the pattern fixed for the rest. Prints a table, writes JSON.

    python benchmarks/rpp_vs_magnitude.py                 # the full table (about 40 minutes on 2 cores)
    python benchmarks/rpp_vs_magnitude.py --quick         # smoke run: a few steps, one sparsity, one seed

rpp's ``lam`` is not tuned on accuracy. It is set from the weights: under the reweighted
proximal step a weight of magnitude ``w`` shrinks by about ``lr * lam / |w|`` per step, so
``w**2`` falls by ``2 * lr * lam`` per step and a weight reaches zero after ``w**2 / (2 * lr
* lam)`` steps. Choosing ``lam = q**2 / (2 * sum of lr over the window)``, with ``q`` the
magnitude at the target quantile of the pretrained encoder weights, lets the proximal
phase alone make about the target's zeros if the gradient did not push back. The table
shows what it did reach (``proximal``); the fix at the window's end sets the target exactly.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, Trainer

from hfprune import PruneCallback
from hfprune.compaction.sparse_file import save_sparse
from hfprune.recipe.targets import match_targets

from common import (
    ENCODER_LINEARS,
    add_limit_arguments,
    add_output_arguments,
    add_polarity_data_argument,
    add_training_arguments,
    benchmark_parser,
    entry,
    lr_sum_over_window,
    machine,
    minilm_classifier,
    minilm_tokenizer,
    polarity_data,
    quick_data_limits,
    recipe,
    report,
    settings,
    training_arguments,
    training_steps,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "rpp_vs_magnitude.json"
WINDOW = (0.1, 0.6)  # pruning acts from 10% to 60% of the optimizer steps; masked training after


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "rpp"], choices=["magnitude", "rpp"])
    add_training_arguments(parser, epochs=2.0)
    add_limit_arguments(parser, "use only this many training sentences", "use only this many test sentences")
    add_polarity_data_argument(parser)
    add_output_arguments(parser, DEFAULT_OUTPUT, "smoke run: 64/32 sentences, sparsity 0.5, seed 0")
    args = parser.parse_args(argv)
    if args.quick:
        args.sparsities, args.seeds = [0.5], [0]
    quick_data_limits(args, 64, 32)
    return args


def rpp_lam(encoder_weights: list[torch.Tensor], sparsity: float, lr_sum: float) -> float:
    """``q**2 / (2 * sum lr)``: see the module docstring."""
    magnitudes = torch.cat([w.detach().abs().flatten() for w in encoder_weights])
    sample = magnitudes[
        torch.randperm(magnitudes.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]
    ]
    quantile = sample.quantile(sparsity).item()
    return quantile**2 / (2 * lr_sum)


def pruning_recipe(method: str, sparsity: float, lam: float | None) -> str:
    schedule = (
        f"{{start: {WINDOW[0]}, end: {WINDOW[1]}, every: 10}}"
        if method == "magnitude"
        else f"{{start: {WINDOW[0]}, end: {WINDOW[1]}}}"
    )
    config = (
        f"{{sparsity: {sparsity}}}"
        if method == "magnitude"
        else f"{{sparsity: {sparsity}, lam: {lam:.6g}, reweight_every: 10}}"
    )
    return recipe(entry(method, schedule, config))


def run_row(args, data, tokenizer, method: str, sparsity: float, seed: int, workdir: Path) -> dict:
    train, test = data
    model = minilm_classifier(args, seed)
    encoder_weights = [
        module.weight for module in match_targets(model, [ENCODER_LINEARS], []).modules.values()
    ]
    total_steps = training_steps(args, len(train))
    lam = (
        rpp_lam(encoder_weights, sparsity, lr_sum_over_window(args, total_steps, WINDOW))
        if method == "rpp"
        else None
    )
    callbacks = [] if method == "dense" else [PruneCallback(pruning_recipe(method, sparsity, lam))]
    trainer = Trainer(
        model=model,
        args=training_arguments(args, str(workdir / "trainer"), seed),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    predictions = trainer.predict(test)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    zeros = sum(int((w == 0).sum()) for w in encoder_weights)
    row = {
        "method": method,
        "target_sparsity": sparsity if method != "dense" else 0.0,
        "seed": seed,
        "accuracy": accuracy,
        "encoder_sparsity": zeros / sum(w.numel() for w in encoder_weights),
        "train_seconds": seconds,
        "optimizer_steps": trainer.state.global_step,
    }
    if method == "rpp":
        row["lam"] = lam
        row["proximal_sparsity"] = callbacks[0].pruner.metrics()["proximal_sparsity/0.rpp"]
    row.update(file_sizes(model, workdir))
    return row


def file_sizes(model, workdir: Path) -> dict:
    """The dense checkpoint ``save_pretrained`` writes against the bitmask-plus-values file of the same
    weights."""
    model.save_pretrained(workdir / "model")
    dense = (workdir / "model" / "model.safetensors").stat().st_size
    sparse = save_sparse(model.state_dict(), workdir / "sparse.safetensors").stat().st_size
    return {"dense_file_mb": dense / 2**20, "sparse_file_mb": sparse / 2**20}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread (min..max) over seeds for each (method, sparsity)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["target_sparsity"]), []).append(row)
    dense = (
        statistics.mean(r["accuracy"] for r in groups.get(("dense", 0.0), []))
        if ("dense", 0.0) in groups
        else None
    )
    summary = []
    for (method, sparsity), members in groups.items():
        accuracies = [r["accuracy"] for r in members]
        entry = {
            "method": method,
            "target_sparsity": sparsity,
            "seeds": len(members),
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_min": min(accuracies),
            "accuracy_max": max(accuracies),
            "encoder_sparsity": statistics.mean(r["encoder_sparsity"] for r in members),
            "vs_dense_points": None if dense is None else 100 * (statistics.mean(accuracies) - dense),
            "sparse_file_ratio": statistics.mean(r["sparse_file_mb"] / r["dense_file_mb"] for r in members),
        }
        if method == "rpp":
            entry["proximal_sparsity"] = statistics.mean(r["proximal_sparsity"] for r in members)
            entry["lam"] = members[0]["lam"]
        summary.append(entry)
    return sorted(summary, key=lambda e: (e["target_sparsity"], e["method"]))


def table(summary: list[dict]) -> str:
    lines = [
        "| method | target | encoder sparsity | accuracy (mean, min..max) | vs dense | rpp proximal zeros | "
        "sparse file / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        vs_dense = (
            ""
            if e["vs_dense_points"] is None or e["method"] == "dense"
            else f"{e['vs_dense_points']:+.1f} pt"
        )
        proximal = f"{e['proximal_sparsity']:.1%} (lam {e['lam']:.3g})" if e["method"] == "rpp" else ""
        lines.append(
            f"| {e['method']} | {e['target_sparsity']:.0%} | {e['encoder_sparsity']:.1%} | "
            f"{e['accuracy_mean']:.1%} ({e['accuracy_min']:.1%}..{e['accuracy_max']:.1%}) | {vs_dense} | "
            f"{proximal} | "
            f"{e['sparse_file_ratio']:.2f} |"
        )
    return "\n".join(lines)


def verdicts(summary: list[dict]) -> list[str]:
    """The paper's question, answered from this run's numbers."""
    by_key = {(e["method"], e["target_sparsity"]): e for e in summary}
    lines = []
    for sparsity in sorted({e["target_sparsity"] for e in summary if e["method"] != "dense"}):
        rpp, magnitude = by_key.get(("rpp", sparsity)), by_key.get(("magnitude", sparsity))
        if rpp and magnitude:
            gap = 100 * (rpp["accuracy_mean"] - magnitude["accuracy_mean"])
            verdict = (
                "keeps more accuracy than" if gap > 0 else "keeps less accuracy than" if gap < 0 else "ties"
            )
            lines.append(f"at {sparsity:.0%}: rpp {verdict} magnitude ({gap:+.1f} points, mean over seeds)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = minilm_tokenizer(args)
    data = train, test = polarity_data(args, tokenizer)
    plan = [("dense", 0.0)] + [(m, s) for s in args.sparsities for m in args.methods]
    rows = []
    print(f"{len(train)} train / {len(test)} test sentences; {len(plan) * len(args.seeds)} runs")
    for seed in args.seeds:
        for method, sparsity in plan:
            with tempfile.TemporaryDirectory() as workdir:
                row = run_row(args, data, tokenizer, method, sparsity, seed, Path(workdir))
            rows.append(row)
            print(
                f"  {method:<9} {sparsity:>4.0%} seed {seed}: accuracy {row['accuracy']:.1%}, "
                f"encoder sparsity {row['encoder_sparsity']:.1%}, {row['train_seconds']:.0f} s",
                flush=True,
            )
    summary = summarize(rows)
    result = {
        "benchmark": "rpp_vs_magnitude",
        "settings": settings(args),
        "window": WINDOW,
        "train_sentences": len(train),
        "test_sentences": len(test),
        "machine": machine(),
        "rows": rows,
        "summary": summary,
        "verdicts": verdicts(summary),
    }
    report(result, args.output, table(summary), "\n".join(result["verdicts"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
