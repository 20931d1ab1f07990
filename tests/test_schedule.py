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


@pytest.mark.parametrize("total", [1, 2, 12, 25, 1000])
def test_a_fractional_end_of_1_is_the_last_step_so_the_schedule_ends_within_the_run(total):
    schedule = ScheduleSpec(end=1.0).resolve(total)
    assert schedule.end == total - 1
    assert schedule.has_ended(total - 1) and not schedule.has_ended(total - 2)


def test_fractions_that_round_past_the_last_step_are_the_last_step():
    # 0.96 of 12 steps is 11.52: step 12 would never run
    assert ScheduleSpec(start=0.5, end=0.96).resolve(12) == Schedule(6, 11, 1)


@pytest.mark.parametrize(
    ("spec", "name"), [({"end": 1000}, "end"), ({"start": 500}, "start"), ({"end": 12}, "end")]
)
def test_a_step_past_the_last_step_of_a_known_run_is_refused(spec, name):
    with pytest.raises(ValueError, match=rf"{name} is step \d+, but this run's last optimizer step is 11"):
        ScheduleSpec(**spec).resolve(12)


def test_the_last_step_itself_is_a_valid_end():
    assert ScheduleSpec(start=3, end=11).resolve(12) == Schedule(3, 11, 1)


def test_has_ended_is_true_from_step_end_on_and_acts_at_includes_it():
    schedule = Schedule(start=2, end=5, every=1)
    assert [s for s in range(8) if schedule.has_ended(s)] == [5, 6, 7]
    assert [s for s in range(8) if schedule.in_phase(s)] == [2, 3, 4]
    assert [s for s in range(8) if schedule.acts_at(s)] == [2, 3, 4, 5]


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
