"""The pruner in a stock ``transformers.Trainer``: one callback, no subclass.

The Trainer calls ``on_pre_optimizer_step`` and ``on_optimizer_step`` once per real
optimizer step (after gradient accumulation and clipping), and ``on_save`` after each
checkpoint, which is where the pruning state is written beside the weights. ``on_log`` adds the
sparsity and strategy metrics to the logs, and the callback runs ahead of the ``report_to``
integrations so that every logger gets them. Once training ends, ``save_pretrained`` (and so
``trainer.save_model``) writes the model without the layers gated off for good
(:class:`SaveWithoutDeletedLayers`); checkpoints keep them, to be resumed.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hfprune.errors import HfpruneError, StateError
from hfprune.model_hooks import ModelHook, hook_save_pretrained, unhook_save_pretrained
from hfprune.plugins import Registry
from hfprune.pruner import Pruner
from hfprune.recipe.schema import RecipeSource
from hfprune.state import STATE_FILE

logger = logging.getLogger("hfprune.callback")


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
        self._warned_of_log_order = False

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._log_before_reporters()
        if model is not None:
            self.pruner.attach(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self._log_before_reporters()  # again: a callback added with trainer.add_callback gets no on_init_end
        # Checkpoints keep every layer: the Trainer and `hfprune compact` load them into the full-size model.
        unhook_save_pretrained(model)
        if self.pruner.teacher is not None or self.pruner.recipe.distillation is not None:
            _check_distillation_can_run(args)
        self.pruner.attach(model)  # again: model_init may have built a new model since __init__
        self.pruner.start(state.max_steps, lr_scheduler)
        if optimizer is not None:  # the Trainer has built it (and accelerate wrapped it) by now
            self.pruner.check_optimizer(optimizer)
        if state.global_step > 0:
            self._restore(args, state.global_step)
        _warn_of_early_best_checkpoints(args, self.pruner)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.pruner.before_optimizer_step(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.pruner.after_optimizer_step(
            optimizer, skipped=bool(getattr(optimizer, "step_was_skipped", False))
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # The teacher leaves with training: a later fine-tune of this model (a recovery run with another
        # Trainer) trains on its own loss again.
        if self.pruner.distiller is not None:
            self.pruner.distiller.close()
        # The Trainer reloads its best checkpoint only once the loop is over, not when a hyper-parameter
        # search prunes the trial mid-run (it calls on_train_end then too).
        loop_over = state.global_step >= state.max_steps or control.should_training_stop
        best = state.best_model_checkpoint if args.load_best_model_at_end and loop_over else None
        self.pruner.finish(reloaded_step=_checkpoint_step(best) if best else None)
        if isinstance(model, PreTrainedModel) and any(
            not keep.all() for keep in self.pruner.layer_plan(model).values()
        ):
            hook_save_pretrained(model, SaveWithoutDeletedLayers(self.pruner))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer appended a copy of `logs` to the log history before calling on_log: update both.
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

    def _log_before_reporters(self) -> None:
        """Move this callback ahead of the ``report_to`` integrations in the Trainer's callback list.

        The Trainer calls ``on_log`` on its callbacks in list order and builds the list as its own
        callbacks, then the integrations (TensorBoard, W&B, MLflow, ...), then the user's: left there,
        every integration would write ``logs`` before :meth:`on_log` adds the pruning metrics.

        Callbacks get no reference to the Trainer or its handler, so the handler is found on the call
        stack (:func:`_calling_handler`): it is the caller of every event, and the check is by type and
        membership. The alternatives need more from the user (a Trainer subclass, or reordering the
        list by hand) or do worse: writing the metrics to each integration from ``on_log`` knows every
        integration's API and logs each step twice; ``gc.get_referrers`` scans the heap. Where a future
        transformers calls events otherwise, training runs as before and a warning says so, once.
        """
        handler = _calling_handler(self)
        if handler is not None:
            _move_after_flow_callback(handler.callbacks, self)
        elif not self._warned_of_log_order:
            self._warned_of_log_order = True
            logger.warning(
                "PruneCallback found no transformers CallbackHandler calling it, so it cannot run before "
                "the report_to integrations: the pruning metrics reach only the loggers after it in "
                "trainer.callback_handler.callbacks (and state.log_history); move it to the front of "
                "that list to log them everywhere"
            )

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


class SaveWithoutDeletedLayers(ModelHook):
    """``save_pretrained`` of a trained model some of whose layers are gated off for good: it writes the model
    without them.

    The full-size weights would load, with plain ``from_pretrained``, with those layers active
    again, and no weights make a post-norm layer (BERT's) the identity. Without them the
    saved model is a stock one that computes what the trained, gated model does
    (:meth:`~hfprune.pruner.Pruner.without_deleted_layers`, checked like every compaction).
    The callback puts it on the model when training ends and takes it off when training
    begins, so checkpoints written while training keep every layer; a Trainer checkpoint
    (``checkpoint-<step>``) a later run writes without the callback keeps them too, as
    resuming loads it back into this full-size model.
    """

    def __init__(self, pruner: Pruner):
        self.pruner = pruner

    def __call__(self, model: PreTrainedModel, save_directory, *args, state_dict=None, **kwargs):
        if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", Path(save_directory).name):
            type(model).save_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)
            return
        if state_dict is not None:
            raise HfpruneError(
                f"{type(model).__name__}.save_pretrained was given a state dict (the Trainer passes one "
                "under FSDP and DeepSpeed), from which hfprune cannot delete the layers gated off for good; "
                "with them the saved model would not compute what the trained one does. Save "
                "callback.compact(model) instead (under FSDP2 every process calls it), or write the "
                "full-size weights anyway with PreTrainedModel.save_pretrained(model, folder, state_dict=...)"
            )
        saved = self.pruner.without_deleted_layers(model)
        if saved is None:  # a copy made before a new run restarted the pruner: nothing is gated off now
            saved = model
        else:
            logger.info(
                "saving %s without its layers gated off for good (%d of %d parameters): a stock model "
                "that computes what the trained one does",
                type(model).__name__,
                sum(p.numel() for p in saved.parameters()),
                sum(p.numel() for p in model.parameters()),
            )
        type(saved).save_pretrained(saved, save_directory, *args, **kwargs)  # the class's method: no hook


def _warn_of_early_best_checkpoints(args, pruner: Pruner) -> None:
    """With ``load_best_model_at_end``, say when evaluations can pick a checkpoint saved before the pruning is
    fixed, which training then refuses at its end (:meth:`Pruner.finish`)."""
    ends = [s.schedule.end for s in pruner.strategies if s.fixes_a_pattern()]
    if not args.load_best_model_at_end or not ends:
        return
    fixed_after = max(ends) + 1
    if args.eval_strategy == "steps" and (args.eval_delay or 0) >= fixed_after:
        return
    logger.warning(
        "load_best_model_at_end: a best checkpoint saved before %d optimizer steps, when the recipe's "
        "pruning is fixed, is not the pruned model, and training refuses it at the end: evaluate from "
        "then on (eval_strategy 'steps' with eval_delay=%d)",
        fixed_after,
        fixed_after,
    )


def _calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    """The CallbackHandler on the call stack that holds ``callback``: the one calling it now."""
    frame = inspect.currentframe()
    while frame is not None:
        caller = frame.f_locals.get("self")
        if isinstance(caller, CallbackHandler) and any(cb is callback for cb in caller.callbacks):
            return caller
        frame = frame.f_back
    return None


def _move_after_flow_callback(callbacks: list[TrainerCallback], callback: TrainerCallback) -> None:
    """Move ``callback`` to just after the DefaultFlowCallback (the front without one); never later.

    The handler is looping over ``callbacks`` while it calls ``callback``: moving an item to an
    earlier place leaves every item after it where it was, so the loop goes on with the next one.
    """
    current = next(i for i, cb in enumerate(callbacks) if cb is callback)
    flow = next((i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), -1)
    if flow + 1 < current:
        callbacks.insert(flow + 1, callbacks.pop(current))


def _checkpoint_step(folder: str) -> int:
    """The optimizer steps behind a Trainer checkpoint folder (``checkpoint-<step>``)."""
    return int(Path(folder).name.rpartition("-")[2])


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
