"""What is left of a model: live heads and neurons per layer, zeros, `hfprune report` and the pruning
picture."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from hfprune import Pruner
from hfprune.cli import main
from hfprune.cli.plot import plot_pruning
from hfprune.compaction.compact import compact_model
from hfprune.compaction.structure import model_structure
from hfprune.plugins import default_registry

from conftest import TINY_MODELS, tiny_bert

STACK = "bert.encoder.layer"
ADAPTERS = default_registry().architectures


def layers(structure: dict) -> list[dict]:
    (stack,) = structure["stacks"]
    return stack["layers"]


def zero_count(model) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


def gated_and_zeroed() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 3-layer BERT with layer 1 gated off by layer-lasso, head 1 of layer 0 and neurons 0-15 of layer 2
    zeroed.

    Returns the model and the compaction plan that removes exactly that.
    """
    model = tiny_bert(layers=3)
    pruner = Pruner(
        f"version: 1\npruners:\n  - strategy: layer-lasso\n    targets: [{STACK}]\n    schedule: {{start: "
        f"0, end: 1.0}}\n"
        "    config: {keep: 2}\n"
    )
    pruner.attach(model)
    pruner.start(100)
    strategy = pruner.strategies[0]
    with torch.no_grad():
        strategy.gates.copy_(torch.tensor([1.0, 0.0, 1.0]))
        strategy.settle()
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 16:] = 0  # head 1 of 2 (16 wide)
        model.bert.encoder.layer[2].output.dense.weight[:, :16] = 0  # 16 of 64 neurons
    plan = strategy.compaction_plan()
    for name in (f"{STACK}.0.attention.output.dense.weight", f"{STACK}.2.output.dense.weight"):
        plan[name] = model.get_parameter(name) != 0
    return model, plan


@pytest.fixture
def compacted():
    model, plan = gated_and_zeroed()
    return compact_model(model, plan, ADAPTERS)


# --- model_structure -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_a_dense_model_has_every_head_and_neuron_live_and_no_zero_in_its_layers(family):
    model = TINY_MODELS[family]()
    structure = model_structure(model, ADAPTERS)
    assert structure["model"] == type(model).__name__ and structure["model_type"] == model.config.model_type
    assert structure["parameters"] == sum(p.numel() for p in model.parameters())
    assert structure["hfprune_layout"] is None
    heads = model.config.num_attention_heads
    assert len(layers(structure)) == model.config.num_hidden_layers
    for layer in layers(structure):
        assert layer["kept"] and layer["heads"] == {"live": heads, "of": heads}
        assert layer["neurons"]["live"] == layer["neurons"]["of"] > 0
        assert layer["sparsity"] == 0.0
    json.dumps(structure)  # JSON-able as it is


@pytest.mark.parametrize(
    "family, output, head_slice, live, of",
    [
        ("bert", f"{STACK}.1.attention.output.dense", (slice(None), slice(16, 32)), 1, 2),
        ("distilbert", "distilbert.transformer.layer.1.attention.out_lin", (slice(None), slice(8, 16)), 3, 4),
        (
            "gpt2",
            "transformer.h.1.attn.c_proj",
            (slice(16, 32), slice(None)),
            1,
            2,
        ),  # Conv1D: its inputs are rows
        (
            "llama",
            "model.layers.1.self_attn.o_proj",
            (slice(None), slice(16, 32)),
            2,
            4,
        ),  # key/value group 1: query heads 2, 3
    ],
)
def test_zeroed_output_columns_make_exactly_those_heads_dead(family, output, head_slice, live, of):
    model = TINY_MODELS[family]()
    weight = model.get_submodule(output).weight
    before = model_structure(model, ADAPTERS)
    with torch.no_grad():
        weight[head_slice] = 0

    after = model_structure(model, ADAPTERS)

    assert [layer["heads"] for layer in layers(after)] == [{"live": of, "of": of}, {"live": live, "of": of}]
    assert [layer["neurons"] for layer in layers(after)] == [layer["neurons"] for layer in layers(before)]
    assert after["zero_parameters"] - before["zero_parameters"] == weight[head_slice].numel()
    (matrix,) = [m for m in after["matrices"] if m["name"] == f"{output}.weight"]
    assert matrix["shape"] == list(weight.shape) and matrix["sparsity"] == round(
        weight[head_slice].numel() / weight.numel(), 4
    )


