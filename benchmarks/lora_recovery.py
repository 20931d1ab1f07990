"""After a 2x structured prune of MiniLM, how much accuracy does LoRA recover, with how many trainable
parameters, vs full fine-tuning with the mask?

Fine-tunes MiniLM (all-MiniLM-L6-v2) on the movie-review polarity sentences (the split of
``rpp_vs_magnitude.py``) for T steps (2 epochs, batch 32, lr 1e-4), dense, and with
``block-lasso`` on attention heads and FFN neurons at ratio 0.5 (2x fewer encoder
parameters; lasso phase 5% to 50% of training, lam from the rule in ``block_compaction.py``).
The pruned run's mask is fixed half-way: the model copied at that step is "pruned, before
recovery", and the run's second half is full fine-tuning with the mask held. From the copy,
LoRA (r 8, alpha 16, dropout 0.05, lr 1e-3, on the encoder's Linear layers, classifier
trained) recovers for as many steps as that second half, twice: on the masked full-size
model, its pruned weights kept zero by ``hfprune.integrations.lora.keep_sparse`` and merged by
``merge_lora`` (then compacted with the pruned run's plan), and on the compacted model.
Prints a table and the merge checks (pruned weights still exactly zero, accuracy unchanged by
the merge, what peft's stock ``merge_and_unload`` would have filled in); then what masking
costs: LoRA training steps (batch 32 x 64 tokens) with peft's update and with hfprune's masked
one, on a structured and an unstructured pattern, timed alternately. Writes JSON.

    python benchmarks/lora_recovery.py            # the full tables (about 10 minutes on 2 cores)
    python benchmarks/lora_recovery.py --quick    # smoke run: 64/32 sentences at batch 8, 8 steps, 3 to
    recover
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

from hfprune import PruneCallback, Pruner
from hfprune.cli import latency
from hfprune.cli.text_table import print_table
from hfprune.integrations.lora import keep_sparse, lora_layers, merge_lora

from common import (
    ENCODER_LINEARS,
    LAM_SCALE,
    MAX_LENGTH,
    add_polarity_data_argument,
    add_run_arguments,
    add_training_arguments,
    benchmark_parser,
    block_lasso_from_rule,
    encoder_parameters,
    machine,
    minilm_classifier,
    minilm_tokenizer,
    polarity_data,
    quick_limits,
    report,
    settings,
    test_accuracy,
    training_arguments,
    training_steps,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "lora_recovery.json"
RATIO = 0.5  # of heads and of FFN neurons: 2x fewer encoder parameters
RECOVERY_WINDOW = (
    0.05,
    0.5,
)  # lasso phase; the mask is fixed half-way, so half of training is left to recover
LORA_TARGETS = ENCODER_LINEARS.removeprefix("re:")  # peft takes the bare regex; the pooler is not in it
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
MASKED_ROW = "LoRA on the masked model (merged, sparsity kept)"


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    add_training_arguments(
        parser,
        epochs=2.0,
        epochs_help="length T of the dense and the pruned run",
        lr_help="learning rate of full fine-tuning",
    )
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8, help=f"LoRA rank r (lora_alpha {LORA_ALPHA})")
    parser.add_argument("--lam-scale", type=float, default=LAM_SCALE, help="multiply the rule's lam by this")
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=list(RECOVERY_WINDOW),
        metavar=("START", "END"),
        help="lasso phase, fractions of training; the mask is fixed at END",
    )
    add_polarity_data_argument(parser)
    parser.add_argument(
        "--cost-repeats",
        type=int,
        default=10,
        help="timed training steps per model in the masking-cost table",
    )
    add_run_arguments(
        parser, DEFAULT_OUTPUT, "smoke run: 64/32 sentences at batch 8, one epoch (8 steps, 3 to recover)"
    )
    args = parser.parse_args(argv)
    if args.quick:  # small batches: more steps per stage for the time
        args.batch_size, args.epochs, args.cost_repeats = 8, 1.0, 1
    return quick_limits(args)


class StepClock(TrainerCallback):
    """Seconds of each optimizer step (``on_step_begin`` to ``on_step_end``): set-up, data loading and
    evaluation left out.

    Registered after the PruneCallback, so its work counts, and before the Snapshot, so the copy does not.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._began)


