"""Families whose inputs are not a BERT's: BART and T5 under Seq2SeqTrainer (self- and cross-attention heads,
generation), ViT under Trainer (images), and Gemma 3 with its vision tower."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer

from hfprune import CompactionError, Pruner, RecipeError
from hfprune.callback import PruneCallback
from hfprune.compaction.compact import compact_model, verify
from hfprune.compaction.conformance import labelled_batch, pruned, structured_recipe
from hfprune.compaction.loading import load_compacted
from hfprune.plugins import default_registry

from conftest import tiny_bart, tiny_gemma3_vision, tiny_t5, tiny_vit, training_args

RECIPE = """
version: 1
pruners:
  - strategy: block-lasso
    targets: [{attention}]
    schedule: {{start: 0, end: 0.5}}
    config: {{group: head, ratio: 0.5, lam: 0.01}}
  - strategy: block-lasso
    targets: [{ffn}]
    schedule: {{start: 0, end: 0.5}}
    config: {{group: neuron, ratio: 0.5, lam: 0.01}}
"""


class Examples(torch.utils.data.Dataset):
    """The rows of one labelled batch (:func:`conftest.labelled_batch`), repeated."""

    def __init__(self, model, size: int = 16):
        self.batch = labelled_batch(model, size)

    def __len__(self):
        return len(next(iter(self.batch.values())))

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.batch.items()}


def recipe_file(tmp_path, **targets) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(**targets))
    return str(path)


def pruned_under_seq2seq_trainer(model, tmp_path, attention: str, ffn: str, load):
    """``model`` trained under Seq2SeqTrainer with RECIPE, compacted, saved and loaded again with ``load``
    (a function of the folder); checks the loaded model predicts and generates what the pruned one did."""
    callback = PruneCallback(recipe_file(tmp_path, attention=attention, ffn=ffn))
    arguments = Seq2SeqTrainingArguments(
        **training_args(tmp_path / "run").to_dict()
        | {"predict_with_generate": True, "generation_max_length": 8}
    )
    data = Examples(model)
    trainer = Seq2SeqTrainer(model=model, args=arguments, train_dataset=data, callbacks=[callback])
    trainer.train()

    small = callback.compact(trainer.model)
    small.save_pretrained(tmp_path / "small")
    loaded = load(tmp_path / "small")

    prompts = {key: data.batch[key][:4] for key in ("input_ids", "attention_mask")}
    expected = trainer.predict(Examples(model, 4)).predictions
    trainer.model = loaded
    torch.testing.assert_close(trainer.predict(Examples(model, 4)).predictions, expected)
    settings = {"max_new_tokens": 6, "do_sample": False}
    torch.testing.assert_close(
        loaded.generate(**prompts, **settings), model.eval().generate(**prompts, **settings)
    )
    return loaded


def test_bart_under_seq2seq_trainer_loses_half_its_heads_and_neurons_and_generates_the_same(tmp_path):
    loaded = pruned_under_seq2seq_trainer(
        tiny_bart(), tmp_path, "BartAttention", "BartEncoderLayer, BartDecoderLayer", load_compacted
    )

    cross = [m for name, m in loaded.named_modules() if name.endswith("encoder_attn")]
    assert cross and all(m.q_proj.out_features == 16 for m in cross)  # 2 of 4 heads of width 8
    assert (
        loaded.config.encoder_ffn_dim == loaded.config.decoder_ffn_dim == 32
        and loaded.model.encoder.layers[0].fc1.out_features == 32
    )


def test_t5_under_seq2seq_trainer_loses_half_its_heads_a_stack_at_a_time_into_a_stock_checkpoint(tmp_path):
    loaded = pruned_under_seq2seq_trainer(
        tiny_t5(),
        tmp_path,
        "T5Stack",
        "T5DenseActDense",
        transformers.T5ForConditionalGeneration.from_pretrained,
    )

    assert (loaded.config.num_heads, loaded.config.d_ff) == (2, 32)
    assert loaded.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape[1] == 2
    cross = [block.layer[1].EncDecAttention for block in loaded.decoder.block]
    assert all(m.q.out_features == m.o.in_features == 16 for m in cross)  # 2 of 4 heads of width 8


def test_vit_under_trainer_loses_half_its_heads_and_neurons_into_a_stock_checkpoint(tmp_path):
    model = tiny_vit()
    callback = PruneCallback(recipe_file(tmp_path, attention="ViTAttention", ffn="ViTMLP"))
    trainer = Trainer(
        model=model, args=training_args(tmp_path / "run"), train_dataset=Examples(model), callbacks=[callback]
    )
    trainer.train()

    small = callback.compact(trainer.model)
    small.save_pretrained(tmp_path / "small")
    loaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / "small")  # plain transformers

    assert (loaded.config.num_attention_heads, loaded.config.head_dim, loaded.config.intermediate_size) == (
        2,
        8,
        32,
    )
    images = labelled_batch(model, 4)["pixel_values"]
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=images).logits, model(pixel_values=images).logits, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize(
    "entry, reason",
    [
        (
            r"{strategy: block-lasso, targets: ['re:.*block\.\d+'], config: {group: head, ratio: 0.5}}",
            "so a head is pruned in every layer of its stack at once: target the stacks",
        ),
        (
            "{strategy: layer-lasso, targets: [encoder], config: {keep: 1}}",
            "T5's first layer holds the position bias every layer uses",
        ),
        (
            "{strategy: layer-lasso, targets: [decoder.block], config: {keep: 1}}",  # the layer list itself
            "T5's first layer holds the position bias every layer uses",
        ),
    ],
)
def test_t5_heads_of_single_layers_and_its_layers_are_refused_before_training_with_why(entry, reason):
    with pytest.raises(RecipeError, match="T5's first layer") as info:
        Pruner(f"version: 1\npruners:\n  - {entry}\n").attach(tiny_t5())
    assert reason in str(info.value)


def test_bart_layers_are_refused_before_training_and_by_compaction_since_its_stacks_have_their_own_sizes():
    """num_hidden_layers is BART's encoder_layers: deleting decoder layers under it would save a config whose
    encoder is cut short."""
    from hfprune.architecture import delete_residual_layers

    entry = "{strategy: layer-lasso, targets: [model.decoder.layers], config: {keep: 1}}"
    with pytest.raises(RecipeError, match="encoder and decoder are two stacks"):
        Pruner(f"version: 1\npruners:\n  - {entry}\n").attach(tiny_bart())
    with pytest.raises(CompactionError, match="an encoder-decoder sizes its encoder and decoder stacks"):
        delete_residual_layers(tiny_bart(), {"model.decoder.layers": torch.tensor([True, False])})


def test_t5_one_shot_mask_search_keeps_whole_heads_per_stack_and_says_tuning_skips_them(caplog):
    import hfprune
    from hfprune.calibration.conformance import calibration_batches

    model = tiny_t5()
    batches = calibration_batches()
    for batch in batches:
        batch["labels"] = batch["input_ids"][:, :8].clone()
    entry = "{strategy: mask-search, targets: [encoder, decoder], config: {keep: 0.6}}"
    recipe = f"version: 1\npruners:\n  - {entry}\n"

    pruner = hfprune.oneshot(model, batches, recipe, progress=False)
    small = pruner.compact(model)  # outputs checked against the masked model

    attentions = [m for m in small.modules() if hasattr(m, "relative_attention_num_buckets")]
    for stack in (
        small.encoder,
        small.decoder,
    ):  # self-attention: one head count per stack, bias table included
        table = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert {b.layer[0].SelfAttention.n_heads for b in stack.block} == {table.shape[1]}
    assert sum(m.n_heads for m in attentions) < 4 * len(attentions)
    assert "tuning leaves them as the search chose them: encoder, " in caplog.text


def test_a_multimodal_gemma3_drops_language_layers_into_a_stock_checkpoint_and_refuses_vision_layers(
    tmp_path,
):
    """The language model's layers are sized by the text_config the model's config nests; the vision tower's
    hidden states are not the model's, so its layers stay."""
    model = tiny_gemma3_vision().eval()
    last = model.model.language_model.layers[1]
    with torch.no_grad():  # the last layer adds nothing: deleting it changes no output
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()
    adapters = default_registry().architectures

    small = compact_model(model, {"model.language_model.layers": torch.tensor([True, False])}, adapters)
    small.save_pretrained(tmp_path)
    loaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path)

    assert (loaded.config.text_config.num_hidden_layers, loaded.config.text_config.layer_types) == (
        1,
        ["sliding_attention"],
    )
    verify(model, loaded, hidden_states=[0, 2])  # layer 1 went: its output was its input
    with pytest.raises(CompactionError, match="only the language model's layers are deleted"):
        compact_model(model, {"model.vision_tower.encoder.layers": torch.tensor([True, False])}, adapters)


