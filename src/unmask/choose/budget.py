"""Parse a budget ("100K", "0.1%", 0.001, 5000) and resolve it to an exact number of weights."""

from __future__ import annotations

import math
import re
from decimal import Decimal

Budget = int | float | str

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([KMG]?)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_FRACTION = re.compile(r"^0?\.\d+$")


def resolve_budget(budget: Budget, num_candidates: int) -> int:
    """Return the budget as a number of weights out of `num_candidates`.

    Accepted forms:
      - an ``int`` >= 1, or a whole ``float`` >= 1 (``1e5``): a count of weights;
      - a ``float`` in (0, 1): a fraction of the candidates (``0.001`` is 0.1%);
      - a string count with an optional K/M/G suffix (``"100K"``, ``"1.5M"``), a percentage
        (``"0.1%"``) or a fraction (``"0.001"``).
    Fractions round to the nearest weight, but never below 1.

    Raises:
        ValueError: the budget is malformed, not positive, or larger than `num_candidates`.
    """
    count = _to_count(budget, num_candidates)
    if count > num_candidates:
        raise ValueError(
            f"budget {budget!r} is {count:,} weights, but only {num_candidates:,} weights are "
            "candidates; lower the budget or widen the candidates (include/exclude patterns)"
        )
    return count


def _to_count(budget: Budget, num_candidates: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int | float | str):
        raise ValueError(_malformed(budget))
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be at least 1 weight, got {budget}")
        return budget
    if isinstance(budget, float):
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"budget must be a positive finite number, got {budget}")
        if budget < 1:
            return _fraction(budget, num_candidates)
        if budget != int(budget):
            raise ValueError(
                f"budget {budget} is neither a fraction in (0, 1) nor a whole number of weights"
            )
        return int(budget)
    text = budget.strip().upper()
    # Only digits, dots and a K/M/G or % suffix: "0,1%" is not read as 1% (nor as 0.1%).
    if bad := "".join(sorted(set(re.sub(r"[0-9.KMG%]", "", budget.strip(), flags=re.I)))):
        if "," in bad:
            fix = "write decimals with a dot ('0.1%', '1.5M') and counts without separators"
        else:
            fix = _FORMS
        raise ValueError(f"cannot read budget {budget!r}: {bad!r} is not part of a number; {fix}")
    # Decimal, not float: "16.1K" is exactly 16100 and long counts keep every digit.
    if m := _PERCENT.match(text):
        percent = Decimal(m.group(1))
        if not 0 < percent <= 100:
            raise ValueError(f"budget {budget!r}: a percentage must be in (0, 100]")
        return _fraction(percent / 100, num_candidates)
    if _FRACTION.match(text):
        value = Decimal(text)
        if value <= 0:
            raise ValueError(f"budget must be positive, got {budget!r}")
        return _fraction(value, num_candidates)
    if m := _COUNT.match(text):
        value = Decimal(m.group(1)) * _SUFFIXES[m.group(2)]
        if value != value.to_integral_value() or value < 1:
            raise ValueError(f"budget {budget!r} is not a whole number of weights >= 1")
        return int(value)
    raise ValueError(_malformed(budget))


def _fraction(fraction: float | Decimal, num_candidates: int) -> int:
    return max(1, round(Decimal(fraction) * num_candidates))


def _malformed(budget: object) -> str:
    return f"cannot read budget {budget!r}: {_FORMS}"


_FORMS = "use a count (5000, '100K', '1.5M'), a percentage ('0.1%') or a fraction (0.001)"
