"""Knowledge distillation from a teacher (usually the dense model) while the student is pruned.

A Trainer callback cannot change the loss, and hfprune asks for no Trainer subclass. So the
teacher enters through the one place every training loop goes: the student's forward pass.
:class:`Distiller` puts two forward hooks on the student model. In training mode, the first
asks the student for its hidden states (when they are distilled); the second runs the teacher
on the same inputs (eval mode, no grad, the student's device and dtype) and replaces the
output's ``loss`` with

    (1 - logit_weight) * task_loss
        + logit_weight * T**2 * KL(softmax(teacher / T) || softmax(student / T))
        + hidden_weight * sum_i MSE(student_hidden[m(i)], teacher_hidden[i])

(ALGORITHMS.md section 4). The stock Trainer, a hand-written accelerate loop and DDP all read
``output.loss`` after the forward pass, so they all train on the mixed loss, and in eval mode
the model is left alone. The teacher is not a submodule of the student: it is never saved
with it, never given to the optimizer, and the hooks are taken off every compacted copy.

The KL is per example for sequence classification, per token over real tokens (the
attention mask; labels of -100 still carry the teacher's signal) for token classification,
and per position over the shifted positions for causal language models. Hidden states are
matched over real tokens, teacher layer ``i`` against student layer ``m(i)``: the same layer
(``match: fixed``), or CoFi's dynamic matching (``match: dynamic``), the student layer at or
after ``m(i - 1)`` closest to it, so layers that layer-lasso gated off (the identity) drop
out of the loss by themselves.

A causal language model's task loss is normalized over the whole accumulated batch when the
Trainer passes ``num_items_in_batch`` (transformers' loss functions sum per token and divide by
that count), so there each micro-batch's distillation terms are weighted by its share of the
labelled items. Classification heads average each micro-batch themselves and ignore the count,
so their distillation terms stay micro-batch means like the task loss: either way gradient
accumulation changes the mix no more than it changes the task loss.

Logit distillation compares class distributions, so regression and multi-label heads are
refused, as are encoder-decoder models (the teacher would need the decoder's inputs). A Trainer
that computes the loss itself (label smoothing, ``compute_loss_func``) never reads the model's
loss: the callback refuses label smoothing, and a training forward pass without labels is
warned about once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from torch import nn

from hfprune.integrations.peft_names import unwrap_peft
from hfprune.model_hooks import ModelHook

logger = logging.getLogger("hfprune.distill")

LOSS_ONLY_INPUTS = ("labels", "num_items_in_batch", "return_loss")  # what the teacher is not given


class DistillationConfig(BaseModel):
    """The ``distillation:`` section of a recipe; values are strict, as in a strategy's config."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    teacher: StrictStr | None = Field(
        default=None,
        min_length=1,
        description="folder of the teacher model (save_pretrained); leave out when the teacher is passed in "
        "Python",
    )
    temperature: float = Field(default=2.0, gt=0.0, description="softmax temperature T of the logit term")
    logit_weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="a: (1 - a) * task loss + a * T^2 * KL"
    )
    hidden_weight: float = Field(
        default=0.0, ge=0.0, description="weight of the hidden-state MSE term (0: off)"
    )
    layers: list[int] | None = Field(
        default=None,
        min_length=1,
        description="teacher layers whose outputs are matched, counted from 1; default: all",
    )
    match: Literal["dynamic", "fixed"] = Field(
        default="dynamic",
        description="'dynamic': each teacher layer against the closest student layer at or after the "
        "previous match "
        "(CoFi); 'fixed': against the student layer of the same number",
    )

    @field_validator("layers")
    @classmethod
    def _layers_count_from_one(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (min(layers) < 1 or sorted(set(layers)) != layers):
            raise ValueError(
                f"layers are teacher layer numbers counted from 1, increasing, without repeats; got {layers}"
            )
        return layers


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (its logits at position t are about token t + 1)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate and can_generate()) and not getattr(config, "is_encoder_decoder", False)


def logit_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the positions ``mask`` marks
    (all if None).

    ``student`` and ``teacher`` are logits with classes last; ``mask`` has their shape without it.
    """
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return temperature**2 * masked_mean(per_position, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set; trailing dimensions of ``values`` beyond the mask's are
    averaged too."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    weights = mask.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference of two layers' outputs (batch, time, hidden) over real tokens."""
    return masked_mean((student.float() - teacher.float()).square(), mask)


