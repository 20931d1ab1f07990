"""Calibration data and the passes one-shot strategies run over it.

A one-shot strategy sees the model only through a few hundred or thousand examples and
no optimizer: it measures (activations, gradients), decides, and changes weights once.
:class:`Calibration` holds those examples as batches on the model's device and runs
the passes strategies need:

- :meth:`Calibration.gradient_passes`: forward and backward on each batch with the
  data's labels, the model in eval mode, gradients only for the parameters asked for
  (Fisher importance reads them);
- :meth:`Calibration.forward_passes`: forward only (activation statistics);
- :meth:`Calibration.replay`: the batches as the inputs of one layer stack, advanced a
  layer at a time (:class:`LayerReplay`), so a strategy can prune layer by layer and see
  each layer's input as the already-pruned layers below it make it, at the cost of one
  layer's forward per batch instead of the whole model's.

Padding is not data: :attr:`Calibration.rows` says which positions of the running batch
are real tokens, for statistics over positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from tqdm.auto import tqdm

from hfprune.errors import HfpruneError

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")  # transformers' names for it


class CalibrationError(HfpruneError, ValueError):
    """Calibration data a one-shot strategy cannot use (too little, no labels, the wrong task)."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early: everything wanted from it has been seen."""


@dataclass
class LayerCall:
    """One batch's call of the first layer of a stack: the hidden states and everything else it was given."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    rows: torch.Tensor | None  # real-token positions, flattened (None: every position)


class Calibration:
    """Calibration batches on ``model``'s device, and the passes over them.

    ``batches`` are what the model's forward takes (``input_ids``, ``attention_mask``,
    ``labels``...), as a data loader gives them. ``progress`` shows a bar per pass.
    """

    def __init__(
        self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], progress: bool = True
    ):
        self.model = model
        device = next(model.parameters()).device
        self.batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        if not self.batches:
            raise CalibrationError(
                "the calibration data is empty: one-shot pruning needs examples to measure"
            )
        self.progress = progress
        self.rows: torch.Tensor | None = None  # the running batch's real-token positions
        self.examples = sum(_batch_size(batch) for batch in self.batches)

    @property
    def tokens(self) -> int:
        """Real (not padding) token positions over all batches; for images, the positions the model makes of
        each (:attr:`positions_per_image`)."""
        if "pixel_values" in self.batches[0]:
            return self.examples * self.positions_per_image
        return sum(int(_token_mask(batch).sum()) for batch in self.batches)

    @cached_property
    def positions_per_image(self) -> int:
        """How many positions the model's embeddings make of one image (its patches and class token): the
        length of its first hidden state, from one forward pass of the first batch."""
        inputs = {key: value for key, value in self.batches[0].items() if key != "labels"}
        with torch.no_grad():
            return self.model(**inputs, output_hidden_states=True).hidden_states[0].shape[1]

    @property
    def mean_length(self) -> float:
        """Real tokens per example: the sequence length a FLOPs count assumes."""
        return self.tokens / self.examples

    def select_rows(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (batch, positions, features) of the running batch as (real tokens, features)."""
        flat = values.reshape(-1, values.shape[-1])
        return flat if self.rows is None else flat[self.rows]

    @contextmanager
    def _batch(self, batch: Mapping[str, torch.Tensor]):
        mask = batch.get("attention_mask")
        self.rows = None if mask is None or mask.dim() != 2 or bool(mask.all()) else mask.flatten().bool()
        try:
            yield
        finally:
            self.rows = None

    def bar(self, items, description: str):
        """``items`` with a progress bar (when ``progress``), for a strategy's own long loops."""
        return tqdm(items, desc=description, unit="batch", disable=not self.progress, leave=False)

    def forward_passes(self, description: str) -> None:
        """Run the model on every batch without gradients; hooks the caller registered see the activations."""
        with torch.no_grad():
            for batch in self.bar(self.batches, description):
                with self._batch(batch):
                    self.model(**batch)

    def gradient_passes(
        self, parameters: list[nn.Parameter], after_backward: Callable[[], None], description: str
    ) -> None:
        """Forward and backward on every batch with its labels; ``after_backward()`` reads the gradients.

        Only ``parameters`` get gradients (the others are frozen for the pass and restored), and
        they are cleared after every batch, so each reading is one batch's gradient. The loss is
        the model's own with the data's labels: a batch without labels, or one the model cannot
        compute a loss on, is a CalibrationError.
        """
        if any("labels" not in batch for batch in self.batches):
            keys = ", ".join(sorted(next(b for b in self.batches if "labels" not in b)))
            raise CalibrationError(
                f"these calibration batches have no labels (they hold {keys}), and the importance "
                "is the gradient of the loss on them: give labelled examples of the model's task"
            )
        wanted = {id(p) for p in parameters}
        trainable = {p: p.requires_grad for p in self.model.parameters()}
        try:
            for param in trainable:
                param.requires_grad_(id(param) in wanted)
            for index, batch in enumerate(self.bar(self.batches, description)):
                with self._batch(batch):
                    loss = self._loss(batch, first=index == 0)
                    loss.backward()
                after_backward()
                for param in parameters:
                    param.grad = None
        finally:
            for param, flag in trainable.items():
                param.requires_grad_(flag)

    def _loss(self, batch: Mapping[str, torch.Tensor], first: bool) -> torch.Tensor:
        try:
            loss = self.model(**batch).loss
        except (RuntimeError, ValueError, IndexError) as exc:
            if not first:
                raise
            raise CalibrationError(
                f"the model cannot compute its loss on the calibration data ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}): is the data for this model's task and labels?"
            ) from exc
        if loss is None or not torch.isfinite(loss):
            raise CalibrationError(
                f"the model's loss on a calibration batch is {None if loss is None else loss.item()}: "
                "is the data for this model's task and labels?"
            )
        return loss

    def replay(self, stack: nn.ModuleList) -> LayerReplay:
        """The batches as inputs of ``stack``'s first layer (one forward per batch, stopped there)."""
        return LayerReplay(self, stack)


