"""`unmask.resolve_budget`: every accepted form, the rounding rule, and every rejection
with its message."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from conftest import assert_clear, tiny_bert
from hypothesis import example, given
from hypothesis import strategies as st

from unmask import SelectiveOptimizer, resolve_budget

BIG_POOL = 3 * 10**9  # large enough for "2G"; resolve_budget never allocates anything


# ---------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (1, 1),
        (5000, 5000),
        ("5000", 5000),
        ("100K", 100_000),
        ("100k", 100_000),
        (" 100K ", 100_000),
        ("1.5M", 1_500_000),
        ("2G", 2_000_000_000),
        ("0.5K", 500),
        (1e5, 100_000),
        (2.0, 2),
        (1.0, 1),  # a whole float >= 1 is a count, not "100%"
        (float(BIG_POOL), BIG_POOL),
    ],
)
def test_counts(budget, expected):
    result = resolve_budget(budget, BIG_POOL)
    assert result == expected
    assert type(result) is int


def test_count_equal_to_pool_is_allowed():
    assert resolve_budget(1000, 1000) == 1000
    assert resolve_budget("1K", 1000) == 1000


# ---------------------------------------------------------------------------- fractions


@pytest.mark.parametrize(
    ("budget", "pool", "expected"),
    [
        (0.001, 1_000_000, 1000),
        ("0.1%", 1_000_000, 1000),
        ("0.001", 1_000_000, 1000),
        (".25", 1000, 250),
        ("100%", 1234, 1234),
        ("50%", 10, 5),
        (0.5, 10, 5),
    ],
)
def test_fractions(budget, pool, expected):
    result = resolve_budget(budget, pool)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("budget", "pool", "expected"),
    [
        (0.26, 10, 3),  # 2.6 rounds to the nearest weight, up
        (0.24, 10, 2),  # 2.4 rounds down
        ("0.3", 7, 2),  # 2.1
        ("90%", 7, 6),  # 6.3
        ("95%", 7, 7),  # 6.65
    ],
)
def test_fraction_rounds_to_nearest(budget, pool, expected):
    assert resolve_budget(budget, pool) == expected


@pytest.mark.parametrize("budget", [1e-9, 1e-300, "0.0001%", "0.000001", 0.049])
def test_fraction_never_rounds_below_one(budget):
    assert resolve_budget(budget, 10) == 1


# ---------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (0, r"at least 1 weight, got 0"),
        (-3, r"at least 1 weight, got -3"),
        (0.0, r"positive finite number"),
        (-0.5, r"positive finite number"),
        (-1e5, r"positive finite number"),
        ("0", r"not a whole number of weights >= 1"),
        ("0K", r"not a whole number of weights >= 1"),
        ("0%", r"percentage must be in \(0, 100\]"),
        ("0.0", r"must be positive"),
    ],
)
def test_rejects_non_positive(budget, message):
    with pytest.raises(ValueError, match=message):
        resolve_budget(budget, 1000)


@pytest.mark.parametrize("budget", [1001, "1001", "1.5K", "2K", 2e3, "2G"])
def test_rejects_more_than_candidates(budget):
    with pytest.raises(ValueError, match=r"but only 1,000 weights are candidates"):
        resolve_budget(budget, 1000)


@pytest.mark.parametrize("budget", ["101%", "100.5%", "1000%"])
def test_rejects_percentage_above_100(budget):
    with pytest.raises(ValueError, match=r"percentage must be in \(0, 100\]"):
        resolve_budget(budget, 1000)


@pytest.mark.parametrize(
    "budget",
    ["0.1%%", "ten", "-5K", "-5", "5KB", "1e5", "", "  ", "%", "K", "1.5.0", "5 K", "0x10"],
)
def test_rejects_malformed_strings(budget):
    with pytest.raises(ValueError, match=r"cannot read budget"):
        resolve_budget(budget, 10**6)


@pytest.mark.parametrize("budget", ["1.5", "2.25", "0.0005K", "1.0000001M"])
def test_rejects_fractional_string_counts(budget):
    with pytest.raises(ValueError, match=r"not a whole number of weights"):
        resolve_budget(budget, 10**6)


@pytest.mark.parametrize("budget", [1.5, 2.25, 1000.5])
def test_rejects_fractional_float_counts(budget):
    with pytest.raises(ValueError, match=r"neither a fraction in \(0, 1\) nor a whole number"):
        resolve_budget(budget, 10**6)


@pytest.mark.parametrize("budget", [math.nan, math.inf, -math.inf])
def test_rejects_nan_and_infinity(budget):
    with pytest.raises(ValueError, match=r"positive finite number"):
        resolve_budget(budget, 10**6)


@pytest.mark.parametrize("budget", [True, False, None, [5], {"n": 5}, b"5K", object()])
def test_rejects_non_budget_types(budget):
    # bool is an int subclass, but True must not silently mean "1 weight".
    with pytest.raises(ValueError, match=r"cannot read budget"):
        resolve_budget(budget, 10**6)


# What the message of a malformed budget string says to write instead.
HOW_TO_WRITE = r"use a count \(5000, '100K', '1\.5M'\), a percentage \('0\.1%'\) or a fraction"


def refusal(budget: str, through: str) -> str:
    """The message with which `through` (resolve_budget, or SelectiveOptimizer on a tiny BERT)
    refuses `budget`."""
    with pytest.raises(ValueError) as err:
        if through == "SelectiveOptimizer":
            SelectiveOptimizer(tiny_bert(), method="id3", budget=budget, total_steps=3)
        else:
            resolve_budget(budget, 10**6)
    return str(err.value)


def case(budget: str, through: str, what: str, fix: str):
    return pytest.param(budget, through, what, fix, id=f"{through}-{budget}")


@pytest.mark.parametrize(
    ("budget", "through", "what", "fix"),
    [
        *[
            case(budget, "SelectiveOptimizer", rf"cannot read budget {re.escape(repr(budget))}",
                 HOW_TO_WRITE)
            for budget in ["0.1%%", "ten", "-5K"]
        ],
        *[
            case(budget, "resolve_budget",
                 rf"cannot read budget {re.escape(repr(budget))}: ',' is not part of a number",
                 r"write decimals with a dot \('0\.1%'")
            for budget in ["0,1%", "1,5M", "100,000", "0,001"]
        ],
        *[
            case(budget, "resolve_budget", r"is not part of a number", r"use a count \(5000")
            for budget in ["1_000", "5 %", "1e3"]
        ],
    ],
)  # fmt: skip
def test_a_malformed_budget_string_says_what_to_write(budget, through, what, fix):
    assert_clear(refusal(budget, through), what, fix)


# ---------------------------------------------------------------------------- properties


@given(data=st.data(), pool=st.integers(min_value=1, max_value=10**12))
def test_any_int_count_up_to_pool_is_returned_unchanged(data, pool):
    count = data.draw(st.integers(min_value=1, max_value=pool))
    assert resolve_budget(count, pool) == count
    assert resolve_budget(str(count), pool) == count


@given(thousands=st.integers(min_value=1, max_value=10**9))
def test_whole_suffixed_counts(thousands):
    assert resolve_budget(f"{thousands}K", 10**15) == thousands * 1000


@given(
    fraction=st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True),
    pool=st.integers(min_value=1, max_value=10**12),
)
@example(fraction=0.5, pool=1)
@example(fraction=1e-300, pool=10**12)
@example(fraction=1 - 2**-53, pool=10**12)
def test_fraction_is_nearest_weight_and_at_least_one(fraction, pool):
    result = resolve_budget(fraction, pool)
    exact = Fraction(fraction) * pool  # the float's exact value times the pool
    assert 1 <= result <= pool
    assert abs(result - exact) <= 1
    if exact >= Fraction(1, 2):
        # Nearest integer to fraction*pool, which is itself computed in float64 (relative
        # error <= 2^-53): off by at most 1/2 plus that rounding.
        assert abs(result - exact) <= Fraction(1, 2) + exact * Fraction(1, 2**53)
    else:
        assert result == 1


@given(
    millis=st.integers(min_value=1, max_value=99_999),
    pool=st.integers(min_value=1, max_value=10**9),
)
def test_percent_string_matches_fraction(millis, pool):
    # A percentage with up to three decimals: "12.345%" is the fraction 0.12345.
    text = f"{millis // 1000}.{millis % 1000:03d}%"
    result = resolve_budget(text, pool)
    exact = Fraction(millis, 100_000) * pool
    assert 1 <= result <= pool
    assert abs(result - exact) <= 1


# ---------------------------------------------------------------------------- exact decimal counts


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("16.1K", 16_100),
        ("1.001K", 1001),
        ("32.2K", 32_200),
        ("9007199254740993", 2**53 + 1),
    ],
)
def test_decimal_suffixed_counts_are_exact(budget, expected):
    assert resolve_budget(budget, 10**17) == expected
