"""Unmasking schedules and the update count they imply."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import unmask
from unmask import SCHEDULES, LinearDecaySchedule, UniformSchedule, update_count
from unmask.choose.schedules import get_schedule

budgets = st.integers(min_value=1, max_value=10**6)
steps = st.integers(min_value=1, max_value=2000)
SCHEDULE_CLASSES = [UniformSchedule, LinearDecaySchedule]


def cumulative(schedule, budget, total_steps, horizon):
    """[cum(-1) = 0, cum(0), ..., cum(horizon - 1)]."""
    return [0] + [schedule.cumulative(t, budget, total_steps) for t in range(horizon)]


def per_step(cum):
    return [b - a for a, b in zip(cum, cum[1:], strict=False)]


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("cls", SCHEDULE_CLASSES)
@given(budget=budgets, total_steps=steps)
@example(budget=1, total_steps=1)
@example(budget=1, total_steps=2000)
@example(budget=10**6, total_steps=1)
@example(budget=10**6, total_steps=2000)
@example(budget=7, total_steps=3)
def test_cumulative_invariants(cls, budget, total_steps):
    schedule = cls()
    cum = cumulative(schedule, budget, total_steps, total_steps + 5)[1:]
    assert all(isinstance(c, int) for c in cum)
    assert all(0 <= c <= budget for c in cum)
    assert all(a <= b for a, b in zip(cum, cum[1:], strict=False)), "cumulative decreased"
    assert cum[total_steps - 1] == budget
    assert all(c == budget for c in cum[total_steps - 1 :])
    # Training past T (step() called more often than planned) never unmasks more.
    for t in (2 * total_steps, 10 * total_steps + 7, 10**9):
        assert schedule.cumulative(t, budget, total_steps) == budget


# ---------------------------------------------------------------------------- uniform


@given(budget=budgets, total_steps=steps)
@example(budget=1, total_steps=2000)
@example(budget=1999, total_steps=2000)
@example(budget=2001, total_steps=2000)
@example(budget=10, total_steps=4)
def test_uniform_spreads_the_remainder_evenly(budget, total_steps):
    cum = cumulative(UniformSchedule(), budget, total_steps, total_steps)
    u = per_step(cum)
    assert len(u) == total_steps
    assert sum(u) == budget
    assert max(u) - min(u) <= 1
    assert set(u) <= {budget // total_steps, -(-budget // total_steps)}
    # Not front-loaded (nor back-loaded): after step t, |Λ| is the ideal B(t+1)/T rounded down,
    # never ahead of it and less than one weight behind it.
    for t in range(total_steps):
        ideal = Fraction(budget * (t + 1), total_steps)
        assert ideal - 1 < cum[t + 1] <= ideal


@pytest.mark.parametrize(
    ("budget", "total_steps", "expected"),
    [
        (10, 4, [2, 3, 2, 3]),  # remainder 2 spread over the run, not [3, 3, 2, 2]
        (3, 6, [0, 1, 0, 1, 0, 1]),  # B < T: some steps unmask nothing
        (12, 4, [3, 3, 3, 3]),
        (5, 1, [5]),
    ],
)
def test_uniform_small_cases(budget, total_steps, expected):
    # Expected per-step counts worked out by hand from floor(B (t+1) / T).
    u = per_step(cumulative(UniformSchedule(), budget, total_steps, total_steps))
    assert u == expected


# ---------------------------------------------------------------------------- linear decay


@given(budget=budgets, total_steps=steps)
@example(budget=1, total_steps=2000)
@example(budget=10**6, total_steps=2000)
@example(budget=10**6, total_steps=2)
def test_linear_decay_is_front_loaded_and_decreasing(budget, total_steps):
    linear = cumulative(LinearDecaySchedule(), budget, total_steps, total_steps)
    uniform = cumulative(UniformSchedule(), budget, total_steps, total_steps)
    u = per_step(linear)
    assert sum(u) == budget
    # The real-valued per-step count d_t = B (2 (T - t) - 1) / T^2 strictly decreases; each
    # floored cumulative is within [x - 1, x] of its real value, so u_t lies in (d_t - 1, d_t + 1)
    # and u_{t+1} - u_t < (d_{t+1} - d_t) + 2 < 2, i.e. u_{t+1} <= u_t + 1.
    assert all(b <= a + 1 for a, b in zip(u, u[1:], strict=False))
    for t in range(total_steps):
        remaining = total_steps - t - 1
        ideal = budget * (1 - Fraction(remaining, total_steps) ** 2)
        assert ideal - 1 < linear[t + 1] <= ideal
        # B(1 - (1-x)^2) >= B x on [0, 1]: it never lags the uniform schedule.
        assert linear[t + 1] >= uniform[t + 1]


def test_linear_decay_front_loads_a_large_budget():
    budget, total_steps = 10**6, 100
    u = per_step(cumulative(LinearDecaySchedule(), budget, total_steps, total_steps))
    # d_0 = B (2T - 1) / T^2 ~ 2B/T at the start, d_{T-1} = B / T^2 at the end.
    assert abs(u[0] - budget * (2 * total_steps - 1) / total_steps**2) < 1
    assert abs(u[-1] - budget / total_steps**2) < 1
    assert u[0] > 100 * u[-1]


# ---------------------------------------------------------------------------- update count


def floor_sum(budget, total_steps):
    """sum_{t=0}^{T-1} floor(B (t+1) / T), written out independently."""
    total = 0
    for k in range(1, total_steps + 1):
        total += (budget * k) // total_steps
    return total


def closed_form(budget, total_steps):
    """The same sum without a loop.

    With g = gcd(B, T), the residues B k mod T for k = 0..T-1 run g times over the multiples of
    g in [0, T), so the fractional parts {B k / T} sum to g * (0 + 1 + ... + (T/g - 1)) / (T/g)
    = (T - g) / 2. The k = T term is whole, hence
        U = sum_{k=1}^{T} B k / T - (T - g) / 2 = B (T + 1) / 2 - (T - g) / 2.
    """
    twice = budget * (total_steps + 1) - (total_steps - math.gcd(budget, total_steps))
    assert twice % 2 == 0
    return twice // 2


@given(budget=budgets, total_steps=steps)
@example(budget=1, total_steps=1)
@example(budget=1, total_steps=2000)
@example(budget=10**6, total_steps=2000)
@example(budget=999_999, total_steps=1999)
def test_uniform_update_count_closed_form(budget, total_steps):
    count = update_count(UniformSchedule(), budget, total_steps)
    assert count == floor_sum(budget, total_steps)
    assert count == closed_form(budget, total_steps)
    assert count <= total_steps * budget  # never more than a static mask of size B

    # Ratio to the static mask's T*B updates. From the closed form,
    #     U / (T B) = (T + 1) / (2T) - (T - g) / (2 T B),
    # so the gap is exactly (T - g) / (2 T B): never negative, zero when T divides B (g = T), and
    # at most (T - 1) / (2 T B) < 1 / (2B), since g >= 1.
    ratio = Fraction(count, total_steps * budget)
    target = Fraction(total_steps + 1, 2 * total_steps)
    gap = target - ratio
    assert gap == Fraction(total_steps - math.gcd(budget, total_steps), 2 * total_steps * budget)
    assert 0 <= gap <= Fraction(total_steps - 1, 2 * total_steps * budget)
    assert gap < Fraction(1, 2 * budget)


@given(multiple=st.integers(min_value=1, max_value=500), total_steps=steps)
def test_uniform_update_count_when_t_divides_b(multiple, total_steps):
    budget = multiple * total_steps
    count = update_count(UniformSchedule(), budget, total_steps)
    assert 2 * count == budget * (total_steps + 1)


def test_update_count_is_about_half_of_static():
    # The paper's "factor of two": T*B / U -> 2 as T grows.
    budget, total_steps = 320_000, 2000
    count = update_count(UniformSchedule(), budget, total_steps)
    assert count == budget * (total_steps + 1) // 2
    assert 1.99 < total_steps * budget / count < 2.0


@given(budget=budgets, total_steps=steps)
def test_update_count_is_the_sum_of_cumulative(budget, total_steps):
    for cls in SCHEDULE_CLASSES:
        schedule = cls()
        expected = sum(schedule.cumulative(t, budget, total_steps) for t in range(total_steps))
        assert update_count(schedule, budget, total_steps) == expected
    # Front-loading unmasks earlier, so it costs at least as many updates as uniform.
    assert update_count(LinearDecaySchedule(), budget, total_steps) >= update_count(
        UniformSchedule(), budget, total_steps
    )


# ---------------------------------------------------------------------------- lookup


def test_schedule_table():
    assert set(SCHEDULES) == {"uniform", "linear-decay"}
    assert isinstance(get_schedule("uniform"), UniformSchedule)
    assert isinstance(get_schedule("linear-decay"), LinearDecaySchedule)
    custom = UniformSchedule()
    assert get_schedule(custom) is custom


@pytest.mark.parametrize("name", ["cosine", "Uniform", "", "linear_decay"])
def test_unknown_schedule_lists_valid_ones(name):
    with pytest.raises(ValueError, match=r"unknown schedule") as info:
        get_schedule(name)
    assert "'uniform'" in str(info.value)
    assert "'linear-decay'" in str(info.value)


def test_optimizer_rejects_unknown_schedule():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'.*'linear-decay'.*'uniform'"):
        unmask.SelectiveOptimizer(model, budget=4, total_steps=3, schedule="cosine", lr=1e-3)


def test_object_without_cumulative_is_rejected():
    with pytest.raises(TypeError, match=r"cumulative"):
        get_schedule(object())