def test_a_neuron_is_dead_when_its_down_column_or_every_row_producing_it_is_zero():
    model = tiny_bert()
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():
        layer.output.dense.weight[:, :10] = 0  # neurons 0-9: nothing reaches the output
        layer.intermediate.dense.weight[10:18] = (
            0  # neurons 10-17: a constant gelu(bias), which compaction folds away
        )
        layer.intermediate.dense.weight[20, :5] = 0  # a few zeros in neuron 20's row leave it live

    structure = model_structure(model, ADAPTERS)

    assert [layer["neurons"] for layer in layers(structure)] == [
        {"live": 64, "of": 64},
        {"live": 46, "of": 64},
    ]
    assert [layer["heads"]["live"] for layer in layers(structure)] == [2, 2]
    zeroed = 32 * 10 + 8 * 32 + 5
    matrices = 4 * 32 * 32 + 2 * 32 * 64
    assert (
        layers(structure)[1]["sparsity"] == round(zeroed / matrices, 4)
        and layers(structure)[0]["sparsity"] == 0.0
    )


def test_a_gated_off_layer_is_reported_deleted_only_when_the_caller_says_so():
    model, plan = gated_and_zeroed()

    assert all(
        layer["kept"] for layer in layers(model_structure(model, ADAPTERS))
    )  # its weights alone cannot tell
    structure = model_structure(model, ADAPTERS, layer_keep={STACK: plan[STACK]})

    assert [layer["kept"] for layer in layers(structure)] == [True, False, True]
    assert [layer["heads"]["live"] for layer in layers(structure)] == [1, 2, 2]
    assert [layer["neurons"]["live"] for layer in layers(structure)] == [64, 64, 48]
    with pytest.raises(
        ValueError,
        match=r"layer_keep\['bert.encoder.layer'\] has 2 flags, but .* is a ModuleList of 3 layers",
    ):
        model_structure(model, ADAPTERS, layer_keep={STACK: [True, False]})


def test_a_compacted_model_counts_what_it_kept_out_of_the_original_config(compacted):
    structure = model_structure(compacted, ADAPTERS)

    assert [layer["name"] for layer in layers(structure)] == [f"{STACK}.0", f"{STACK}.1"]  # layer 1 is gone
    assert [layer["heads"] for layer in layers(structure)] == [{"live": 1, "of": 2}, {"live": 2, "of": 2}]
    assert [layer["neurons"] for layer in layers(structure)] == [
        {"live": 64, "of": 64},
        {"live": 48, "of": 64},
    ]
    assert all(
        layer["sparsity"] == 0.0 for layer in layers(structure)
    )  # the zeros left with their heads and neurons
    assert structure["hfprune_layout"] == {
        "head": {f"{STACK}.0.attention": 1, f"{STACK}.1.attention": 2},
        "neuron": {f"{STACK}.0": 64, f"{STACK}.1": 48},
    }
    assert structure["parameters"] == sum(p.numel() for p in compacted.parameters())


def test_a_model_no_adapter_knows_still_gets_totals_and_per_matrix_sparsity():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight[0] = 0

    structure = model_structure(model, ADAPTERS)

    assert (
        structure["stacks"] == [] and structure["model"] == "Sequential" and structure["model_type"] is None
    )
    assert (structure["parameters"], structure["zero_parameters"]) == (4 * 3 + 3 + 3 * 2, 4)
    assert structure["matrices"] == [
        {"name": "0.weight", "shape": [3, 4], "sparsity": round(4 / 12, 4)},
        {"name": "2.weight", "shape": [2, 3], "sparsity": 0.0},
    ]


# --- hfprune report --------------------------------------------------------------------------------


