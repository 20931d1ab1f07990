"""Compaction: pruned heads and neurons leave the model for real, outputs stay equal, loading takes one
call."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import transformers

from hfprune import CompactionError, Pruner, RecipeError, hookimpl
from hfprune.compaction.compact import LAYOUT_KEY, compact_model, probe_batch, verify
from hfprune.compaction.conformance import check_round_trip, pruned, structured_recipe
from hfprune.compaction.loading import load_compacted
from hfprune.plugins import default_registry

from conftest import EVERY_FAMILY, TINY_MODELS, tiny_bert, tiny_llama, tiny_phi3

UNITS = {  # (attention class, FFN class) per tiny model
    "bert": ("BertAttention", "BertLayer"),
    "roberta": ("RobertaAttention", "RobertaLayer"),
    "distilbert": ("DistilBertSelfAttention", "FFN"),
    "gpt2": ("GPT2Attention", "GPT2MLP"),
    "llama": ("LlamaAttention", "LlamaMLP"),
    "phi3": ("Phi3Attention", "Phi3MLP"),
    "gemma3": ("Gemma3Attention", "Gemma3MLP"),
    "vit": ("ViTAttention", "ViTMLP"),
    "bart": ("BartAttention", "BartEncoderLayer, BartDecoderLayer"),
    "albert": ("AlbertAttention", "AlbertLayer"),
    "gemma3-vision": ("Gemma3Attention, SiglipAttention", "Gemma3MLP, SiglipMLP"),
    "t5": ("T5Stack", "T5DenseActDense"),  # heads a stack at a time: they share the first layer's bias
    "flan-t5": ("T5Stack", "T5DenseGatedActDense"),
    "umt5": ("UMT5Stack", "UMT5DenseGatedActDense"),
}


def counts(model, kind: str, adapters=None) -> list[int]:
    from hfprune.architecture import find_units

    return [
        u.count
        for u in find_units(model, kind, default_registry().architectures if adapters is None else adapters)
    ]


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_compaction_removes_half_the_heads_and_neurons_with_equal_outputs(family):
    model = TINY_MODELS[family]()
    pruner = pruned(model, structured_recipe(*UNITS[family]))
    heads, neurons = counts(model, "head"), counts(model, "neuron")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    compacted = pruner.compact(model)

    assert counts(compacted, "head") == [h // 2 for h in heads]
    assert counts(compacted, "neuron") == [n // 2 for n in neurons]
    assert sum(p.numel() for p in compacted.parameters()) < sum(before[n].numel() for n in before)
    assert all(
        torch.equal(p, before[n]) for n, p in model.named_parameters()
    )  # the trained model is untouched
    probe = probe_batch(model)
    model.eval(), compacted.eval()
    with torch.no_grad():
        torch.testing.assert_close(compacted(**probe).logits, model(**probe).logits, atol=1e-4, rtol=0)


# Families whose config states fewer heads (their head size is a config field): plain from_pretrained loads
# them with heads removed. The others record heads under hfprune_layout and load with load_compacted.
HEADS_IN_A_STOCK_CONFIG = {"llama", "phi3", "gemma3", "vit", "t5", "flan-t5", "umt5"}


@pytest.mark.parametrize("family", sorted(EVERY_FAMILY))
def test_every_family_is_pruned_compacted_saved_and_reloaded_computing_as_the_pruned_model(family, tmp_path):
    """The adapter conformance kit on each family: a transformers upgrade that renames a family's modules
    fails here, under the family's name."""
    loaded = check_round_trip(EVERY_FAMILY[family], *UNITS[family], tmp_path)
    stock = not getattr(loaded.config, LAYOUT_KEY, None)
    assert stock == (family in HEADS_IN_A_STOCK_CONFIG or UNITS[family][0] is None)


@pytest.mark.parametrize("family", sorted(EVERY_FAMILY))
def test_every_family_with_half_its_neurons_saves_a_stock_config_that_plain_transformers_loads(
    family, tmp_path
):
    model = EVERY_FAMILY[family]()
    compacted = pruned(model, structured_recipe(None, UNITS[family][1])).compact(model)
    compacted.save_pretrained(tmp_path)
    assert not getattr(compacted.config, LAYOUT_KEY, None)
    _assert_same_outputs(model, getattr(transformers, type(model).__name__).from_pretrained(tmp_path))


def test_phi3_layers_that_keep_different_heads_each_split_their_fused_projection_at_their_own_size(tmp_path):
    """Phi-3 reads where qkv_proj's keys begin from its config, shared by every layer."""
    model = tiny_phi3()
    output = model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        output.weight[:, 16:] = 0  # key/value group 1 of layer 0: query heads 2 and 3
    keep = (output.weight != 0).float()

    compacted = compact_model(
        model, {"model.layers.0.self_attn.o_proj.weight": keep}, default_registry().architectures
    )
    compacted.save_pretrained(tmp_path)

    assert getattr(compacted.config, LAYOUT_KEY) == {
        "head": {"model.layers.0.self_attn": 1, "model.layers.1.self_attn": 2}
    }
    assert compacted.config.num_attention_heads == 4  # the shared config still describes layer 1
    _assert_same_outputs(model, load_compacted(tmp_path))