def match_layers(
    student: tuple[torch.Tensor, ...],
    teacher: tuple[torch.Tensor, ...],
    layers: list[int],
    mask: torch.Tensor | None,
) -> list[int]:
    """CoFi's dynamic layer map: for each teacher layer in ``layers`` (hidden-state index), the student layer
    at or
    after the previous match whose output is closest to it (mean squared difference over real tokens)."""
    matched: list[int] = []
    first = 1
    with torch.no_grad():
        for layer in layers:
            distances = torch.stack(
                [hidden_mse(student[j], teacher[layer], mask) for j in range(first, len(student))]
            )
            first += int(distances.argmin())
            matched.append(first)
    return matched


@dataclass
class DistillationLosses:
    """The terms of the last training step's loss, kept as tensors until someone reads them (no sync per
    step)."""

    task: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def as_metrics(self) -> dict[str, float]:
        values = {"distill_task": self.task, "distill_kl": self.logits, "distill_hidden": self.hidden}
        return {name: float(value) for name, value in values.items() if value is not None}


class _AskForHiddenStates(ModelHook):
    """Forward pre-hook: in training, have the student return its hidden states (the hidden-state term reads
    them)."""

    def __call__(self, module, args, kwargs):
        if module.training:
            return args, {**kwargs, "output_hidden_states": True}
        return None


class _DistillationLoss(ModelHook):
    """Forward hook: in training, replace the output's loss with the distillation mix."""

    def __init__(self, distiller: Distiller):
        self.distiller = distiller

    def __call__(self, module, args, kwargs, output):
        if not module.training or not torch.is_grad_enabled():
            return None
        return self.distiller.mix(module, args, kwargs, output)