class Snapshot(TrainerCallback):
    """A copy of the model at the first step end where every strategy's structure is fixed: pruned, before any
    recovery.

    Registered after the PruneCallback, whose mask has been applied to the weights by then.
    """

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner
        self.model: nn.Module | None = None
        self.step = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.model is None and all(s.compaction_plan() for s in self.pruner.strategies):
            self.model, self.step = copy.deepcopy(model), state.global_step


def train(model: nn.Module, train_set, tokenizer, arguments, callbacks: list[TrainerCallback]) -> None:
    collator = DataCollatorWithPadding(tokenizer)
    Trainer(
        model=model, args=arguments, train_dataset=train_set, data_collator=collator, callbacks=callbacks
    ).train()


def trainable_parameters(model: nn.Module) -> int:
    """What the optimizer trains: every parameter that requires a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def row(name: str, trainable: int, encoder: int, step_seconds: list[float], accuracy: float) -> dict:
    """A table row, announced as it comes (the full run takes minutes); the median step leaves the first
    step's warm-up out."""
    print(f"  {name}: accuracy {accuracy:.1%} after {len(step_seconds)} steps", flush=True)
    return {
        "row": name,
        "trainable_parameters": trainable,
        "encoder_parameters": encoder,
        "training_steps": len(step_seconds),
        "accuracy": accuracy,
        "seconds_per_step": statistics.median(step_seconds),
    }


def dense_row(args, data, tokenizer, workdir: Path) -> dict:
    train_set, test = data
    model, clock = minilm_classifier(args, args.seed), StepClock()
    train(model, train_set, tokenizer, training_arguments(args, str(workdir / "dense"), args.seed), [clock])
    return row(
        "dense fine-tuning",
        trainable_parameters(model),
        encoder_parameters(model),
        clock.seconds,
        test_accuracy(model, test, tokenizer, workdir, args),
    )


def pruned_rows(args, data, tokenizer, workdir: Path) -> tuple[list[dict], nn.Module, nn.Module, Pruner]:
    """Block-lasso for T steps: rows for the model when its mask is fixed and at the end; that model,
    compacted too; the pruner."""
    train_set, test = data
    model = minilm_classifier(args, args.seed)
    total_steps = training_steps(args, len(train_set))
    pruning = PruneCallback(block_lasso_from_rule(model, RATIO, args, total_steps)[0])
    clock, snapshot = StepClock(), Snapshot(pruning.pruner)
    train(
        model,
        train_set,
        tokenizer,
        training_arguments(args, str(workdir / "pruned"), args.seed),
        [pruning, clock, snapshot],
    )
    if snapshot.model is None:
        raise SystemExit(f"the mask was not fixed before the last of {total_steps} steps: lower --window END")
    pruner = pruning.pruner
    trainable = trainable_parameters(model)
    compacted = pruner.compact(snapshot.model)
    encoder = encoder_parameters(compacted)  # the structure is fixed: the final model's is the same
    before, after = (test_accuracy(m, test, tokenizer, workdir, args) for m in (snapshot.model, model))
    rows = [
        row("pruned, before recovery", trainable, encoder, clock.seconds[: snapshot.step], before),
        row("full fine-tuning with the mask", trainable, encoder, clock.seconds[snapshot.step :], after)
        | {"masked_to_zero": sum(int((~keep).sum()) for keep in pruner.compaction_plan().values())},
    ]
    return rows, snapshot.model, compacted, pruner


def lora_config(args) -> LoraConfig:
    """Plain LoRA on the encoder's Linear layers; SEQ_CLS makes the new classifier head train (and merge)
    too."""
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=LORA_TARGETS,
    )


@torch.no_grad()
def stock_merge_fill(peft_model: nn.Module) -> int:
    """How many zero base weights peft's own ``merge_and_unload`` would make non-zero: where ``B A * scaling``
    is not zero there."""
    return sum(
        int(((layer.get_base_layer().weight == 0) & (layer.get_delta_weight(adapter) != 0)).sum())
        for layer in lora_layers(peft_model).values()
        for adapter in layer.lora_A
    )


