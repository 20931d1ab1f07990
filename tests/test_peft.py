"""hfprune with peft: recipes name LoRA-wrapped layers as the user knows them, the adapter's update
stays masked where the base is pruned, and merging keeps every pruned weight zero.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import test_conformance as builtin
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from hfprune import HfpruneError, PruneCallback, Pruner, RecipeError, StateError
from hfprune.compaction.compact import save_compacted
from hfprune.compaction.loading import load_compacted
from hfprune.integrations.lora import SparseLora, keep_sparse, lora_layers, merge_lora
from hfprune.integrations.peft_names import model_view
from hfprune.recipe.targets import match_targets
from hfprune.testing import TokenDataset, tiny_bert

from conftest import tiny_gpt2

LORA_MODULES = ["query", "value", "dense"]  # every "dense": attention output, intermediate, output, pooler


def lora_bert(seed: int = 0, **lora) -> PeftModel:
    """tiny_bert with LoRA adapters (rank 4) on query, value and every dense layer; the classifier trains
    too."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": LORA_MODULES, "task_type": "SEQ_CLS", **lora}
    return get_peft_model(tiny_bert(seed), LoraConfig(**settings))


def recipe(
    strategy: str,
    config: str,
    targets: str = "['re:.*encoder\\.layer\\.\\d+\\.(attention\\.self\\.(query|value)|output\\.dense)']",
) -> str:
    return f"""
version: 1
pruners:
  - strategy: {strategy}
    targets: {targets}
    schedule: {{start: 0, end: 4, every: 2}}
    config: {config}
"""


UNSTRUCTURED = recipe("magnitude", "{sparsity: 0.5}")
STRUCTURED = (
    recipe("block-lasso", "{group: head, ratio: 0.5, lam: 0.01, reweight_every: 2}", "[BertLayer]")
    + """
  - strategy: block-lasso
    targets: [BertLayer]
    schedule: {start: 0, end: 4}
    config: {group: neuron, ratio: 0.5, lam: 0.01, reweight_every: 2}
"""
)


def train(model: nn.Module, recipe_text: str, tmp_path, steps: int = 8) -> PruneCallback:
    callback = PruneCallback(recipe_text)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    return callback


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The matrix a LoRA-wrapped linear layer applies, read off its outputs for the unit vectors."""
    with torch.no_grad():
        base = layer.get_base_layer()
        eye = torch.eye(base.in_features)
        return (layer(eye) - (base.bias if base.bias is not None else 0)).T


def pruned_positions(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each LoRA layer's base weight is exactly zero, by the user's layer name."""
    return {name: layer.get_base_layer().weight == 0 for name, layer in lora_layers(model).items()}


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "attention.self.query",  # a suffix, as in a plain model
        "bert.encoder.layer.0.attention.self.query",  # the model's own full name
        "base_model.model.bert.encoder.layer.0.attention.self.query",  # as peft names it
        "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer",
        r"re:base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.query",
    ],
)
def test_targets_name_wrapped_layers_as_the_user_knows_them(target):
    model = lora_bert()
    match = match_targets(model, [target], [])
    assert not match.unmatched
    assert "bert.encoder.layer.0.attention.self.query" in match.modules
    layer = match.modules["bert.encoder.layer.0.attention.self.query"]
    assert type(layer) is nn.Linear  # the wrapped layer, not peft's wrapper
    assert layer is model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer


def test_class_targets_never_reach_the_adapters():
    names = list(match_targets(lora_bert(), ["Linear"], []).modules)
    assert names and not any("lora" in n or "base_layer" in n for n in names)
    assert names == list(match_targets(tiny_bert(), ["Linear"], []).modules)


@pytest.mark.parametrize("recipe_text", [UNSTRUCTURED, STRUCTURED], ids=["magnitude", "block-lasso"])
def test_recipe_selects_the_same_names_in_a_peft_model(recipe_text):
    """Parameter names (state files, compaction plans) are those of the plain model; the parameters are the
    base weights."""
    plain, wrapped = Pruner(recipe_text), Pruner(recipe_text)
    model = lora_bert()
    plain_names = [list(p.parameters) for p in plain.attach(tiny_bert())]
    plans = wrapped.attach(model)
    assert [list(p.parameters) for p in plans] == plain_names
    peft_parameters = dict(model.named_parameters())
    view = model_view(model)
    for plan in plans:
        for name, param in plan.parameters.items():
            assert peft_parameters[view.peft_name(name)] is param
            assert "lora_" not in view.peft_name(name)


# --- training: the effective weight stays masked ---------------------------------------------------------


