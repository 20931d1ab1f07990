"""The learning rates a run will use: read ahead from a copy of its scheduler.

Proximal strategies shrink weights by ``lr * lam`` per step, so how far they get over a phase
depends on the learning rates summed over it. ``lam: auto`` needs that sum before the phase
runs. The scheduler knows it: a deep copy of it, stepped on a stand-in optimizer that holds
the same hyper-parameters and no parameters, gives the learning rate of every future step
without touching the real optimizer or scheduler (any torch scheduler, and the Trainer's,
which are ``LambdaLR``; accelerate's wrapper is seen through).
"""

from __future__ import annotations

import copy
import warnings

import torch


def future_learning_rates(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[list[float]]:
    """Per parameter group, the learning rate of this step and the ``steps - 1`` after it.

    ``optimizer`` holds this step's learning rates (read after its step, before the scheduler
    moves); with ``scheduler`` None they are taken to stay as they are.
    """
    now = [group["lr"] for group in optimizer.param_groups]
    if scheduler is None or steps <= 1:
        return [[lr] * max(steps, 0) for lr in now]
    scheduler = getattr(
        scheduler, "scheduler", scheduler
    )  # accelerate's AcceleratedScheduler wraps the real one
    owner = scheduler.optimizer
    stand_in = torch.optim.SGD(
        [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [torch.zeros(0)]}
            for group in owner.param_groups
        ],
        lr=now[0],
    )
    ahead = copy.deepcopy(scheduler, memo={id(owner): stand_in})
    rates = [now]
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # "lr_scheduler.step() before optimizer.step()": the stand-in never steps
        for _ in range(steps - 1):
            ahead.step()
            rates.append([group["lr"] for group in stand_in.param_groups])
    return [list(column) for column in zip(*rates)]