def test_the_report_of_a_multimodal_gemma3_reads_each_parts_sizes_from_its_own_config():
    from hfprune.compaction.structure import model_structure

    model = tiny_gemma3_vision()
    recipe = structured_recipe("Gemma3Attention, SiglipAttention", None)
    small = pruned(model, recipe).compact(model)

    stacks = model_structure(small, default_registry().architectures)["stacks"]
    heads = {stack["name"]: [layer["heads"] for layer in stack["layers"]] for stack in stacks}
    # The language model's config states its kept heads; the vision tower's cannot (per-block layout).
    assert heads["model.language_model.layers"] == [{"live": 2, "of": 2}] * 2
    assert heads["model.vision_tower.encoder.layers"] == [{"live": 2, "of": 4}] * 2


def test_compaction_checks_a_multimodal_models_vision_tower_on_images():
    """Token ids alone never reach the vision tower: a wrong vision weight is caught on images."""
    model = tiny_gemma3_vision()
    small = pruned(model, structured_recipe("SiglipAttention", "SiglipMLP")).compact(model)
    verify(model, small)
    with torch.no_grad():
        small.model.vision_tower.encoder.layers[0].mlp.fc2.weight.mul_(1.5)
    with pytest.raises(CompactionError, match="get_image_features"):
        verify(model, small)
