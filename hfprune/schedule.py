"""When a recipe entry acts: the YAML spec and the schedule resolved to optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

StepOrFraction = StrictInt | StrictFloat


class ScheduleSpec(BaseModel):
    """``schedule: {start, end, every}`` as written in a recipe.

    Ints are optimizer steps; floats in [0, 1] are fractions of the run's total optimizer
    steps (so ``end: 1`` is step 1, ``end: 1.0`` the end of training).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    start: StepOrFraction = 0
    end: StepOrFraction = 1.0
    every: StrictInt = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check_bounds(self) -> ScheduleSpec:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value}: a float is a fraction of training and must be in [0, 1]")
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{name}={value}: a step must be >= 0")
        if type(self.start) is type(self.end) and self.start > self.end:
            raise ValueError(f"start ({self.start}) is after end ({self.end})")
        return self

    @property
    def uses_fractions(self) -> bool:
        return isinstance(self.start, float) or isinstance(self.end, float)

    def resolve(self, total_steps: int | None) -> Schedule:
        """The schedule in optimizer steps of a run of ``total_steps`` (None: length unknown).

        A fraction becomes the step at that fraction of the run, and at most the run's last
        step (index ``total_steps - 1``): ``end: 1.0`` is the last step, so the pattern is
        fixed by the end of training. A step number past the last step is refused once the
        run's length is known: the schedule would never end, and the model would not be what
        the recipe plans.
        """
        if self.uses_fractions and not total_steps:
            raise ValueError(
                "this schedule uses fractions of training, so the total number of optimizer steps is needed"
            )
        if total_steps is not None:
            last = total_steps - 1
            for name in ("start", "end"):
                value = getattr(self, name)
                if isinstance(value, int) and value > last:
                    raise ValueError(
                        f"{name} is step {value}, but this run's last optimizer step is {last} (steps count "
                        f"from 0 over {total_steps} steps): the schedule would never "
                        f"{'start' if name == 'start' else 'end'} and the planned pruning would not happen; "
                        f"use a step up to {last}, or a fraction such as {name}: 1.0"
                    )
        start, end = (
            v if isinstance(v, int) else min(round(v * total_steps), total_steps - 1)
            for v in (self.start, self.end)
        )
        if start > end:
            raise ValueError(f"start resolves to step {start}, after end at step {end}")
        return Schedule(start=start, end=end, every=self.every)


@dataclass(frozen=True)
class Schedule:
    """A schedule in optimizer steps. Step indices count from 0 (the first optimizer step).

    Every strategy reads the same moments from it: its phase is the steps in ``[start, end)``
    (:meth:`in_phase`), and its pattern is fixed right after step ``end`` (:meth:`has_ended`),
    so ``end`` is at most the run's last step (:meth:`ScheduleSpec.resolve`).
    """

    start: int
    end: int
    every: int

    def is_update_step(self, step: int) -> bool:
        """True at start, every ``every`` steps after it, and at end itself."""
        if not self.acts_at(step):
            return False
        return (step - self.start) % self.every == 0 or step == self.end

    def has_ended(self, step: int) -> bool:
        """True once step ``end`` has run: after ``step`` every strategy's result is final.

        The one definition of "the schedule has ended": strategies fix their pattern in
        ``on_step_end`` of the first real step for which it is true.
        """
        return step >= self.end

    def acts_at(self, step: int) -> bool:
        """True for steps in ``[start, end]``: the phase and the step that ends it, after which the pattern
        is fixed."""
        return self.start <= step <= self.end

    def in_phase(self, step: int) -> bool:
        """True for steps in ``[start, end)``: where penalty and gate strategies act before fixing their
        result."""
        return self.start <= step < self.end

    def last_update_step(self, step: int) -> int | None:
        """The latest update step (:meth:`is_update_step`) at or before ``step``; None before ``start``.

        Strategies that act at update steps compare it with the last one they acted for, so an
        update that a skipped (fp16 overflow) step missed is made at the next real step.
        """
        if step < self.start:
            return None
        if self.has_ended(step):
            return self.end
        return self.start + (step - self.start) // self.every * self.every

    def cubic_ramp(self, step: int, final: float, initial: float = 0.0) -> float:
        """``final + (initial - final) * (1 - progress)**3``: gradual pruning's target at ``step`` (Zhu &
        Gupta, 2017)."""
        return final + (initial - final) * (1.0 - self.progress(step)) ** 3

    def progress(self, step: int) -> float:
        """Fraction of the way from start to end at ``step``, clipped to [0, 1]."""
        if step >= self.end:
            return 1.0
        if step <= self.start:
            return 0.0
        return (step - self.start) / (self.end - self.start)
