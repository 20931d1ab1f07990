"""LD-Net end to end on this CPU: a dense LSTM language model on Jane Austen, a WNUT-16 tagger over it, layer
selection.

1. Language model: :class:`DenseLSTMForLanguageModeling` (forward and backward densely
   connected LSTM stacks, layer-wise dropout 0.5 as in the paper, adaptive softmax) trains
   with the stock Trainer on the first 95% of the words of Jane Austen's six novels
   (windows of 64 words); each direction's perplexity is measured on the last 5%.
2. Tagger, for every seed: :class:`DenseLSTMForTokenClassification` reads the frozen
   language model's layer outputs and word embeddings learned on WNUT-16 (the 80/20 split
   ``hfprune run`` uses). Unpruned: no recipe. Pruned: ``benchmarks/recipes/ldnet-tagger.yaml``,
   layer-lasso keeping 2 layers over both directions (LD-Net's setting) while the rest
   trains, then training on with the others gated off; the pruned tagger is compacted
   (unselected layers deleted, their columns removed from later layers and the projection,
   outputs checked within 1e-4) and the compacted model is what is scored and timed.
3. Entity F1 (seqeval) on the test split, mean and spread over the seeds; language-model
   FLOPs per word (both stacks); words per second of the compacted pruned tagger against the
   unpruned one over the whole test split, timed alternately in one loop.

Prints a table beside the paper's figures and writes JSON.

    python benchmarks/ldnet.py            # the full table (about 20 minutes on 2 cores)
    python benchmarks/ldnet.py --quick    # smoke run: a tiny language model, one seed, a few steps
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hfprune import PruneCallback
from hfprune.cli.latency import interleaved_times
from hfprune.cli.metrics import load_metric
from hfprune.data import split, wnut
from hfprune.data.austen import read_austen
from hfprune_ldnet.dense_lstm import DenseLSTMConfig, DenseLSTMForLanguageModeling
from hfprune_ldnet.tagger import DenseLSTMForTokenClassification
from hfprune_ldnet.words import WordVocabulary, split_words

from common import (
    SPLIT_SEED,
    TEST_FRACTION,
    add_limit_arguments,
    add_output_arguments,
    benchmark_parser,
    machine,
    quick_data_limits,
    report,
    settings,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "ldnet.json"
RECIPE = Path(__file__).resolve().parent / "recipes" / "ldnet-tagger.yaml"
HELD_OUT = 0.05  # the last 5% of the Austen words
WINDOW = 64  # words per language-model training example
TIMING_BATCH = 32
VOCABULARY = "vocabulary.json"  # the language model's words, saved beside it
PAPER = {  # LD-Net (Liu et al., 2018), CoNLL03 NER, from the authors' README
    "unpruned_f1": 91.86,
    "pruned_f1": 91.84,
    "flops_before": 51e6,
    "flops_after": 5e6,
    "speedup": 6.0,
}


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--vocab", type=int, default=10000, help="language-model vocabulary, special tokens included"
    )
    parser.add_argument("--embedding", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--layers", type=int, default=4, help="per direction")
    parser.add_argument("--lm-steps", type=int, default=1200, help="about 3 passes over the text")
    parser.add_argument("--lm-batch", type=int, default=32)
    parser.add_argument("--lm-lr", type=float, default=2e-3)
    parser.add_argument(
        "--lm",
        type=Path,
        help="keep the language model in this folder: trained and saved there if it "
        "does not exist, read from it (step 1 skipped) if it does",
    )
    parser.add_argument("--tagger-epochs", type=float, default=8.0)
    parser.add_argument("--tagger-batch", type=int, default=16)
    parser.add_argument("--tagger-lr", type=float, default=2e-3)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument(
        "--austen", type=Path, help="the novels as JSON, name to lines (default: downloaded once and cached)"
    )
    add_limit_arguments(parser, "WNUT training tweets", "WNUT test tweets")
    add_output_arguments(
        parser, DEFAULT_OUTPUT, "smoke run: vocabulary 2000, width 16, 3 layers, 30 LM steps, one seed"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.vocab, args.embedding, args.hidden, args.layers = [0], 2000, 16, 16, 3
        args.lm_steps, args.tagger_epochs, args.timing_repeats = 30, 2.0, 1
    quick_data_limits(args, 128, 64)
    return args


# --- 1. the language model ---------------------------------------------------------------------
def austen_words(path: Path | None) -> list[str]:
    """Every word and punctuation mark of the six novels, in publication order."""
    return [word for lines in read_austen(path).values() for line in lines for word in split_words(line)]


def windows(ids: list[int], length: int = WINDOW) -> list[dict[str, torch.Tensor]]:
    """Consecutive, non-overlapping stretches of ``length`` ids; each is its own labels (both directions shift
    them)."""
    return [
        {"input_ids": torch.tensor(ids[i : i + length]), "labels": torch.tensor(ids[i : i + length])}
        for i in range(0, len(ids) - length + 1, length)
    ]


def train_language_model(
    args, vocab: WordVocabulary, train: list[dict], workdir: Path
) -> DenseLSTMForLanguageModeling:
    torch.manual_seed(0)
    config = DenseLSTMConfig(
        vocab_size=len(vocab),
        embedding_size=args.embedding,
        hidden_size=args.hidden,
        num_layers=args.layers,
        dropout=0.5,
        layer_dropout=0.5,
        cutoffs=[min(2000, len(vocab) // 4), min(6000, len(vocab) // 2)],
    )
    model = DenseLSTMForLanguageModeling(config)
    training = TrainingArguments(
        output_dir=str(workdir / "lm"),
        max_steps=args.lm_steps,
        per_device_train_batch_size=args.lm_batch,
        learning_rate=args.lm_lr,
        warmup_steps=min(100, args.lm_steps // 10),
        max_grad_norm=1.0,
        seed=0,
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        disable_tqdm=True,
        use_cpu=True,
    )
    Trainer(model=model, args=training, train_dataset=train).train()
    return model


@torch.no_grad()
def perplexity(
    model: DenseLSTMForLanguageModeling, held_out: list[dict], batch: int = 64
) -> dict[str, float]:
    """Each direction's perplexity over the held-out windows: every word of a window but its first (forward)
    or last
    (backward), which that direction would predict from outside the window."""
    model.eval()
    totals = {"forward": 0.0, "backward": 0.0}
    for start in range(0, len(held_out), batch):
        ids = torch.stack([w["input_ids"] for w in held_out[start : start + batch]])
        output = model(ids, labels=ids)
        for direction in totals:
            totals[direction] += getattr(output, f"{direction}_loss").item() * len(ids)
    return {direction: math.exp(total / len(held_out)) for direction, total in totals.items()}


# --- 2. the tagger -----------------------------------------------------------------------------
class TaggingData:
    """WNUT-16 as word ids of a task vocabulary: the language model's words, then training words it lacks
    (seen twice)."""

    def __init__(self, lm_vocab: WordVocabulary, args):
        examples = wnut.read_wnut()
        self.labels = wnut.label_list(examples)
        train, test = split(examples, TEST_FRACTION, SPLIT_SEED)
        self.train_examples, self.test_examples = train[: args.train_limit], test[: args.test_limit]
        counts = Counter(word for words, _ in self.train_examples for word in words)
        self.vocab = lm_vocab.extended(word for word, n in counts.items() if n >= 2)
        self.lm_ids = torch.tensor([lm_vocab.id(word) for word in self.vocab.words])
        label_id = {label: i for i, label in enumerate(self.labels)}
        self.train, self.test = (
            [
                {"input_ids": self.vocab.ids(words), "labels": [label_id[t] for t in tags]}
                for words, tags in part
            ]
            for part in (self.train_examples, self.test_examples)
        )

    @staticmethod
    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        """Pads on the right: ids with 0, labels with -100."""
        length = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.zeros(len(features), length, dtype=torch.long),
            "attention_mask": torch.zeros(len(features), length, dtype=torch.long),
            "labels": torch.full((len(features), length), -100),
        }
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(feature["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(feature["labels"])
        return batch

    def test_batches(self) -> list[dict[str, torch.Tensor]]:
        return [self.collate(self.test[i : i + TIMING_BATCH]) for i in range(0, len(self.test), TIMING_BATCH)]

    @torch.no_grad()
    def f1(self, model) -> float:
        """Entity F1 (seqeval) of ``model``'s tags on the test split."""
        model.eval()
        predicted = []
        for batch in self.test_batches():
            tags = model(batch["input_ids"], batch["attention_mask"]).logits.argmax(-1)
            predicted += [
                [self.labels[t] for t in row[:n]]
                for row, n in zip(tags.tolist(), batch["attention_mask"].sum(1).tolist())
            ]
        gold = [tags for _, tags in self.test_examples]
        return load_metric("seqeval").compute(predictions=predicted, references=gold)["f1"]


