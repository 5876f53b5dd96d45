"""Unmasking schedules: how many weights are selected after each optimizer step.

A schedule is a function of the step index only, so a resumed run reproduces it exactly.
`cumulative(t)` is |Λ| after step t (0-based): non-decreasing, equal to the budget from step
T-1 on, and never above it.
"""

from __future__ import annotations

from typing import Protocol


class Schedule(Protocol):
    """Number of weights selected after each step; see module docstring for the invariants."""

    name: str

    def cumulative(self, step: int, budget: int, total_steps: int) -> int: ...


class UniformSchedule:
    """u_t = B/T per step; the remainder is spread evenly (u_t is floor(B/T) or ceil(B/T)).

    cumulative(t) = floor(B * (t + 1) / T), so when B < T some steps unmask nothing.
    """

    name = "uniform"

    def cumulative(self, step: int, budget: int, total_steps: int) -> int:
        if step >= total_steps - 1:
            return budget
        return budget * (step + 1) // total_steps


class LinearDecaySchedule:
    """Front-loaded: the per-step count falls linearly from about 2B/T to 0.

    cumulative(t) = floor(B * (1 - (1 - (t + 1) / T)^2)). It explores more while the loss is
    high and leaves the last steps to train the chosen weights.
    """

    name = "linear-decay"

    def cumulative(self, step: int, budget: int, total_steps: int) -> int:
        if step >= total_steps - 1:
            return budget
        remaining = total_steps - step - 1
        # Exact integer arithmetic: B * (T^2 - remaining^2) / T^2, floored.
        return budget * (total_steps**2 - remaining**2) // total_steps**2


SCHEDULES: dict[str, type] = {
    UniformSchedule.name: UniformSchedule,
    LinearDecaySchedule.name: LinearDecaySchedule,
}


def get_schedule(schedule: str | Schedule) -> Schedule:
    """Return a schedule instance from its name or pass an instance through."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)} or pass an "
                "object with a cumulative(step, budget, total_steps) method"
            )
        return SCHEDULES[schedule]()
    if not callable(getattr(schedule, "cumulative", None)):
        raise TypeError("a schedule needs a cumulative(step, budget, total_steps) method")
    return schedule


def update_count(schedule: Schedule, budget: int, total_steps: int) -> int:
    """Scalar weight updates over T steps: sum over t of |Λ| after the selection of step t.

    For the uniform schedule with T dividing B this is B (T + 1) / 2, about half of the T * B
    updates of a static mask of the same size.
    """
    return sum(schedule.cumulative(t, budget, total_steps) for t in range(total_steps))


def check_total_steps(total_steps: int) -> int:
    """Validate T; returns it unchanged."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    return total_steps
