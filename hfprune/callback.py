"""The pruner in a stock ``transformers.Trainer``: one callback, no subclass.

The Trainer calls ``on_pre_optimizer_step`` and ``on_optimizer_step`` once per real
optimizer step (after gradient accumulation and clipping), and ``on_save`` after each
checkpoint, which is where the pruning state is written beside the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hfprune.errors import HfpruneError, StateError
from hfprune.plugins import Registry
from hfprune.pruner import Pruner
from hfprune.recipe.schema import RecipeSource
from hfprune.state import STATE_FILE


class PruneCallback(TrainerCallback):
    """Prune during ``Trainer.train()`` according to a recipe (path, YAML string or Recipe).

    The recipe is checked against the model when the Trainer is built, so a bad target
    fails before training. ``resume_from`` names the checkpoint folder whose pruning state to
    restore when it is neither ``args.resume_from_checkpoint`` nor
    ``output_dir/checkpoint-<step>`` (the Trainer does not tell callbacks which one it loaded).
    ``teacher`` is a model to distill from (:mod:`hfprune.distill`), with the recipe's
    ``distillation:`` settings or their defaults; it is never saved in checkpoints.
    """

    def __init__(
        self,
        recipe: RecipeSource,
        resume_from: str | os.PathLike | None = None,
        registry: Registry | None = None,
        teacher: nn.Module | None = None,
    ):
        self.pruner = Pruner(recipe, registry, teacher)
        self.resume_from = resume_from

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.pruner.attach(model)

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if self.pruner.teacher is not None or self.pruner.recipe.distillation is not None:
            _check_distillation_can_run(args)
        self.pruner.attach(model)  # again: model_init may have built a new model since __init__
        self.pruner.start(state.max_steps, lr_scheduler)
        if state.global_step > 0:
            self._restore(args, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.pruner.before_optimizer_step(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.pruner.after_optimizer_step(
            optimizer, skipped=bool(getattr(optimizer, "step_was_skipped", False))
        )

    def on_train_end(self, args, state, control, **kwargs):
        # The teacher leaves with training: a later fine-tune of this model (a recovery run with another
        # Trainer) trains on its own loss again.
        if self.pruner.distiller is not None:
            self.pruner.distiller.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = self.pruner.metrics()
        if logs is not None:
            logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs):
        # Every process builds the state (under FSDP2 that is collective); the one that saves checkpoints
        # writes it.
        self.pruner.save(
            Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", write=args.should_save
        )

    def compact(self, model: nn.Module) -> nn.Module:
        """A smaller copy of ``model`` with pruned structure removed; ``model`` is left as it is."""
        return self.pruner.compact(model)

    def _restore(self, args, global_step: int) -> None:
        candidates = [
            self.resume_from,
            args.resume_from_checkpoint,
            Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{global_step}",
        ]
        found = [Path(c) for c in candidates if c and (Path(c) / STATE_FILE).is_file()]
        if not found:
            searched = ", ".join(str(c) for c in candidates if c)
            raise StateError(
                f"resuming at step {global_step}, but no {STATE_FILE} was found in {searched}; "
                "pass PruneCallback(recipe, resume_from=CHECKPOINT_DIR) with the folder training resumes from"
            )
        self.pruner.load(found[0])
        if self.pruner.step != global_step:
            raise StateError(
                f"pruning state in {found[0]} is at step {self.pruner.step}, the Trainer resumes at step "
                f"{global_step}"
            )


def _check_distillation_can_run(args) -> None:
    """Refuse the Trainer settings under which the distilled loss the model returns would be ignored or
    raced."""
    if args.label_smoothing_factor:
        raise HfpruneError(
            "distillation mixes the teacher into the loss the model returns, and with "
            "label_smoothing_factor the Trainer computes its own loss instead: set label_smoothing_factor "
            "to 0 (the teacher's soft targets smooth the labels already)"
        )
    if args.n_gpu > 1:
        raise HfpruneError(
            f"distillation under torch.nn.DataParallel ({args.n_gpu} GPUs in one process) is not supported: "
            "launch one process per GPU with accelerate launch or torchrun"
        )