@pytest.mark.parametrize(
    "recipe_text",
    [
        UNSTRUCTURED,
        recipe("rpp", "{sparsity: 0.5, lam: 0.5, reweight_every: 2}"),
        recipe("block-lasso", "{group: tile, block: [4, 4], ratio: 0.5, lam: 0.05}"),
        STRUCTURED,
    ],
    ids=["magnitude", "rpp", "block-lasso-tiles", "block-lasso-heads-neurons"],
)
def test_effective_weight_of_a_pruned_layer_stays_pruned(recipe_text, tmp_path):
    model = lora_bert()
    callback = train(model, recipe_text, tmp_path)
    assert callback.pruner.sparsity()["sparsity"] >= 0.25
    pruned = {name: kept for name, kept in pruned_positions(model).items() if kept.any()}
    assert pruned, "the recipe pruned no LoRA layer's base weight"
    for name, zero in pruned.items():
        layer = lora_layers(model)[name]
        assert layer.lora_B["default"].weight.abs().sum() > 0, f"{name}: the adapter did not train"
        assert torch.equal(effective_weight(layer)[zero], torch.zeros(int(zero.sum()))), name
        # Without hfprune's variant, the same adapter fills the pruned weights: the check above can fail.
        layer.lora_variant.clear()
        assert effective_weight(layer)[zero].abs().sum() > 0, name
        keep_sparse(model, [name])


def test_proximal_strategies_step_frozen_base_weights_at_their_adapter_learning_rate(tmp_path):
    """The base weights are frozen (not in the optimizer): RPP still shrinks them, at the adapter's rate."""
    model = lora_bert()
    base = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert not base.requires_grad
    before = base.detach().abs().sum()
    train(model, recipe("rpp", "{sparsity: 0.5, lam: 0.5, reweight_every: 2}"), tmp_path)
    assert base.detach().abs().sum() < 0.75 * before


@pytest.mark.parametrize(
    "strategy, config, targets",
    [
        ("rpp", "{sparsity: 0.5, lam: 0.5}", "[intermediate.dense, output.dense]"),
        ("block-lasso", "{group: neuron, ratio: 0.5, lam: 0.1}", "[BertLayer]"),
    ],
)
def test_proximal_strategies_refuse_frozen_weights_without_an_adapter_before_training(
    strategy, config, targets, tmp_path
):
    """LoRA on query and value only: the FFN's frozen weights have no adapter whose learning rate to use."""
    model = lora_bert(target_modules=["query", "value"])
    ffn = recipe(strategy, config, targets)
    with pytest.raises(
        RecipeError,
        match=rf"(?s)pruners\[0\]\.targets: bert\.encoder\.layer\.0\.\S+dense\.weight is in no param group.*"
        rf"'{strategy}'.*wrap their layers with LoRA",
    ):
        train(model, ffn, tmp_path)


def test_penalty_form_refuses_frozen_base_weights():
    with pytest.raises(RecipeError, match="form: proximal"):
        Pruner(recipe("block-lasso", "{group: row, ratio: 0.5, lam: 0.1, form: penalty}")).attach(lora_bert())


@pytest.mark.parametrize(
    "lora, message", [({"use_dora": True}, "DoraLinearVariant"), ({"lora_bias": True}, "lora_bias")]
)
def test_adapters_whose_update_cannot_be_masked_are_refused(lora, message):
    with pytest.raises(RecipeError, match=message):
        Pruner(UNSTRUCTURED).attach(lora_bert(**lora))


def test_layers_the_recipe_leaves_alone_keep_plain_lora():
    model = lora_bert()
    Pruner(recipe("magnitude", "{sparsity: 0.5}", "[attention.self.query]")).attach(model)
    variants = {name: bool(layer.lora_variant) for name, layer in lora_layers(model).items()}
    assert (
        variants["bert.encoder.layer.0.attention.self.query"]
        and not variants["bert.encoder.layer.0.attention.self.value"]
    )