class LayerReplay:
    """Every calibration batch's call of one layer stack, to run a layer at a time.

    The first layer's call of each batch (hidden states, attention mask, position
    embeddings...) is captured once; :meth:`run` calls any layer with the same arguments
    and given hidden states. Layers of a residual stack take and give hidden states of one
    shape, so the output of layer ``i`` is the input of layer ``i + 1``.
    """

    def __init__(self, calibration: Calibration, stack: nn.ModuleList):
        self.calibration = calibration
        self.calls: list[LayerCall] = []
        seen: list[tuple[tuple, dict]] = []

        def capture(module, args, kwargs):
            seen.append((args, kwargs))
            raise _StopForward

        handle = stack[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in calibration.bar(calibration.batches, "capturing layer inputs"):
                    with calibration._batch(batch):
                        rows = calibration.rows
                        try:
                            calibration.model(**batch)
                        except _StopForward:
                            pass
                    args, kwargs = seen.pop()
                    kwargs = dict(kwargs)
                    if args:
                        hidden, args = args[0], args[1:]
                    else:
                        hidden = kwargs.pop("hidden_states")
                    # A decoder's key/value cache would grow with every replayed call: each call stands alone.
                    for cache in CACHE_ARGUMENTS:
                        if cache in kwargs:
                            kwargs[cache] = None
                    self.calls.append(LayerCall(hidden, args, kwargs, rows))
        finally:
            handle.remove()

    def inputs(self) -> list[torch.Tensor]:
        """The first layer's hidden states, one tensor per batch."""
        return [call.hidden for call in self.calls]

    @torch.no_grad()
    def call(self, layer: nn.Module, index: int, hidden: torch.Tensor, stop_after: nn.Module | None = None):
        """``layer`` on batch ``index`` with ``hidden`` as its hidden states; its output hidden states.

        With ``stop_after``, the call ends once that module inside the layer has run (hooks on it
        have seen what they need) and returns None.
        """
        call = self.calls[index]
        self.calibration.rows = call.rows
        handle = stop_after.register_forward_hook(_stop) if stop_after is not None else None
        try:
            output = layer(hidden, *call.args, **call.kwargs)
        except _StopForward:
            return None
        finally:
            self.calibration.rows = None
            if handle is not None:
                handle.remove()
        return output[0] if isinstance(output, tuple) else output

    def run(self, layer: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """``layer`` on every batch: the next layer's hidden states."""
        return [self.call(layer, index, states) for index, states in enumerate(hidden)]


def _stop(module, args, output):
    raise _StopForward


def _token_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.bool()
    ids = batch.get("input_ids")
    if ids is None:
        ids = next(v for v in batch.values() if torch.is_tensor(v))
    return torch.ones(ids.shape[:2], dtype=torch.bool)


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    return int(_token_mask(batch).shape[0])
