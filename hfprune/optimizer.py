"""The pruner in a hand-written training loop: an optimizer wrapper.

Wrap the optimizer *after* ``accelerator.prepare`` so the wrapper sees accelerate's
gradient-accumulation state and its fp16 step-skipped flag::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    optimizer = PruneOptimizer(optimizer, pruner)

A plain torch optimizer works the same way, outside accelerate.
"""

from __future__ import annotations

import torch

from hfprune.pruner import Pruner


class PruneOptimizer(torch.optim.Optimizer):
    """Runs ``pruner`` around every real ``step()`` of ``optimizer``; delegates everything else.

    Micro-steps that accelerate turns into no-ops under gradient accumulation pass straight
    through, so strategies act once per real optimizer step, as under the Trainer.
    """

    # torch.optim.Optimizer.__init__ is not called: this object owns no parameters, it
    # forwards to the wrapped optimizer (the same pattern as accelerate's AcceleratedOptimizer).
    def __init__(self, optimizer: torch.optim.Optimizer, pruner: Pruner):
        self.optimizer = optimizer
        self.pruner = pruner

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

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
