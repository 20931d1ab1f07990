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
        """Turn fractions into steps; ``total_steps`` is needed only when fractions are used."""
        if self.uses_fractions and not total_steps:
            raise ValueError(
                "this schedule uses fractions of training, so the total number of optimizer steps is needed"
            )
        start, end = (v if isinstance(v, int) else round(v * total_steps) for v in (self.start, self.end))
        if start > end:
            raise ValueError(f"start resolves to step {start}, after end at step {end}")
        return Schedule(start=start, end=end, every=self.every)


@dataclass(frozen=True)
class Schedule:
    """A schedule in optimizer steps. Step indices count from 0 (the first optimizer step)."""

    start: int
    end: int
    every: int

    def is_update_step(self, step: int) -> bool:
        """True at start, every ``every`` steps after it, and at end itself."""
        if not self.start <= step <= self.end:
            return False
        return (step - self.start) % self.every == 0 or step == self.end

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
        return self.end if step >= self.end else self.start + (step - self.start) // self.every * self.every

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
