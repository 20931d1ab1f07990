"""Schedules in steps and fractions, and the cubic sparsity ramp of the magnitude strategy."""

from __future__ import annotations

import pytest

from hfprune import Pruner
from hfprune.schedule import Schedule, ScheduleSpec

from conftest import tiny_bert


def test_fractions_resolve_against_total_steps_and_ints_stay_steps():
    assert ScheduleSpec(start=0.1, end=0.7, every=10).resolve(200) == Schedule(20, 140, 10)
    assert ScheduleSpec(start=5, end=50, every=5).resolve(None) == Schedule(5, 50, 5)
    assert ScheduleSpec(start=10, end=0.5).resolve(100) == Schedule(10, 50, 1)


def test_fractions_need_total_steps():
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        ScheduleSpec(end=0.5).resolve(None)


def test_mixed_start_after_end_is_caught_at_resolution():
    with pytest.raises(ValueError, match="start resolves to step 60, after end at step 50"):
        ScheduleSpec(start=60, end=0.5).resolve(100)


def test_update_steps_include_start_every_and_end():
    schedule = Schedule(start=3, end=12, every=4)
    assert [s for s in range(20) if schedule.is_update_step(s)] == [3, 7, 11, 12]
    assert schedule.progress(3) == 0.0 and schedule.progress(12) == 1.0 and schedule.progress(30) == 1.0
    assert schedule.progress(7) == pytest.approx(4 / 9)


def test_zero_length_schedule_acts_once_at_full_strength():
    schedule = Schedule(start=0, end=0, every=10)
    assert [s for s in range(5) if schedule.is_update_step(s)] == [0]
    assert schedule.progress(0) == 1.0


def test_magnitude_ramp_is_cubic_from_initial_to_final_sparsity():
    text = """version: 1
pruners:
  - strategy: magnitude
    targets: [Linear]
    schedule: {start: 10, end: 110, every: 10}
    config: {sparsity: 0.9, initial_sparsity: 0.1}
"""
    pruner = Pruner(text)
    pruner.attach(tiny_bert())
    pruner.start(total_steps=None)
    strategy = pruner.strategies[0]

    def ramp(step: int) -> float:
        return strategy.schedule.cubic_ramp(step, strategy.config.sparsity, strategy.config.initial_sparsity)

    assert ramp(0) == pytest.approx(0.1)
    assert ramp(10) == pytest.approx(0.1)
    assert ramp(60) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert ramp(110) == pytest.approx(0.9)
    assert ramp(500) == pytest.approx(0.9)


def test_the_last_update_step_catches_up_with_missed_updates():
    schedule = Schedule(start=10, end=40, every=10)
    assert [schedule.last_update_step(step) for step in (0, 9, 10, 19, 20, 39, 40, 99)] == [
        None,
        None,
        10,
        10,
        20,
        30,
        40,
        40,
    ]