# --- the variant's arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "rows", "columns", "rows-and-columns", "none"])
@pytest.mark.parametrize("family", ["linear", "conv1d"])
def test_masked_update_equals_the_masked_matrix(pattern, family):
    """Every path of SparseLora's forward (factored masks, a dense mask, nothing pruned) computes (W + keep *
    s B A) x."""
    torch.manual_seed(0)
    if family == "linear":
        model = get_peft_model(
            tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query"], lora_dropout=0.0)
        )
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    else:
        model = get_peft_model(
            tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True)
        )
        layer = model.base_model.model.transformer.h[0].mlp.c_fc
    nn.init.normal_(layer.lora_B["default"].weight)
    out_in = layer.get_base_layer().weight.T if layer.fan_in_fan_out else layer.get_base_layer().weight
    keep = {
        "unstructured": torch.rand(out_in.shape) > 0.5,
        "rows": (torch.arange(out_in.shape[0]) % 2 == 0)[:, None].expand(out_in.shape),
        "columns": (torch.arange(out_in.shape[1]) % 3 != 0)[None, :].expand(out_in.shape),
        "rows-and-columns": (torch.arange(out_in.shape[0]) % 2 == 0)[:, None]
        & (torch.arange(out_in.shape[1]) % 3 != 0)[None, :],
        "none": torch.ones(out_in.shape, dtype=torch.bool),
    }[pattern]
    with torch.no_grad():
        out_in.mul_(keep)
    keep_sparse(model)
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    expected_matrix = out_in + keep * delta
    x = torch.randn(5, out_in.shape[1])
    torch.testing.assert_close(
        layer(x), F.linear(x, expected_matrix, layer.get_base_layer().bias), rtol=1e-5, atol=1e-5
    )
    assert isinstance(layer.lora_variant["default"], SparseLora)
    merged = merge_lora(model)
    merged_layer = (
        merged.bert.encoder.layer[0].attention.self.query
        if family == "linear"
        else merged.transformer.h[0].mlp.c_fc
    )
    merged_out_in = merged_layer.weight.T if family == "conv1d" else merged_layer.weight
    assert torch.equal(merged_out_in[~keep], torch.zeros(int((~keep).sum())))
    torch.testing.assert_close(merged_out_in, expected_matrix, rtol=1e-5, atol=1e-6)


# --- merging -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe_text", [UNSTRUCTURED, STRUCTURED], ids=["unstructured", "structured"])
def test_merge_keeps_every_pruned_weight_zero_and_the_outputs(recipe_text, tmp_path):
    model = lora_bert()
    callback = train(model, recipe_text, tmp_path)
    pruned = pruned_positions(model)
    stock = copy.deepcopy(model)
    model.eval()
    inputs = torch.randint(0, 100, (4, 16))
    with torch.no_grad():
        before = model(input_ids=inputs).logits
    merged = merge_lora(model)
    assert type(merged) is BertForSequenceClassification and not lora_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=inputs).logits, before, rtol=1e-5, atol=1e-5)
    merged_weights = dict(merged.named_modules())
    for name, zero in pruned.items():
        weight = merged_weights[name].weight
        assert torch.equal(weight == 0, zero), (
            f"{name}: {int((weight[zero] != 0).sum())} pruned weights filled, shape {tuple(weight.shape)}"
        )
    # peft's own merge, without hfprune's variant, writes dense updates over the zeros.
    for layer in lora_layers(stock).values():
        layer.lora_variant.clear()
    stock_merged = dict(stock.merge_and_unload().named_modules())
    assert any((stock_merged[name].weight[zero] != 0).any() for name, zero in pruned.items() if zero.any())
    if recipe_text is STRUCTURED:
        # Structured: the merged model compacts like any pruned model, with the pruner's plan.
        compacted = callback.pruner.compact(merged)
        assert compacted.config.intermediate_size == 32
        with torch.no_grad():
            torch.testing.assert_close(
                compacted.eval()(input_ids=inputs).logits, before, rtol=1e-4, atol=1e-4
            )


def test_merge_after_reloading_the_adapter(tmp_path):
    """The pattern is read off the base weights, so an adapter loaded in a new process merges sparse too."""
    model = lora_bert()
    train(model, UNSTRUCTURED, tmp_path / "run")
    model.eval()
    inputs = torch.randint(0, 100, (4, 16))
    with torch.no_grad():
        before = model(input_ids=inputs).logits
    pruned = pruned_positions(model)
    model.save_pretrained(tmp_path / "adapter")
    copy.deepcopy(model).unload().save_pretrained(tmp_path / "base")  # the pruned base, without the adapters
    reloaded = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    merged = merge_lora(reloaded).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=inputs).logits, before, rtol=1e-5, atol=1e-5)
    modules = dict(merged.named_modules())
    assert all(torch.equal(modules[name].weight == 0, zero) for name, zero in pruned.items())


def test_compacting_a_peft_model_merges_a_copy(tmp_path):
    model = lora_bert()
    callback = train(model, STRUCTURED, tmp_path)
    compacted = callback.pruner.compact(model)
    assert not lora_layers(compacted) and lora_layers(model), "the PeftModel itself must be left as it was"
    assert compacted.config.intermediate_size == 32