def table(out: str) -> list[list[str]]:
    """The rows of the per-layer table (up to the blank line after it), split on runs of spaces."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "heads"])
    end = lines.index("", start)
    return [line.split() for line in lines[start + 1 : end]]


def test_report_of_a_saved_dense_model(tmp_path, capsys):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "dense")
    capsys.readouterr()

    assert main(["report", str(tmp_path / "dense")]) == 0

    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'dense'}: BertForSequenceClassification (bert)\n")
    assert f"{STACK}: 2 layers" in out
    assert table(out) == [["0", "2/2", "64/64", "8,544", "0.0%"], ["1", "2/2", "64/64", "8,544", "0.0%"]]
    total = sum(p.numel() for p in model.parameters())
    assert f"total: {total:,} parameters, {zero_count(model):,} exactly zero" in out
    assert "load_compacted" not in out


def test_report_of_a_saved_compacted_model_says_how_to_load_it(compacted, tmp_path, capsys):
    compacted.save_pretrained(tmp_path / "small")
    capsys.readouterr()

    assert main(["report", str(tmp_path / "small")]) == 0

    out = capsys.readouterr().out
    assert [row[:3] + row[4:] for row in table(out)] == [
        ["0", "1/2", "64/64", "0.0%"],
        ["1", "2/2", "48/64", "0.0%"],
    ]
    assert f"hfprune.load_compacted({str(tmp_path / 'small')!r})" in out

    assert main(["report", str(tmp_path / "small"), "--json"]) == 0
    structure = json.loads(capsys.readouterr().out)
    assert structure == json.loads(json.dumps(model_structure(compacted, ADAPTERS)))


def test_report_of_a_model_no_adapter_knows_lists_its_matrices(tmp_path, monkeypatch, capsys):
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight[0] = 0
    model.save_pretrained(tmp_path / "dense")
    monkeypatch.setenv("HFPRUNE_DISABLE_PLUGIN_AUTOLOAD", "1")  # no plugin, so no architecture adapter
    capsys.readouterr()

    assert main(["report", str(tmp_path / "dense")]) == 0

    out = capsys.readouterr().out
    assert "no installed architecture adapter recognizes its layers" in out and "layer  heads" not in out
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.endswith("%") and "weight" in line
    }
    assert rows["classifier.weight"] == ["2x32", "50.0%"] and rows[f"{STACK}.1.output.dense.weight"] == [
        "32x64",
        "0.0%",
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "is not a folder"),
        (lambda d: d.mkdir(), "has no config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "cannot read"),
        (
            lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "bert"}')),
            "names no model class",
        ),
        (
            lambda d: (tiny_bert().save_pretrained(d), (d / "model.safetensors").unlink()),
            "cannot load the model in",
        ),
        (
            lambda d: (tiny_bert().save_pretrained(d), (d / "model.safetensors").write_bytes(b"garbage" * 8)),
            "not a readable safetensors file",
        ),
    ],
)
def test_report_of_a_bad_folder_exits_1_with_one_line(make, message, tmp_path, capsys):
    folder = tmp_path / "bad"
    make(folder)
    capsys.readouterr()  # save_pretrained's progress bar

    assert main(["report", str(folder)]) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err and str(folder) in captured.err


def test_report_help_says_what_it_shows_without_importing_transformers():
    import subprocess
    import sys

    code = (
        "import sys\nfrom hfprune.cli import main\ntry:\n    main(['report', '--help'])\nexcept "
        "SystemExit:\n    pass\n"
        "print('transformers' in sys.modules, 'matplotlib' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "exactly zero" in result.stdout and "--json" in result.stdout
    assert result.stdout.splitlines()[-1] == "False False"


# --- the picture -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metrics", [{"entity F1": (0.40, 0.38), "latency ms (batch 32)": (120.0, 55.0)}, None]
)
def test_plot_pruning_writes_a_png_of_a_model_with_a_deleted_layer(metrics, tmp_path):
    model, plan = gated_and_zeroed()
    structure = model_structure(model, ADAPTERS, layer_keep={STACK: plan[STACK]})

    path = plot_pruning(structure, tmp_path / "pruning.png", metrics)

    assert path == tmp_path / "pruning.png"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 400)