def train_tagger(lm_dir: Path, data: TaggingData, args, seed: int, pruned: bool, workdir: Path):
    """A tagger over the frozen language model, trained with or without the layer-lasso recipe; (model,
    callback, seconds)."""
    torch.manual_seed(seed)
    model = DenseLSTMForTokenClassification.from_pretrained(
        lm_dir,
        task_vocab_size=len(data.vocab),
        num_labels=len(data.labels),
        id2label=dict(enumerate(data.labels)),
        label2id={label: i for i, label in enumerate(data.labels)},
        dropout=0.0,
        layer_dropout=0.0,
    )
    with torch.no_grad():
        model.lm_ids.copy_(data.lm_ids)
    model.dense_lstm.requires_grad_(False)  # LD-Net: the language model stays as it was trained
    callback = PruneCallback(str(RECIPE)) if pruned else None
    training = TrainingArguments(
        output_dir=str(workdir / "tagger"),
        num_train_epochs=args.tagger_epochs,
        per_device_train_batch_size=args.tagger_batch,
        learning_rate=args.tagger_lr,
        max_grad_norm=5.0,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data.train,
        data_collator=data.collate,
        callbacks=[callback] if callback else [],
    )
    started = time.perf_counter()
    trainer.train()
    return model, callback, time.perf_counter() - started