class Distiller:
    """Trains a student against ``teacher`` by rewriting the loss its forward pass returns (see the module
    docstring)."""

    def __init__(self, teacher: nn.Module, config: DistillationConfig):
        self.teacher = teacher
        self.config = config
        self.last = DistillationLosses()
        self._handles: list = []
        self._warned_no_labels = False
        teacher.eval()  # its forward runs under no_grad: its parameters stay as the caller set them

    def attach(self, student: nn.Module) -> None:
        """Put the hooks on ``student`` (taking off any this distiller put there before)."""
        self.close()
        if self.config.hidden_weight > 0:
            self._handles.append(student.register_forward_pre_hook(_AskForHiddenStates(), with_kwargs=True))
        self._handles.append(student.register_forward_hook(_DistillationLoss(self), with_kwargs=True))

    def close(self) -> None:
        """Take the hooks off the student."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def mix(self, student: nn.Module, args: tuple, kwargs: dict, output):
        """``output`` with its loss replaced by the distillation mix (a new output of the same class)."""
        config = self.config
        teacher_output = self._teacher_forward(student, args, kwargs)
        mask = kwargs.get("attention_mask")
        causal = is_causal_lm(student)
        student_logits, teacher_logits = output.logits, teacher_output.logits
        logit_mask = mask
        if causal:  # logits at t predict token t + 1: the last position has nothing to predict
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
            # both the position read and the token predicted must be real (left padding too)
            logit_mask = mask[:, :-1] * mask[:, 1:] if mask is not None else None
        elif student_logits.dim() == 2:  # one prediction per sequence
            logit_mask = None
        task = output.get("loss")
        if task is None and "labels" not in kwargs:
            self._warn_no_labels()
        kl = logit_kl(student_logits, teacher_logits, config.temperature, logit_mask)
        distilled = config.logit_weight * kl
        hidden = None
        if config.hidden_weight > 0:
            hidden = self._hidden_term(output.hidden_states, teacher_output.hidden_states, mask)
            distilled = distilled + config.hidden_weight * hidden
        share = self._share_of_accumulated_batch(kwargs) if causal else None
        if share is not None:  # the task loss is normalized over the accumulated batch already: weigh alike
            distilled = distilled * share
        loss = distilled if task is None else distilled + (1 - config.logit_weight) * task
        self.last = DistillationLosses(
            task=task.detach() if task is not None else None,
            logits=kl.detach(),
            hidden=hidden.detach() if hidden is not None else None,
        )
        fields = {key: value for key, value in output.items() if key != "loss"}
        return type(output)(loss=loss, **fields)

    def _teacher_forward(self, student: nn.Module, args: tuple, kwargs: dict):
        parameter = next(student.parameters())
        if (
            next(self.teacher.parameters()).device != parameter.device
            or next(self.teacher.parameters()).dtype != parameter.dtype
        ):
            self.teacher.to(device=parameter.device, dtype=parameter.dtype)
        inputs = {key: value for key, value in kwargs.items() if key not in LOSS_ONLY_INPUTS}
        if self.config.hidden_weight > 0:
            inputs["output_hidden_states"] = True
        with torch.no_grad():
            return self.teacher(*args, **inputs)

    def _hidden_term(
        self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask
    ) -> torch.Tensor:
        layers = self.config.layers or list(range(1, len(teacher)))
        if self.config.match == "fixed":
            matched = layers
        else:
            matched = match_layers(student, teacher, layers, mask)
        terms = [hidden_mse(student[j], teacher[i], mask) for i, j in zip(layers, matched)]
        return torch.stack(terms).sum()

    def _warn_no_labels(self) -> None:
        if not self._warned_no_labels:
            logger.warning(
                "a training forward pass got no labels, so the model's loss is the distillation terms "
                "alone; if your loop or Trainer computes the task loss itself (compute_loss_func, label "
                "smoothing), it never reads that loss and nothing is distilled"
            )
            self._warned_no_labels = True

    @staticmethod
    def _share_of_accumulated_batch(kwargs: dict) -> torch.Tensor | None:
        """A causal language model's micro-batch: its labelled next tokens over the accumulated batch's, when
        the Trainer passed that count."""
        total, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        if total is None or labels is None:
            return None
        return labels[..., 1:].ne(-100).sum() / total


def load_teacher(path: str, student: nn.Module) -> nn.Module:
    """The model saved in ``path``, as the student's class (the plain model's, for a student peft wrapped)."""
    cls = type(unwrap_peft(student))
    try:
        return cls.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot load a {cls.__name__} teacher from {path}: {str(exc).splitlines()[0]}"
        ) from None


def teacher_mismatch(teacher: nn.Module, student: nn.Module, config: DistillationConfig) -> str | None:
    """Why ``teacher`` cannot teach ``student`` under ``config``, or None: the outputs or hidden states
    compared must align."""
    t, s = getattr(teacher, "config", None), getattr(student, "config", None)
    if t is None or s is None:
        return None

    def differs(field: str) -> bool:
        return getattr(t, field, None) != getattr(s, field, None)

    if differs("vocab_size"):
        return (
            f"the teacher's vocabulary has {t.vocab_size} tokens, the student's {s.vocab_size}: they must "
            "read the same ids"
        )
    if getattr(s, "is_encoder_decoder", False):
        return "encoder-decoder models are not distilled yet: the teacher would need the decoder's inputs"
    if not is_causal_lm(student):
        problem = getattr(s, "problem_type", None)
        if problem in ("regression", "multi_label_classification") or getattr(s, "num_labels", 2) == 1:
            return (
                f"logit distillation compares class distributions, and the student is a "
                f"{problem or 'regression'} model"
            )
        if differs("num_labels"):
            return (
                f"the teacher predicts {t.num_labels} labels, the student {s.num_labels}: the logits "
                "compared must have the same classes"
            )
        if _named_labels(t) and _named_labels(s) and t.id2label != s.id2label:
            return (
                f"the teacher's labels are {_label_list(t)}, the student's {_label_list(s)}: the logits "
                "compared must have the same classes in the same order"
            )
    if config.hidden_weight > 0:
        if differs("hidden_size"):
            return (
                "hidden-state distillation compares layer outputs, but the teacher's hidden size is "
                f"{t.hidden_size} "
                f"and the student's {s.hidden_size}"
            )
        depth = getattr(t, "num_hidden_layers", None)
        if config.layers and depth is not None and max(config.layers) > depth:
            return f"layers names teacher layer {max(config.layers)}, but the teacher has {depth}"
        if (
            config.match == "fixed"
            and depth is not None
            and max(config.layers or [depth]) > s.num_hidden_layers
        ):
            return (
                f"match: fixed pairs teacher layer {max(config.layers or [depth])} with the student's layer "
                "of that number, "
                f"but the student has {s.num_hidden_layers}; use match: dynamic"
            )
    return None


def _named_labels(config) -> bool:
    """Whether ``config`` names its labels (not transformers' stand-ins ``LABEL_0``, ``LABEL_1``, ...)."""
    names = getattr(config, "id2label", None) or {}
    return any(name != f"LABEL_{index}" for index, name in names.items())


def _label_list(config) -> list[str]:
    return [config.id2label[index] for index in sorted(config.id2label)]
