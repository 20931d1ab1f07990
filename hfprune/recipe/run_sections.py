"""The ``model:``, ``data:`` and ``training:`` sections a recipe may carry for ``hfprune run``.

They sit beside ``pruners:`` so one file describes a whole run; the Trainer callback ignores
them. Each field is optional: a command-line flag overrides it, and where neither says
anything the defaults below apply (MiniLM fine-tuned on WNUT-16 NER for 5 epochs).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

# Measured with 50% magnitude pruning, seed 42: 5 epochs at 1e-4 reach entity F1 0.39,
# 3 epochs at 2e-4 0.37, 3 epochs at 5e-5 only 0.15.
DEFAULT_EPOCHS = 5.0
DEFAULT_LEARNING_RATE = 1e-4


class _Section(BaseModel):
    """Values are strict, as in a strategy's config: a bool or a string is never a number."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class ModelSection(_Section):
    """Which pretrained model to fine-tune."""

    path: StrictStr | None = Field(
        default=None, min_length=1, description="folder with config.json, weights and a fast tokenizer"
    )
    teacher: StrictStr | None = Field(
        default=None,
        min_length=1,
        description="a model already fine-tuned on this task: the dense reference and the teacher, instead "
        "of fine-tuning one first",
    )


TASKS = ("sequence-classification", "token-classification", "causal-lm", "image-classification")


class DataSection(_Section):
    """Which data and task: a built-in set, files, or a cached dataset (:mod:`hfprune.data.sources`).

    Columns, splits and the task are found from the data and the model unless named here.
    """

    dataset: StrictStr = Field(
        default="wnut",
        min_length=1,
        description="wnut, polarity, a CSV/TSV/JSON/JSON-lines/parquet file or folder of them, a folder of "
        "images (one subfolder per class), a save_to_disk folder, or a dataset name in the local datasets "
        "cache",
    )
    task: Literal[TASKS] | None = Field(default=None, description="default: inferred from the data and model")
    text_column: StrictStr | None = Field(default=None, min_length=1)
    text_pair_column: StrictStr | None = Field(default=None, min_length=1)
    label_column: StrictStr | None = Field(default=None, min_length=1)
    image_column: StrictStr | None = Field(default=None, min_length=1)
    train_split: StrictStr = Field(default="train", min_length=1)
    test_split: StrictStr | None = Field(
        default=None,
        min_length=1,
        description="default: the data's 'test' or 'validation' split, else test_fraction of the training "
        "split",
    )
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    max_length: int = Field(
        default=64, gt=0, description="sub-tokens per example after truncation; tokens per block of text"
    )
    train_limit: int | None = Field(
        default=None, gt=0, description="train on the first N training examples only"
    )
    test_limit: int | None = Field(default=None, gt=0, description="score on the first N test examples only")


class TrainingSection(_Section):
    """How the stock Trainer fine-tunes: the short names below, and any other ``TrainingArguments`` field.

    Other keys are kept as given and checked against ``TrainingArguments`` by ``hfprune run``
    (:mod:`hfprune.cli.training_arguments`), which imports transformers; a recipe stays
    cheap to load without it.
    """

    model_config = ConfigDict(extra="allow")

    epochs: float = Field(default=DEFAULT_EPOCHS, gt=0.0)
    max_steps: int | None = Field(default=None, gt=0, description="overrides epochs")
    batch_size: int = Field(default=32, gt=0)
    learning_rate: float = Field(default=DEFAULT_LEARNING_RATE, gt=0.0)
    seed: int = 42
    baseline: bool = Field(
        default=True,
        description="first fine-tune without pruning: the dense score pruning is measured against, and the "
        "teacher when "
        "the recipe distills",
    )
    prune_from: Literal["dense", "pretrained"] = Field(
        default="dense",
        description="what the pruned run starts from: 'dense', the model fine-tuned first (or --teacher), as "
        "nn_pruning and CoFi prune a fine-tuned model; 'pretrained', the pretrained weights again. Without a "
        "dense model (--no-baseline) it is the pretrained weights",
    )


RUN_SECTIONS = {"model": ModelSection, "data": DataSection, "training": TrainingSection}


def merge(section: _Section | None, section_type: type[_Section], overrides: dict) -> _Section:
    """The recipe's section (or the defaults) with every override that is not None applied, re-validated."""
    values = (section or section_type()).model_dump()
    values.update({key: value for key, value in overrides.items() if value is not None})
    return section_type.model_validate(values)