def tagger_row(
    lm_dir: Path, data: TaggingData, args, seed: int, pruned: bool, workdir: Path
) -> tuple[dict, torch.nn.Module]:
    model, callback, seconds = train_tagger(lm_dir, data, args, seed, pruned, workdir)
    row = {"seed": seed, "model": "pruned" if pruned else "unpruned", "train_seconds": seconds}
    if pruned:
        strategy = callback.pruner.strategies[0]
        row["layers_kept"] = [name for name, kept in zip(strategy.layer_names, strategy.settled) if kept]
        row["settle_shift"] = strategy.settle_shift
        row["f1_gated"] = data.f1(model)
        model = callback.compact(model)  # checks its outputs against the gated model's
    row["f1"] = data.f1(model)
    row["lm_flops_per_word"] = model.dense_lstm.flops_per_token()
    row["parameters"] = sum(p.numel() for p in model.parameters())
    return row, model


def words_per_second(models: dict[str, torch.nn.Module], data: TaggingData, repeats: int) -> dict[str, float]:
    """Words per second of each model over the whole test split in batches of 32, timed alternately in one
    loop."""
    batches = [{k: v for k, v in batch.items() if k != "labels"} for batch in data.test_batches()]
    words = sum(len(f["input_ids"]) for f in data.test)

    def tag_all(model):
        for batch in batches:
            model(**batch)

    with torch.inference_mode():
        seconds = interleaved_times(
            {name: partial(tag_all, model.eval()) for name, model in models.items()}, repeats
        )
    return {name: words / (milliseconds / 1000) for name, milliseconds in seconds.items()}


# --- 3. the table ------------------------------------------------------------------------------
def summary(rows: list[dict], kind: str) -> dict:
    scores = [100 * r["f1"] for r in rows if r["model"] == kind]
    return {
        "f1_mean": statistics.mean(scores),
        "f1_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "f1_min": min(scores),
        "f1_max": max(scores),
        "seeds": len(scores),
    }


