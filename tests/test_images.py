"""Image classification in the main job and the one-shot path: a folder of images (one subfolder per class),
read by ``datasets``' imagefolder, a vision model with its image processor, compacted like any other."""

from __future__ import annotations

import json

import pytest
import torch

from hfprune.calibration.passes import Calibration
from hfprune.cli import main
from hfprune.cli.columns import Columns
from hfprune.compaction.conformance import labelled_batch

from conftest import tiny_vit

VIT_RECIPE = """\
version: 1
pruners:
  - strategy: block-lasso
    targets: [ViTAttention]
    config: {group: head, ratio: 0.5, lam: 1.0}
  - strategy: block-lasso
    targets: [ViTMLP]
    config: {group: neuron, ratio: 0.5, lam: 1.0}
"""
MASK_SEARCH = """\
version: 1
pruners:
  - strategy: mask-search
    targets: ['re:vit\\.layers\\.\\d+']
    config: {keep: 0.6}
"""


@pytest.fixture
def image_folder(tmp_path):
    """12 reddish and 12 bluish 16x16 images, in red/ and blue/: classes a model tells apart by colour."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(12):
            pixels = torch.randint(0, 96, (16, 16, 3), generator=generator, dtype=torch.uint8)
            pixels[..., channel] += 150
            Image.fromarray(pixels.numpy()).save(tmp_path / "images" / label / f"{index}.png")
    return tmp_path / "images"


def vit_folder(path, fine_tuned: bool):
    """A random 2-layer ViT for 16x16 images with its image processor; ``fine_tuned``: a red/blue head, else
    a head of 5 other classes (as an ImageNet checkpoint has its own)."""
    from transformers import ViTImageProcessor

    model = tiny_vit(labels=2 if fine_tuned else 5)
    if fine_tuned:
        model.config.id2label, model.config.label2id = {0: "blue", 1: "red"}, {"blue": 0, "red": 1}
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def test_run_on_an_image_folder_fine_tunes_prunes_and_saves_a_stock_vit_with_its_processor(
    tmp_path, image_folder
):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model_dir = vit_folder(tmp_path / "vit", fine_tuned=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(VIT_RECIPE)
    output = tmp_path / "out"
    argv = ["run", str(recipe), "--model", str(model_dir), "--data", str(image_folder), "--no-baseline"]
    assert main([*argv, "--output-dir", str(output), "--max-steps", "4", "--batch-size", "4"]) == 0

    report = json.loads((output / "report.json").read_text())
    assert report["settings"]["task"] == "image-classification" and report["metric"] == "accuracy"
    assert report["settings"]["columns"] == {
        "text": None,
        "text_pair": None,
        "label": "label",
        "image": "image",
    }
    assert report["compaction"] == "ok" and report["loader"].startswith(
        "transformers.ViTForImageClassification"
    )
    assert report["scores"]["compacted"] == report["scores"]["pruned"]
    assert all(row["sequence"] is None and row["speedup"] > 0 for row in report["latency"])
    loaded = AutoModelForImageClassification.from_pretrained(output / "model")  # plain transformers
    assert loaded.config.num_attention_heads == 2 and loaded.config.id2label == {0: "blue", 1: "red"}
    assert AutoImageProcessor.from_pretrained(output / "model").size == {"height": 16, "width": 16}


def test_prune_on_an_image_folder_searches_heads_and_neurons_under_a_flops_budget(tmp_path, image_folder):
    model_dir = vit_folder(tmp_path / "vit", fine_tuned=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MASK_SEARCH)
    output = tmp_path / "out"
    argv = ["prune", str(recipe), "--model", str(model_dir), "--data", str(image_folder)]
    assert (
        main([*argv, "--output-dir", str(output), "--calibration-examples", "16", "--batch-size", "8"]) == 0
    )

    report = json.loads((output / "report.json").read_text())
    assert report["compaction"] == "ok" and report["settings"]["task"] == "image-classification"
    assert report["scores"]["compacted"] == report["scores"]["pruned"]
    assert report["parameters"]["layers_compacted"] < report["parameters"]["layers_full_size"]


def test_calibration_counts_each_image_as_the_positions_the_model_makes_of_it():
    model = tiny_vit()  # 16x16 images in 8x8 patches: 4 patches and the class token
    batch = labelled_batch(model, 3)
    assert Calibration(model, [batch, batch], progress=False).tokens == 2 * 3 * 5


def test_an_image_column_that_holds_no_images_is_one_line_naming_it(tmp_path, image_folder):
    from hfprune.cli.columns import find_columns
    from hfprune.data.sources import load_source
    from hfprune.errors import HfpruneError
    from hfprune.recipe.run_sections import DataSection

    dataset = load_source(str(image_folder))
    found = find_columns(DataSection(dataset=str(image_folder)), dataset, "image-classification")
    assert found == Columns(None, None, "label", "image")
    with pytest.raises(HfpruneError, match="image column 'label' holds ClassLabel"):
        find_columns(
            DataSection(dataset=str(image_folder), image_column="label"), dataset, "image-classification"
        )


@pytest.mark.parametrize(
    "with_tokenizer, message",
    [
        (False, "(nor is there an image processor, preprocessor_config.json)"),
        (True, "holds images, and the model folder has no image processor (preprocessor_config.json)"),
    ],
)
def test_images_with_a_model_folder_without_an_image_processor_are_one_line(
    tmp_path, image_folder, minilm_tokenizer, capsys, with_tokenizer, message
):
    model_dir = tmp_path / "vit"
    tiny_vit().save_pretrained(model_dir)  # no preprocessor_config.json
    if with_tokenizer:
        minilm_tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(VIT_RECIPE)
    argv = ["run", str(recipe), "--model", str(model_dir), "--data", str(image_folder), "--no-baseline"]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err


def test_a_compacted_vit_is_saved_with_the_image_processor_of_its_checkpoint(tmp_path):
    from transformers import AutoImageProcessor

    from hfprune.compaction.compact import save_compacted

    source = vit_folder(tmp_path / "checkpoint", fine_tuned=True)
    save_compacted(tiny_vit(), tmp_path / "small", tokenizer_from=source)
    assert AutoImageProcessor.from_pretrained(tmp_path / "small").size == {"height": 16, "width": 16}
