"""The command line: check a recipe against a model, list plugins, fail with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hfprune.cli import main
from hfprune.recipe.builtin import builtin_names

from conftest import BERT_FFN_RECIPE, tiny_bert


@pytest.fixture
def model_dir(tmp_path):
    tiny_bert().config.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BERT_FFN_RECIPE)
    return path


def test_check_lists_matches_counts_and_planned_sparsity(recipe_file, model_dir, capsys):
    assert main(["check", str(recipe_file), "--model", str(model_dir), "--total-steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "pruners[0] magnitude (hfprune 0.2.0)  schedule start 0, end 50, every 2" in out
    assert (
        "bert.encoder.layer.1.intermediate.dense.weight" in out
        and "bert.encoder.layer.0.output.dense.weight" in out
    )
    assert "4 parameters, 8,192 weights; will zero 75.0% (6,144 weights)" in out
    assert "recipe OK: 1 entry targets 8,192 of" in out


def test_check_of_a_bad_recipe_exits_1_with_file_line_and_key(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BERT_FFN_RECIPE.replace("sparsity: 0.75", "sparsity: 1"))
    assert main(["check", str(bad), "--model", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:7: pruners[0].config.sparsity: must be < 1.0")
    assert "Traceback" not in err


def test_check_of_a_target_missing_from_the_model_exits_1_with_a_hint(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        BERT_FFN_RECIPE.replace(
            r"re:.*encoder\.layer\.\d+\.(intermediate|output)\.dense", "intermediat.dense"
        )
    )
    assert main(["check", str(bad), "--model", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:5: pruners[0].targets[0]" in err and "matches no module" in err


def test_check_defaults_to_the_built_in_minilm(recipe_file, capsys):
    assert main(["check", str(recipe_file)]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.5.intermediate.dense.weight" in out and "(1536, 384)" in out


def test_check_describes_a_layer_selection_entry_by_its_stack(capsys):
    assert main(["check", "layer-lasso"]) == 0  # a built-in recipe, by name
    out = capsys.readouterr().out
    assert "bert.encoder.layer: 6 layers (BertLayer), residual" in out
    assert "keeps 3 of 6 layers; compaction deletes the other 3" in out and "recipe OK: 1 entry" in out


def test_plugins_lists_the_built_in_strategies_and_architecture_adapters(capsys):
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["strategy", "plugin", "distribution", "version", "prunes", "description"]
    assert any(line.split()[:3] == ["magnitude", "magnitude", "hfprune"] for line in lines)
    assert any(line.split()[:3] == ["block-lasso", "block-lasso", "hfprune"] for line in lines)
    assert any(line.split()[:3] == ["layer-lasso", "layer-lasso", "hfprune"] for line in lines)
    kinds = {line.split()[0]: line.split()[4] for line in lines[1:8]}
    assert kinds["magnitude"] == "training" and kinds["wanda"] == kinds["mask-search"] == "one-shot"
    assert any(
        line.split()[:5] == ["architecture", "plugin", "distribution", "version", "recognizes"]
        for line in lines
    )
    assert any(line.split()[:3] == ["llama", "architectures", "hfprune"] for line in lines)
    assert not any(line.startswith("note: plugin") for line in lines)


def test_the_installed_command_runs_and_usage_errors_exit_2():
    assert subprocess.run(["hfprune", "--help"], capture_output=True).returncode == 0
    usage = subprocess.run([sys.executable, "-m", "hfprune.cli", "check"], capture_output=True, text=True)
    assert usage.returncode == 2 and "the following arguments are required: recipe" in usage.stderr


def test_check_says_a_rounding_selection_keeps_at_most_keep_layers(tmp_path, capsys):
    recipe = tmp_path / "round.yaml"
    recipe.write_text(
        "version: 1\npruners:\n  - strategy: layer-lasso\n    targets: [encoder.layer]\n"
        "    schedule: {start: 0.05, end: 0.5}\n    config: {keep: 4, settle: round}\n"
    )
    assert main(["check", str(recipe), "--task", "token-classification"]) == 0
    assert (
        "keeps at most 4 of 6 layers (settle: round); compaction deletes the others"
        in capsys.readouterr().out
    )


def test_check_says_where_a_distilling_recipes_teacher_comes_from(capsys):
    assert main(["check", "default", "--task", "token-classification"]) == 0
    out = capsys.readouterr().out
    assert "keeps 3 of 6 layers; compaction deletes the other 3" in out
    assert "distillation: T 2, logit weight 0.9, hidden weight 0; the teacher is given at run time" in out


@pytest.mark.parametrize("name", builtin_names())
def test_every_built_in_recipe_checks_against_minilm(name, capsys):
    assert main(["check", name, "--task", "token-classification"]) == 0
    assert "recipe OK" in capsys.readouterr().out


def test_a_recipe_that_is_neither_a_file_nor_a_built_in_name_is_one_line(capsys):
    assert main(["check", "no-such-recipe"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: no built-in recipe 'no-such-recipe'") and "default" in err and "\n" not in err
    )