def lora_row(
    name: str, base: nn.Module, steps: int, args, data, tokenizer, workdir: Path
) -> tuple[dict, nn.Module]:
    """LoRA on ``base`` (wrapped in place) for ``steps`` steps, its zeros kept, then merged: the row with its
    merge checks, the merged model."""
    train_set, test = data
    zeros = {n: p == 0 for n, p in base.base_model.encoder.named_parameters()}
    torch.manual_seed(args.seed)  # the adapters' initialisation
    peft_model = get_peft_model(base, lora_config(args))
    keep_sparse(peft_model)
    clock = StepClock()
    arguments = dataclasses.replace(
        training_arguments(args, str(workdir / "lora"), args.seed),
        learning_rate=args.lora_lr,
        max_steps=steps,
    )
    train(peft_model, train_set, tokenizer, arguments, [clock])
    trainable = trainable_parameters(peft_model)
    before_merge = test_accuracy(peft_model, test, tokenizer, workdir, args)
    stock_fill = stock_merge_fill(peft_model)
    merged = merge_lora(peft_model)
    accuracy = test_accuracy(merged, test, tokenizer, workdir, args)
    checks = {
        "zero_base_weights": int(sum(z.sum() for z in zeros.values())),
        "zeros_kept": all(
            bool((p[zeros[n]] == 0).all()) for n, p in merged.base_model.encoder.named_parameters()
        ),
        "stock_merge_would_fill": stock_fill,
        "accuracy_before_merge": before_merge,
        "accuracy_unchanged_by_merge": before_merge == accuracy,
    }
    return row(name, trainable, encoder_parameters(merged), clock.seconds, accuracy) | {
        "merge_checks": checks
    }, merged


def masking_cost(args) -> list[dict]:
    """Milliseconds per training step (forward and backward) of LoRA on a pruned MiniLM: peft's update against
    hfprune's masked one.

    One pattern hfprune masks through the factors (half the heads and neurons: whole rows and
    columns), one it masks as a matrix (half of every matrix's weights, at random); the two
    models of a pattern are timed alternately on the same batch.
    """
    batch = 4 if args.quick else args.batch_size
    inputs = latency.random_inputs(30522, batch, MAX_LENGTH, seed=args.seed) | {
        "labels": torch.zeros(batch, dtype=torch.long)
    }
    rows = []
    for pattern, prune in (
        ("heads and neurons (rows and columns)", prune_heads_and_neurons),
        ("unstructured", prune_at_random),
    ):
        base = minilm_classifier(args, args.seed)
        prune(base)
        torch.manual_seed(args.seed)
        stock = get_peft_model(copy.deepcopy(base), lora_config(args))
        masked = get_peft_model(base, lora_config(args))
        keep_sparse(masked)
        times = latency.interleaved_times(
            {"peft": training_step(stock, inputs), "hfprune": training_step(masked, inputs)},
            args.cost_repeats,
        )
        rows.append(
            {
                "pattern": pattern,
                "peft_ms": times["peft"],
                "hfprune_ms": times["hfprune"],
                "ratio": times["hfprune"] / times["peft"],
            }
        )
        print(
            f"  {pattern}: {times['peft']:.0f} ms with peft's update, {times['hfprune']:.0f} ms masked",
            flush=True,
        )
    return rows


