"""``hfprune prune``: a fine-tuned model pruned from calibration data, compacted, scored and reported."""

from __future__ import annotations

import json

import pytest
import torch
from test_user_data import review_rows, write_csv

from hfprune import load_compacted
from hfprune.cli import main
from hfprune.compaction.sparse_file import load_sparse

from conftest import tiny_bert_folder

MASK_SEARCH = r"""version: 1
pruners:
  - strategy: mask-search
    targets: ['re:bert\.encoder\.layer\.\d+']
    config: {keep: 0.6}
"""
WANDA = r"""version: 1
pruners:
  - strategy: wanda
    targets: ['re:bert\.encoder\.layer\.\d+\..*dense']
    config: {sparsity: 0.5}
"""


@pytest.fixture
def classifier_dir(tmp_path, minilm_tokenizer):
    """A random 2-layer BERT sentiment classifier (neg, pos) with MiniLM's tokenizer: 'fine-tuned'."""
    from transformers import BertForSequenceClassification

    labels = {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
    return tiny_bert_folder(
        tmp_path / "classifier", minilm_tokenizer, BertForSequenceClassification, **labels
    )


def prune(tmp_path, recipe: str, model, data, *extra) -> int:
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(recipe)
    argv = ["prune", str(recipe_path), "--model", str(model), "--data", str(data)]
    argv += [
        "--output-dir",
        str(tmp_path / "out"),
        "--calibration-examples",
        "32",
        "--batch-size",
        "8",
        *extra,
    ]
    return main(argv)


def test_prune_compacts_scores_and_reports(tmp_path, classifier_dir):
    data = write_csv(
        tmp_path / "reviews.csv", [{"text": r["review"], "label": r["label"]} for r in review_rows(60)]
    )
    assert prune(tmp_path, MASK_SEARCH, classifier_dir, data) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["command"] == "prune" and report["compaction"] == "ok"
    assert report["calibration_examples"] == 32
    assert set(report["scores"]) == {"baseline", "pruned", "compacted"}
    assert report["scores"]["compacted"] == report["scores"]["pruned"]
    assert report["parameters"]["layers_compacted"] < report["parameters"]["layers_full_size"]
    assert "# hfprune prune" in (tmp_path / "out" / "report.md").read_text()
    assert report["loader"] == "hfprune.load_compacted"  # heads and neurons differ from layer to layer
    model = load_compacted(tmp_path / "out" / "model")
    assert report["parameters"]["compacted"] == sum(p.numel() for p in model.parameters())


def test_prune_with_wanda_saves_the_zeros_and_the_sparse_file(tmp_path, classifier_dir):
    from transformers import AutoModelForSequenceClassification

    data = write_csv(
        tmp_path / "reviews.csv", [{"text": r["review"], "label": r["label"]} for r in review_rows(60)]
    )
    assert prune(tmp_path, WANDA, classifier_dir, data) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sparsity"]["global"] == 0.5 and report["scores"]["compacted"] is None
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    state = load_sparse(tmp_path / "out" / "sparse.safetensors")
    weight = "bert.encoder.layer.0.output.dense.weight"
    assert torch.equal(state[weight], model.state_dict()[weight])
    assert (state[weight] == 0).float().mean() == 0.5


def test_prune_refuses_a_training_recipe_before_reading_data(tmp_path, classifier_dir, capsys):
    recipe = MASK_SEARCH.replace("mask-search", "magnitude").replace("keep: 0.6", "sparsity: 0.5")
    assert prune(tmp_path, recipe, classifier_dir, tmp_path / "missing.csv") == 1
    error = capsys.readouterr().err
    assert "pruners[0].strategy" in error and "prunes during training" in error


def test_prune_refuses_a_one_shot_entry_with_a_schedule_before_reading_data(tmp_path, classifier_dir, capsys):
    recipe = MASK_SEARCH.replace("    config:", "    schedule: {start: 0.1, end: 0.5}\n    config:")
    assert prune(tmp_path, recipe, classifier_dir, tmp_path / "missing.csv") == 1
    error = capsys.readouterr().err
    assert "pruners[0].schedule" in error and "remove `schedule`" in error


def test_prune_refuses_a_model_of_another_task(tmp_path, classifier_dir, capsys):
    """Word-tag data given to a sentence classifier: said plainly, nothing written."""
    rows = [{"tokens": json.dumps(["a", "film"]), "tags": json.dumps(["O", "B-x"])} for _ in range(40)]
    data = tmp_path / "tags.jsonl"
    data.write_text(
        "\n".join(json.dumps({"tokens": ["a", "film"], "tags": ["O", "B-x"]}) for _ in rows) + "\n"
    )
    assert prune(tmp_path, MASK_SEARCH, classifier_dir, data) == 1
    assert "BertForSequenceClassification" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()