def test_uniform_neurons_save_a_stock_config_that_plain_transformers_loads(tmp_path):
    model = tiny_bert()
    compacted = pruned(model, structured_recipe(None, "BertLayer")).compact(model)
    compacted.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config.intermediate_size == 32 and not hasattr(loaded.config, LAYOUT_KEY)
    _assert_same_outputs(model, loaded)


def test_llama_heads_are_stock_too_because_its_config_states_the_head_size(tmp_path):
    model = tiny_llama()
    compacted = pruned(model, structured_recipe("LlamaAttention", "LlamaMLP")).compact(model)
    assert (
        compacted.config.num_attention_heads,
        compacted.config.num_key_value_heads,
        compacted.config.head_dim,
    ) == (2, 1, 8)
    compacted.save_pretrained(tmp_path)
    _assert_same_outputs(model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path))


def test_bert_heads_need_the_one_call_loader(tmp_path):
    model = tiny_bert()
    compacted = pruned(model, structured_recipe("BertAttention", "BertLayer")).compact(model)
    compacted.save_pretrained(tmp_path)
    assert getattr(compacted.config, LAYOUT_KEY) == {
        "head": {"bert.encoder.layer.0.attention": 1, "bert.encoder.layer.1.attention": 1}
    }
    with pytest.raises(Exception, match="size mismatch|mismatch"):
        transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path
        )  # the stock path refuses loudly
    _assert_same_outputs(model, load_compacted(tmp_path))


def test_layers_that_differ_record_their_sizes_and_load_in_one_call(tmp_path):
    model = tiny_bert()
    pruner = pruned(model, structured_recipe(None, "BertLayer"))
    masks = pruner.strategies[0].masks  # layer 0 up, layer 0 down, layer 1 up, layer 1 down
    masks.set(
        [torch.ones_like(m) for m in masks.masks], None
    )  # forget the pattern, then prune 8 neurons of layer 0 only
    masks.masks[0][:8] = 0
    masks.masks[1][:, :8] = 0
    masks.apply_to_weights()
    compacted = pruner.compact(model)
    compacted.save_pretrained(tmp_path)
    assert getattr(compacted.config, LAYOUT_KEY) == {
        "neuron": {"bert.encoder.layer.0": 56, "bert.encoder.layer.1": 64}
    }
    _assert_same_outputs(model, load_compacted(tmp_path))


def test_pruned_up_rows_are_removed_by_folding_their_constant_into_the_bias():
    model = tiny_bert()
    text = (
        "version: 1\npruners:\n  - strategy: block-lasso\n    targets: [intermediate.dense]\n    schedule: "
        "{start: 0, end: 1}\n    config: {group: row, ratio: 0.25, lam: 0.01}\n"
    )
    pruner = pruned(model, text)
    for (
        layer
    ) in model.bert.encoder.layer:  # the rows are gone but their biases are not: each outputs gelu(bias)
        assert layer.intermediate.dense.bias.abs().sum() > 0
    compacted = pruner.compact(model)
    assert counts(compacted, "neuron") == [48, 48]
    _assert_same_outputs(model, compacted)


def test_a_compaction_that_would_change_outputs_raises_and_changes_nothing():
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "bert.encoder.layer.0.output.dense.weight"
    lie = {
        name: torch.zeros_like(model.get_parameter(name), dtype=torch.bool)
    }  # claims pruned; the weights are not zero
    with pytest.raises(CompactionError, match="differ from the pruned model's"):
        compact_model(model, lie, default_registry().architectures)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.config.intermediate_size == 64


LARGE = 1e4  # SmolLM2-135M's hidden states reach 1.2e4


def llama_with_outputs_around_1e4() -> tuple[transformers.LlamaForCausalLM, dict[str, torch.Tensor]]:
    """The tiny Llama with its attention, FFN and LM-head outputs scaled up (logits near 5e3), and a
    compaction plan: in each layer key/value group 0's two heads and every other neuron, zeroed in the
    weights."""
    model = tiny_llama()
    plan = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            pruned_columns = {"self_attn.o_proj": slice(0, 16), "mlp.down_proj": slice(0, None, 2)}
            for module_name, columns in pruned_columns.items():
                weight = layer.get_submodule(module_name).weight
                weight.mul_(LARGE)
                weight[:, columns] = 0
                plan[f"model.layers.{i}.{module_name}.weight"] = torch.ones_like(weight, dtype=torch.bool)
                plan[f"model.layers.{i}.{module_name}.weight"][:, columns] = False
        model.lm_head.weight.mul_(LARGE)
    return model, plan