def test_prune_compact_then_lora(tmp_path):
    """The reverse order: LoRA on the smaller model trains, merges into the compacted shapes, and saves as
    one."""
    plain = tiny_bert()
    callback = train(plain, STRUCTURED, tmp_path / "prune")
    compacted = callback.pruner.compact(plain)
    shapes = {name: p.shape for name, p in compacted.named_parameters()}
    model = get_peft_model(
        compacted, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_MODULES, task_type="SEQ_CLS")
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "lora"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=TokenDataset()).train()
    model.eval()
    inputs = torch.randint(0, 100, (4, 16))
    with torch.no_grad():
        before = model(input_ids=inputs).logits
    merged = merge_lora(model)
    assert {name: p.shape for name, p in merged.named_parameters()} == shapes
    save_compacted(merged, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(
            load_compacted(tmp_path / "merged").eval()(input_ids=inputs).logits, before, rtol=1e-5, atol=1e-5
        )


# --- the strategy contract holds under LoRA
# ------------------------------------------------------------------


# The built-ins' own conformance cases, on a LoRA-wrapped model: masks, state and exact resume (the Trainer's
# checkpoint of a PeftModel holds the adapters only; the pruned frozen weights travel in the pruning state).
# The block-lasso neuron case there uses form: penalty, which frozen base weights refuse (tested above).


class TestMagnitudeUnderLoRA(builtin.TestMagnitude):
    model_factory = staticmethod(lora_bert)


class TestRPPUnderLoRA(builtin.TestRPP):
    model_factory = staticmethod(lora_bert)


class TestBlockLassoHeadsUnderLoRA(builtin.TestBlockLassoHeads):
    model_factory = staticmethod(lora_bert)


class TestLayerLassoUnderLoRA(builtin.TestLayerLasso):
    model_factory = staticmethod(lora_bert)


# --- hfprune check
# ------------------------------------------------------------------------------------------------


def test_check_shows_how_targets_resolve_in_a_peft_model(tmp_path, minilm_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        recipe(
            "magnitude",
            "{sparsity: 0.5}",
            "['base_model.model.bert.encoder.layer.0.attention.self.query', "
            "bert.encoder.layer.0.attention.self.key]",
        )
    )
    adapter = tmp_path / "adapter"
    from transformers import AutoModelForSequenceClassification

    get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(minilm_path), LoraConfig(target_modules=["query"])
    ).save_pretrained(adapter)
    for option in (["--lora", "query,value"], ["--adapter", str(adapter)]):
        done = subprocess.run(
            [sys.executable, "-m", "hfprune.cli", "check", str(recipe_file), *option],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        lines = done.stdout.splitlines()
        query = lines.index(
            next(line for line in lines if "bert.encoder.layer.0.attention.self.query.weight" in line)
        )
        assert (
            lines[query + 1]
            .strip()
            .startswith("= base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight")
        )
        assert (
            "bert.encoder.layer.0.attention.self.key.weight" in lines[query + 2]
        )  # not wrapped: no second line
        assert "prefixed 'base_model.model.'" in done.stdout


def test_state_of_a_peft_run_does_not_resume_a_plain_model(tmp_path):
    """The pruning state of a LoRA run carries the frozen weights it pruned; a model without those adapters is
    refused."""
    model = lora_bert()
    callback = train(model, UNSTRUCTURED, tmp_path / "run")
    callback.pruner.save(tmp_path / "state")
    plain = Pruner(UNSTRUCTURED)
    plain.attach(tiny_bert())
    plain.start(8)
    with pytest.raises(StateError, match="frozen pruned weights"):
        plain.load(tmp_path / "state")


def test_merge_leaves_unmaskable_layers_alone_unless_they_hold_zeros():
    """A LoRA embedding cannot be masked: merged plainly while its base has no zeros (its padding row aside),
    refused once it has."""
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "word_embeddings"]))
    assert "bert.embeddings.word_embeddings" not in keep_sparse(copy.deepcopy(model))
    assert type(merge_lora(copy.deepcopy(model))) is BertForSequenceClassification
    with torch.no_grad():
        model.base_model.model.bert.embeddings.word_embeddings.base_layer.weight[5, 0] = 0.0  # row 0 pads
    with pytest.raises(HfpruneError, match="word_embeddings is wrapped by peft.tuners.lora.layer.Embedding"):
        merge_lora(model)


def test_compact_command_on_a_lora_checkpoint(tmp_path):
    """A Trainer checkpoint of a PeftModel holds the adapter and the pruning state: `hfprune compact` merges
    and compacts it."""
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    model = get_peft_model(
        BertForSequenceClassification.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=LORA_MODULES, task_type="SEQ_CLS"),
    )
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(STRUCTURED)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        save_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    Trainer(
        model=model, args=args, train_dataset=TokenDataset(), callbacks=[PruneCallback(str(recipe_file))]
    ).train()
    checkpoint = tmp_path / "run" / "checkpoint-8"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hfprune.cli",
            "compact",
            str(checkpoint),
            "--recipe",
            str(recipe_file),
            "--output",
            str(tmp_path / "small"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    small = load_compacted(tmp_path / "small").eval()
    assert small.config.intermediate_size == 32
    inputs = torch.randint(0, 100, (4, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            small(input_ids=inputs).logits, model.eval()(input_ids=inputs).logits, rtol=1e-4, atol=1e-4
        )
