"""The learning rates a run will use: read ahead from a copy of its scheduler.

Proximal strategies shrink weights by ``lr * lam`` per step, so how far they get over a phase
depends on the learning rates summed over it. ``lam: auto`` needs that sum before the phase
runs. The scheduler knows it: a deep copy of it, stepped on a stand-in optimizer that holds
the same hyper-parameters and no parameters, gives the learning rate of every future step
without touching the real optimizer or scheduler (any torch scheduler, and the Trainer's,
which are ``LambdaLR``; accelerate's wrapper is seen through, and stepped as often per
optimizer step as it steps the scheduler it wraps). ``ReduceLROnPlateau`` moves with a metric
no one knows ahead: its current rate is taken to hold, with a warning.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch

logger = logging.getLogger("hfprune.learning_rates")


def future_learning_rates(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[list[float]]:
    """Per parameter group, the learning rate of this step and the ``steps - 1`` after it.

    ``optimizer`` holds this step's learning rates (read after its step, before the scheduler
    moves); with ``scheduler`` None they are taken to stay as they are.
    """
    now = [group["lr"] for group in optimizer.param_groups]
    if scheduler is None or steps <= 1:
        return [[lr] * max(steps, 0) for lr in now]
    scheduler, per_step = _unwrapped(scheduler)
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        logger.warning(
            "ReduceLROnPlateau changes the learning rate with a metric no one knows ahead: lam: auto takes "
            "the current rate to hold; set lam by hand if the plateau schedule will lower it much"
        )
        return [[lr] * steps for lr in now]
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
            for _ in range(per_step):
                if getattr(ahead, "_step_count", 0) <= getattr(ahead, "total_steps", float("inf")):
                    ahead.step()  # (a OneCycleLR steps no further than its total, as accelerate has it)
            rates.append([group["lr"] for group in stand_in.param_groups])
    return [list(column) for column in zip(*rates)]


def _unwrapped(scheduler) -> tuple[object, int]:
    """(the torch scheduler, how many times it steps per optimizer step): accelerate's
    ``AcceleratedScheduler`` steps the scheduler it wraps once per process unless batches are split."""
    inner = getattr(scheduler, "scheduler", None)
    if inner is None:
        return scheduler, 1
    if getattr(scheduler, "step_with_optimizer", True) and not getattr(scheduler, "split_batches", True):
        from accelerate.state import AcceleratorState

        return inner, AcceleratorState().num_processes
    return inner, 1