def test_outputs_around_1e4_compact_without_a_false_alarm_from_float32_rounding():
    model, plan = llama_with_outputs_around_1e4()

    compacted = compact_model(model, plan, default_registry().architectures)

    assert counts(compacted, "head") == [1, 1]  # of 2 key/value groups
    assert counts(compacted, "neuron") == [32, 32]
    probe = probe_batch(model)
    with torch.no_grad():
        expected, actual = model.eval()(**probe).logits, compacted.eval()(**probe).logits
    scale, difference = expected.abs().max(), (actual - expected).abs().max()
    assert scale > 1e3
    assert difference > 1e-4  # an absolute tolerance of 1e-4 refused this compaction
    assert difference < 1e-6 * scale  # float32 rounding, nothing more


def test_a_wrong_compaction_at_that_scale_is_still_refused_in_one_line_that_says_where():
    model, plan = llama_with_outputs_around_1e4()
    name = "model.layers.1.mlp.down_proj.weight"
    kept_norms = model.get_parameter(name).norm(dim=0).masked_fill(~plan[name][0], float("inf"))
    plan[name][:, kept_norms.argmin()] = False  # the kept neuron adding least, claimed pruned: it is not zero

    with pytest.raises(CompactionError) as refused:
        compact_model(model, plan, default_registry().architectures)

    message = str(refused.value)
    assert "\n" not in message
    assert re.search(
        r"differ from the pruned model's on a probe batch: (logits|hidden_states\[2\])\[\d+, \d+, \d+\] "
        r"is off by \S+, tolerance \S+ \(0\.0001 \+ 0\.001 x the largest \|value\| in its row\)",
        message,
    ), message


def test_a_compiled_model_is_attached_and_compacted_through_its_wrapper():
    """torch.compile's wrapper names every parameter ``_orig_mod.<name>``: hfprune looks inside it (and runs
    no compiled forward)."""
    model = tiny_bert()
    recipe = structured_recipe(*UNITS["bert"])
    pruner = pruned(model, recipe)
    compiled = torch.compile(model)

    compacted = pruner.compact(compiled)

    assert counts(compacted, "head") == [h // 2 for h in counts(model, "head")]
    reference = pruner.compact(model).state_dict()
    assert compacted.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in compacted.state_dict().items())
    plain, through_compile = (Pruner(recipe).attach(m) for m in (model, compiled))
    assert [list(p.parameters) for p in through_compile] == [list(p.parameters) for p in plain]


def test_compaction_before_the_pattern_is_fixed_says_so():
    model = tiny_bert()
    pruner = Pruner(structured_recipe("BertAttention", None, end=8))
    pruner.attach(model)
    pruner.start(10)
    with pytest.raises(CompactionError, match="no fixed structured pattern"):
        pruner.compact(model)


def test_third_party_adapters_arrive_through_the_plugin_hook():
    from hfprune.architecture import ArchitectureAdapter
    from hfprune.hookspecs import hookimpl
    from hfprune.plugins import build_registry

    class Toy(ArchitectureAdapter):
        name = "toy"

    class Plugin:
        @hookimpl
        def hfprune_register_architectures(self, register):
            register(Toy())

    registry = build_registry({"toy-plugin": Plugin()})
    assert "toy" in [a.name for a in registry.architectures]
    clash = build_registry({"toy-plugin": Plugin(), "toy-again": Plugin()})
    assert any("registered by both" in message for message in clash.conflicts.values())


def test_a_pruner_finds_and_compacts_heads_with_its_own_registrys_adapters(monkeypatch):
    """Block-lasso's head grouping and compaction both ask the pruner's registry, never the process-wide
    one."""
    from hfprune.plugins import DISABLE_AUTOLOAD_ENV, PLUGINS_ENV, build_registry
    from hfprune_architectures import BertFamily

    class CountingBert(BertFamily):
        name = "counting-bert"
        asked = resized = 0

        def attention(self, module):
            CountingBert.asked += 1
            return super().attention(module)

        def resize(self, unit, kept_groups):
            CountingBert.resized += 1
            super().resize(unit, kept_groups)

    class Plugin:
        @hookimpl
        def hfprune_register_architectures(self, register):
            register(CountingBert())

    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.setenv(PLUGINS_ENV, "block-lasso")  # the strategy, and no built-in adapter
    registry = build_registry({"counting": Plugin()})
    assert [a.name for a in registry.architectures] == ["counting-bert"]
    model = tiny_bert()
    pruner = pruned(model, structured_recipe("BertAttention", None), registry=registry)
    assert (
        CountingBert.asked > 0 and pruner.strategies[0].sets
    )  # the heads block-lasso penalizes were found by it

    compacted = pruner.compact(model)

    assert CountingBert.resized == 2  # one attention block per layer, shrunk by it
    assert counts(compacted, "head", registry.architectures) == [1, 1]
    _assert_same_outputs(model, compacted)
    without = (
        build_registry()
    )  # the same strategy with no adapter that knows BERT: refused, not taken from elsewhere
    with pytest.raises(RecipeError, match="attention"):
        Pruner(structured_recipe("BertAttention", None), without).attach(tiny_bert())