def training_step(model: nn.Module, inputs: dict) -> Callable[[], None]:
    def step() -> None:
        model.train()(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def prune_heads_and_neurons(model: nn.Module) -> None:
    """Zero every other head (its 32 rows of Q, K, V and columns of the output projection) and every other FFN
    neuron."""
    for layer in model.base_model.encoder.layer:
        attention = layer.attention
        heads = torch.arange(attention.self.query.out_features) // attention.self.attention_head_size % 2 == 1
        for matrix in (attention.self.query, attention.self.key, attention.self.value):
            matrix.weight[heads] = 0
        attention.output.dense.weight[:, heads] = 0
        layer.intermediate.dense.weight[1::2] = 0
        layer.output.dense.weight[:, 1::2] = 0


@torch.no_grad()
def prune_at_random(model: nn.Module) -> None:
    """Zero half of the weights of every encoder Linear, at random."""
    generator = torch.Generator().manual_seed(0)
    for module in model.base_model.encoder.modules():
        if isinstance(module, nn.Linear):
            module.weight.mul_(torch.rand(module.weight.shape, generator=generator) > 0.5)


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = minilm_tokenizer(args)
    data = train_set, test = polarity_data(args, tokenizer)
    print(f"{len(train_set)} train / {len(test)} test sentences; 4 training runs", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        rows = [dense_row(args, data, tokenizer, workdir)]
        pruned, snapshot, compacted_snapshot, pruner = pruned_rows(args, data, tokenizer, workdir)
        rows += pruned
        steps = rows[-1]["training_steps"]  # LoRA recovers for as long as the masked half
        masked, merged = lora_row(MASKED_ROW, copy.deepcopy(snapshot), steps, args, data, tokenizer, workdir)
        masked["encoder_parameters"] = encoder_parameters(
            pruner.compact(merged)
        )  # compact checks the outputs are unchanged
        masked["merge_checks"]["compacted_with_pruned_plan"] = True
        compacted, _ = lora_row(
            "LoRA on the compacted model", compacted_snapshot, steps, args, data, tokenizer, workdir
        )
        rows += [masked, compacted]
    print("masking cost: LoRA training steps on a pruned MiniLM", flush=True)
    cost = masking_cost(args)
    dense, before = rows[0], rows[1]
    for r in rows:
        r["vs_pruned_points"] = 100 * (r["accuracy"] - before["accuracy"])
        r["vs_dense_points"] = 100 * (r["accuracy"] - dense["accuracy"])
    result = {
        "benchmark": "lora_recovery",
        "settings": settings(args),
        "lora": {
            "r": args.rank,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": LORA_DROPOUT,
            "target_modules": LORA_TARGETS,
            "lr": args.lora_lr,
        },
        "train_sentences": len(train_set),
        "test_sentences": len(test),
        "machine": machine(transformers=transformers.__version__, peft=peft.__version__),
        "rows": rows,
        "checks": checks(rows),
        "masking_cost": cost,
    }
    print()
    print_table(
        (
            "row",
            "trainable parameters",
            "encoder parameters",
            "training steps",
            "accuracy",
            "vs pruned (points)",
            "vs dense (points)",
            "seconds per step",
        ),
        [table_row(r) for r in rows],
    )
    print()
    print_table(
        ("pruned pattern", "ms per step, peft's update", "ms per step, masked (hfprune)", "ratio"),
        [(c["pattern"], f"{c['peft_ms']:.0f}", f"{c['hfprune_ms']:.0f}", f"{c['ratio']:.3f}") for c in cost],
    )
    report(result, args.output, "\n".join(result["checks"]))
    return 0


def table_row(r: dict) -> tuple:
    masked = f" ({r['masked_to_zero']:,} held at zero)" if "masked_to_zero" in r else ""
    vs_pruned = "" if r["row"] == "pruned, before recovery" else f"{r['vs_pruned_points']:+.1f}"
    vs_dense = "" if r["row"] == "dense fine-tuning" else f"{r['vs_dense_points']:+.1f}"
    return (
        r["row"],
        f"{r['trainable_parameters']:,}{masked}",
        f"{r['encoder_parameters']:,}",
        r["training_steps"],
        f"{r['accuracy']:.1%}",
        vs_pruned,
        vs_dense,
        f"{r['seconds_per_step']:.2f}",
    )


def checks(rows: list[dict]) -> list[str]:
    """The merge checks of the LoRA rows, as sentences."""
    lines = []
    for r in rows:
        if "merge_checks" not in r:
            continue
        c = r["merge_checks"]
        lines.append(
            f"{r['row']}: {c['zero_base_weights']:,} base weights were zero; after merge_lora "
            f"{'all are still exactly zero' if c['zeros_kept'] else 'SOME ARE NOT ZERO'}; "
            f"peft's stock merge_and_unload would have made {c['stock_merge_would_fill']:,} of them non-zero."
        )
        lines.append(
            f"{r['row']}: accuracy {c['accuracy_before_merge']:.1%} before the merge, {r['accuracy']:.1%} "
            "after: "
            f"{'unchanged' if c['accuracy_unchanged_by_merge'] else 'CHANGED'}."
        )
        if c.get("compacted_with_pruned_plan"):
            lines.append(
                f"{r['row']}: the merged model compacts with the pruned run's plan, outputs unchanged, to "
                f"{r['encoder_parameters']:,} encoder parameters."
            )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