def table(result: dict) -> str:
    ours, speed = result["summary"], result["words_per_second"]
    flops = {
        kind: next(r["lm_flops_per_word"] for r in result["rows"] if r["model"] == kind)
        for kind in ("unpruned", "pruned")
    }
    lines = [
        "| | F1 unpruned | F1 pruned | LM FLOPs/word before | after | reduction | words/s unpruned | pruned "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f1(kind):
        s = ours[kind]
        return (
            f"{s['f1_mean']:.2f} ± {s['f1_std']:.2f} ({s['f1_min']:.2f}-{s['f1_max']:.2f}, {s['seeds']} "
            "seeds)"
        )

    lines.append(
        f"| hfprune, WNUT-16 (this CPU) | {f1('unpruned')} | {f1('pruned')} | "
        f"{flops['unpruned'] / 1e6:.2f}M | "
        f"{flops['pruned'] / 1e6:.2f}M | {flops['unpruned'] / flops['pruned']:.1f}x | "
        f"{speed['unpruned']:.0f} | "
        f"{speed['pruned']:.0f} | {speed['pruned'] / speed['unpruned']:.2f}x |"
    )
    paper = PAPER
    lines.append(
        f"| LD-Net paper, CoNLL03 NER | {paper['unpruned_f1']} | {paper['pruned_f1']} | "
        f"{paper['flops_before'] / 1e6:.0f}M | "
        f"{paper['flops_after'] / 1e6:.0f}M | {paper['flops_before'] / paper['flops_after']:.0f}x | | | "
        f"{paper['speedup']:.0f}x |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    words = austen_words(args.austen)
    cut = int(len(words) * (1 - HELD_OUT))
    reuse = args.lm is not None and args.lm.exists()
    lm_vocab = (
        WordVocabulary.load(args.lm / VOCABULARY)
        if reuse
        else WordVocabulary.most_frequent(words[:cut], args.vocab)
    )
    ids = lm_vocab.ids(words)
    train, held_out = windows(ids[:cut]), windows(ids[cut:])
    print(
        f"Austen: {len(words)} words, vocabulary {len(lm_vocab)}, {len(train)} training / {len(held_out)} "
        "held-out windows",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        lm_dir = args.lm or workdir / "language-model"
        started = time.perf_counter()
        if not reuse:
            train_language_model(args, lm_vocab, train, workdir).save_pretrained(lm_dir)
            lm_vocab.save(lm_dir / VOCABULARY)
        lm = DenseLSTMForLanguageModeling.from_pretrained(lm_dir)
        language_model = {
            "config": {
                k: getattr(lm.config, k)
                for k in ("vocab_size", "embedding_size", "hidden_size", "num_layers", "cutoffs")
            },
            "parameters": sum(p.numel() for p in lm.parameters()),
            "train_seconds": time.perf_counter() - started,
            "steps": args.lm_steps,
            "reused": reuse,
            "held_out_words": len(held_out) * WINDOW,
            "perplexity": perplexity(lm, held_out),
        }
        print(
            f"language model: {language_model['parameters']} parameters, held-out perplexity "
            f"{language_model['perplexity']['forward']:.1f} forward / "
            f"{language_model['perplexity']['backward']:.1f} backward",
            flush=True,
        )
        data = TaggingData(lm_vocab, args)
        print(
            f"WNUT-16: {len(data.train)} training / {len(data.test)} test tweets, task vocabulary "
            f"{len(data.vocab)}",
            flush=True,
        )
        rows, timed = [], {}
        for seed in args.seeds:
            for pruned in (False, True):
                row, model = tagger_row(lm_dir, data, args, seed, pruned, workdir)
                rows.append(row)
                timed.setdefault(row["model"], model)  # the first seed's models are timed
                print(
                    f"  seed {seed} {row['model']:<8}: F1 {row['f1']:.3f} {row.get('layers_kept', '')} "
                    f"({row['train_seconds']:.0f} s)",
                    flush=True,
                )
    result = {
        "benchmark": "ldnet",
        "settings": settings(args),
        "machine": machine(),
        "language_model": language_model,
        "wnut": {"train": len(data.train), "test": len(data.test), "labels": data.labels},
        "rows": rows,
        "summary": {kind: summary(rows, kind) for kind in ("unpruned", "pruned")},
        "words_per_second": words_per_second(timed, data, args.timing_repeats),
        "paper": PAPER,
    }
    report(result, args.output, table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