def _assert_same_outputs(reference, other):
    probe = probe_batch(reference)
    reference.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(**probe).logits, reference(**probe).logits, atol=1e-4, rtol=0)


def test_compact_command_turns_a_trainer_checkpoint_into_a_loadable_smaller_model(tmp_path, capsys):
    from hfprune.callback import PruneCallback
    from hfprune.cli import main

    from conftest import make_trainer

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(structured_recipe("BertAttention", "BertLayer", end=0.5))
    model = tiny_bert()
    make_trainer(
        tmp_path / "run", model, [PruneCallback(str(recipe_file))], save_strategy="steps", save_steps=12
    ).train()
    checkpoint = tmp_path / "run" / "checkpoint-12"

    assert (
        main(["compact", str(checkpoint), "--recipe", str(recipe_file), "--output", str(tmp_path / "small")])
        == 0
    )
    assert "parameters" in capsys.readouterr().out
    loaded = load_compacted(tmp_path / "small")
    assert counts(loaded, "head") == [1, 1] and counts(loaded, "neuron") == [32, 32]
    _assert_same_outputs(model, loaded)

    assert (
        main(["compact", str(checkpoint), "--recipe", str(recipe_file), "--output", str(tmp_path / "small")])
        == 1
    )
    assert "exists and is not empty" in capsys.readouterr().err


def test_save_compacted_replaces_a_folder_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    from hfprune.compaction.compact import save_compacted

    output = tmp_path / "model"
    save_compacted(tiny_bert(seed=0), output)
    first = (output / "model.safetensors").read_bytes()
    with pytest.raises(CompactionError, match="exists and is not empty"):
        save_compacted(tiny_bert(seed=1), output)

    failing = tiny_bert(seed=1)

    def disk_full(folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(failing, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_compacted(failing, output, replace=True)
    assert (output / "model.safetensors").read_bytes() == first  # the last good model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind

    save_compacted(tiny_bert(seed=1), output, replace=True)
    assert (output / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_adapter_kit_fails_an_adapter_whose_config_cannot_rebuild_the_model(monkeypatch, tmp_path):
    """A ViT adapter that states fewer heads but not their size: the saved config builds heads of the wrong
    width, and the kit's reload says so."""
    from hfprune.compaction.conformance import AdapterConformance
    from hfprune.plugins import DISABLE_AUTOLOAD_ENV, PLUGINS_ENV, build_registry
    from hfprune_architectures import ViT

    from conftest import tiny_vit

    class HeadsWithoutTheirSize(ViT):
        def config_updates(self, config, kind, unit, kept_groups):
            return {"num_attention_heads": kept_groups} if kind == "head" else None

    class Plugin:
        @hookimpl
        def hfprune_register_architectures(self, register):
            register(HeadsWithoutTheirSize())

    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.setenv(PLUGINS_ENV, "block-lasso")

    class TestBrokenViT(AdapterConformance):
        model_factory = staticmethod(tiny_vit)
        attention = "ViTAttention"
        registry = build_registry({"broken": Plugin()})

    with pytest.raises(Exception, match="size mismatch|mismatch"):
        TestBrokenViT().test_pruned_compacted_saved_and_reloaded_it_computes_as_the_pruned_model(tmp_path)


def test_a_compacted_model_with_other_outputs_than_the_pruned_one_is_refused_naming_them():
    """Hidden states picked that do not fit the compacted model are a clear error, not a broadcast error."""
    model = tiny_bert()
    with pytest.raises(
        CompactionError,
        match=r"not shaped as the pruned model.s: 4 outputs against 2 \(logits, hidden_states\[0\], ",
    ):
        verify(model, copy.deepcopy(model), hidden_states=[0])


def test_load_compacted_reads_a_sharded_checkpoint_in_the_dtype_asked_for(tmp_path):
    """The per-block shapes are built, then transformers' own loader reads the files."""
    model = tiny_bert()
    small = pruned(model, structured_recipe(*UNITS["bert"])).compact(model)
    small.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    loaded = load_compacted(tmp_path, dtype=torch.bfloat16)

    assert type(loaded) is transformers.BertForSequenceClassification
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.bert.encoder.layer[0].attention.self.query.out_features == 16
    weights = dict(small.named_parameters())
    assert all(torch.equal(p, weights[name].to(torch.bfloat16)) for name, p in loaded.named_parameters())
