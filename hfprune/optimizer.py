"""The pruner in a hand-written training loop: an optimizer wrapper.

Wrap the optimizer *after* ``accelerator.prepare`` so the wrapper sees accelerate's
gradient-accumulation state and its fp16 step-skipped flag::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    optimizer = PruneOptimizer(optimizer, pruner)

A plain torch optimizer works the same way, outside accelerate.
"""

from __future__ import annotations

import functools
import inspect

import torch

from hfprune.pruner import Pruner


def _forwarded(name: str):
    """A method that runs the wrapped optimizer's ``name``: the inherited one would run on the wrapper, which
    holds no parameters or hooks."""

    @functools.wraps(getattr(torch.optim.Optimizer, name))
    def forward(self, *args, **kwargs):
        return getattr(self.optimizer, name)(*args, **kwargs)

    return forward


def _forwarding_optimizer_methods(wrapper: type) -> type:
    """``wrapper`` with every public method of this torch version's Optimizer that it does not define itself
    forwarded (hook registration, state_dict, zero_grad, ...), so one torch adds later is forwarded too."""
    for name in dir(torch.optim.Optimizer):
        method = inspect.getattr_static(torch.optim.Optimizer, name)
        if not name.startswith("_") and inspect.isfunction(method) and name not in vars(wrapper):
            setattr(wrapper, name, _forwarded(name))
    return wrapper


@_forwarding_optimizer_methods
class PruneOptimizer(torch.optim.Optimizer):
    """Runs ``pruner`` around every real ``step()`` of ``optimizer``; the rest is the wrapped optimizer's.

    Micro-steps that accelerate turns into no-ops under gradient accumulation pass straight
    through, so strategies act once per real optimizer step, as under the Trainer. Wrapping
    checks the optimizer against the pruner's strategies (:meth:`Pruner.check_optimizer`), so
    a strategy parameter in no param group fails here, as a recipe error.
    """

    # torch.optim.Optimizer.__init__ is not called: this object owns no parameters, hooks or state, it
    # forwards to the wrapped optimizer (the same pattern as accelerate's AcceleratedOptimizer): every public
    # method of torch.optim.Optimizer through the class decorator, other attributes through __getattr__.
    def __init__(self, optimizer: torch.optim.Optimizer, pruner: Pruner):
        self.optimizer = optimizer
        self.pruner = pruner
        pruner.check_optimizer(optimizer)

    def __getattr__(self, name: str):
        """Only reached for what the wrapper lacks: ``state``, ``defaults``, accelerate's ``gradient_state``,
        an optimizer's own extras."""
        if name == "optimizer":  # not set yet (an object being copied): no endless recursion
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    def step(self, closure=None):
        gradient_state = getattr(self.optimizer, "gradient_state", None)
        if gradient_state is not None and not gradient_state.sync_gradients:
            return self.optimizer.step(closure)
        self.pruner.before_optimizer_step(self.optimizer)
        loss = self.optimizer.step(closure)
        self.pruner.after_optimizer_step(
            self.optimizer, skipped=bool(getattr(self.optimizer, "step_was_skipped", False))
        )
        return loss

    def __repr__(self) -> str:
        return f"PruneOptimizer({self.optimizer!r})"
