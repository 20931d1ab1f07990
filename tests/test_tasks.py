"""The main job's tasks, packaged metrics and run settings: recipe sections under command-line flags."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.trainer_utils import PredictionOutput

from hfprune.cli import build_parser
from hfprune.cli.metrics import available, load_metric
from hfprune.cli.run import RunSettings
from hfprune.cli.tasks import SequenceClassificationTask, load_task
from hfprune.data.polarity import CACHED_NAME
from hfprune.errors import HfpruneError, RecipeError
from hfprune.recipe.run_sections import DataSection

SECTIONS_RECIPE = """\
version: 1
pruners:
  - strategy: magnitude
    targets: [Linear]
    config: {sparsity: 0.5}
model: {path: /models/some-bert}
data: {dataset: polarity, train_limit: 100}
training: {epochs: 2, batch_size: 8, seed: 7}
"""


def test_packaged_metrics_load_offline_and_agree_with_seqeval():
    from seqeval.metrics import f1_score

    assert set(available()) == {"seqeval", "accuracy", "f1"}
    gold = [["B-person", "I-person", "O", "B-location"], ["O", "B-group"]]
    predicted = [["B-person", "O", "O", "B-location"], ["O", "B-group"]]  # one entity cut short: 2 of 3 right
    result = load_metric("seqeval").compute(predictions=predicted, references=gold)
    assert result["f1"] == pytest.approx(f1_score(gold, predicted)) == pytest.approx(2 / 3)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert load_metric("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]) == {
        "accuracy": 0.5
    }


def test_unknown_metric_names_the_available_ones():
    with pytest.raises(ValueError, match="no packaged metric 'bleu'; available: accuracy, f1, seqeval"):
        load_metric("bleu")


def test_polarity_task_splits_encodes_and_scores(tmp_path, monkeypatch, minilm_tokenizer):
    rows = [f'"{1 if i % 2 else -1}",sentence number {i} is {"good" if i % 2 else "bad"}' for i in range(50)]
    (tmp_path / CACHED_NAME).write_text("\n".join(rows) + "\n", encoding="utf-8")
    monkeypatch.setenv("HFPRUNE_CACHE", str(tmp_path))  # the cached CSV is read; nothing is downloaded
    task = load_task(
        DataSection(dataset="polarity", test_fraction=0.2, train_limit=30, max_length=8),
        minilm_tokenizer,
        model_config=None,
        seed=0,
    )
    assert isinstance(task, SequenceClassificationTask) and not task.unbalanced
    assert (len(task.train_examples), len(task.test_examples)) == (30, 10)
    assert task.labels == ["negative", "positive"]
    assert all(len(item["input_ids"]) <= 8 and item["labels"] in (0, 1) for item in task.train_set)
    labels = np.array([item["labels"] for item in task.test_set])
    logits = np.stack([labels == 0, labels == 1], axis=1).astype(np.float32)
    logits[0] = logits[0][::-1]  # one wrong
    assert task.score(PredictionOutput(predictions=logits, label_ids=labels, metrics={})) == {"accuracy": 0.9}


def run_args(*argv: str):
    return build_parser().parse_args(["run", *argv])


def test_recipe_sections_set_the_run_and_flags_override_them(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SECTIONS_RECIPE)
    settings = RunSettings(
        run_args(
            str(recipe), "--output-dir", str(tmp_path / "out"), "--batch-size", "16", "--test-limit", "5"
        )
    )
    assert settings.model_path == "/models/some-bert"
    assert (settings.data.dataset, settings.data.train_limit, settings.data.test_limit) == (
        "polarity",
        100,
        5,
    )
    training = settings.training
    assert (
        training.epochs,
        training.batch_size,
        training.seed,
        training.learning_rate,
        training.baseline,
    ) == (2.0, 16, 7, 1e-4, True)
    flags = RunSettings(
        run_args(
            str(recipe),
            "--output-dir",
            str(tmp_path / "out"),
            "--model",
            "/elsewhere",
            "--dataset",
            "wnut",
            "--no-baseline",
        )
    )
    assert (
        flags.model_path == "/elsewhere" and flags.data.dataset == "wnut" and flags.training.baseline is False
    )


def test_a_bad_run_section_fails_with_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        SECTIONS_RECIPE.replace("batch_size: 8", "batch_size: 0").replace(
            "dataset: polarity", "dataset: polarity, task: translation"
        )
    )
    with pytest.raises(RecipeError) as caught:
        RunSettings(run_args(str(recipe), "--output-dir", str(tmp_path / "out")))
    message = str(caught.value)
    assert "r.yaml:7: data.task" in message and "'translation'" in message
    assert "r.yaml:8: training.batch_size: must be > 0 (got 0)" in message


def test_run_sections_do_not_change_the_recipe_fingerprint():
    from hfprune.recipe.schema import load_recipe

    plain = SECTIONS_RECIPE.split("model:")[0]
    assert load_recipe(plain).fingerprint() == load_recipe(SECTIONS_RECIPE).fingerprint()


def test_an_output_folder_holding_other_files_is_refused_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(HfpruneError, match="already holds files; pass --overwrite"):
        RunSettings(run_args("magnitude", "--output-dir", str(tmp_path / "out")))
    assert (
        RunSettings(run_args("magnitude", "--output-dir", str(tmp_path / "out"), "--overwrite")).output_dir
        == tmp_path / "out"
    )
