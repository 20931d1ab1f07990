"""Every ``TrainingArguments`` field as an ``hfprune run`` flag and as a key of a recipe's ``training:``.

The flags come from transformers' own ``HfArgumentParser``, as in its example scripts
(``--report_to tensorboard``, ``--weight_decay 0.01``, ``--lr_scheduler_type cosine``), so
they track whichever transformers is installed. The main job's short flags stay: ``--epochs``,
``--max-steps``, ``--batch-size``, ``--learning-rate`` and ``--seed`` set the fields named in
:data:`SHORT_NAMES`, and answer to those names too. Precedence, lowest first: the main job's
defaults, the recipe's ``training:`` section, the command line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import typing

from hfprune.errors import HfpruneError

# TrainingSection's short name of each TrainingArguments field the main job has its own flag for.
SHORT_NAMES = {
    "epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "learning_rate": "learning_rate",
    "seed": "seed",
}
# Decided by the main job: --output-dir holds the results, each training run logs into its own folder there.
OWNED = ("output_dir",)
# The main job's own defaults where they differ from TrainingArguments': no checkpoints (the output folder
# holds results), no logging service unless asked, a progress bar.
DEFAULTS = {"logging_steps": 10, "save_strategy": "no", "report_to": "none", "disable_tqdm": False}
GROUP_TITLE = "every other TrainingArguments field (also a key of the recipe's training: section)"


def field_names() -> set[str]:
    from transformers import TrainingArguments

    return {field.name for field in dataclasses.fields(TrainingArguments) if field.init}


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainingArguments field the main job has no flag of its own for, built by
    HfArgumentParser; a flag not given leaves no attribute, so the recipe's value is kept."""
    from transformers import HfArgumentParser, TrainingArguments

    group = parser.add_argument_group(GROUP_TITLE)
    hints = typing.get_type_hints(TrainingArguments)
    skipped = set(SHORT_NAMES.values()) | set(OWNED)
    for field in dataclasses.fields(TrainingArguments):
        if not field.init or field.name in skipped:
            continue
        field = copy.copy(field)
        field.type = hints[field.name]  # what HfArgumentParser does before reading a field
        before = len(group._group_actions)
        HfArgumentParser._parse_dataclass_field(group, field)
        for action in group._group_actions[before:]:
            action.default = argparse.SUPPRESS


def given_flags(args: argparse.Namespace) -> dict:
    """The TrainingArguments fields set on the command line by their own flags (the main job's flags, such as
    ``--seed`` or ``--output-dir``, are read by RunSettings)."""
    names = field_names() - set(SHORT_NAMES.values()) - set(OWNED)
    return {name: value for name, value in vars(args).items() if name in names}


def check_recipe_keys(recipe) -> None:
    """A located RecipeError for each ``training:`` key that is neither a short name nor a TrainingArguments
    field, before anything is trained."""
    extra = (recipe.training.model_extra or {}) if recipe.training is not None else {}
    names = field_names()
    problems = [
        recipe.problem(("training", key), "not a TrainingArguments field", hint=_closest(key, names))
        for key in extra
        if key not in names or key in OWNED or key in SHORT_NAMES.values()
    ]
    if problems:
        raise recipe.error(problems)


def build(training, flags: dict, output_dir: str, **fixed):
    """TrainingArguments from the merged ``training:`` section, the command line's flags, then ``fixed``."""
    import torch
    from transformers import HfArgumentParser, TrainingArguments

    values = (
        DEFAULTS
        | {"use_cpu": not torch.cuda.is_available()}
        | {field: getattr(training, short) for short, field in SHORT_NAMES.items()}
        | {"per_device_eval_batch_size": training.batch_size, "max_steps": training.max_steps or -1}
        | (training.model_extra or {})
        | flags
        | {"output_dir": output_dir}
        | fixed
    )
    try:
        return HfArgumentParser(TrainingArguments).parse_dict(values)[0]
    except (ValueError, TypeError) as exc:
        raise HfpruneError(f"training settings: {str(exc).strip().splitlines()[0]}") from None


def _closest(key: str, names: set[str]) -> str | None:
    if key in SHORT_NAMES.values() or key in OWNED:
        own = {field: short for short, field in SHORT_NAMES.items()}.get(key)
        return f"write {own}: (the main job's name for it)" if own else "--output-dir decides it"
    close = difflib.get_close_matches(key, list(names) + list(SHORT_NAMES), n=1)
    return f"did you mean {close[0]}?" if close else None
