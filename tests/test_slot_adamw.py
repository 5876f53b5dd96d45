"""`unmask.optimize.slot_adamw.SlotAdamW`: its hyperparameters are checked before the first step.

Its updates (per-weight step counts) are checked against the dense reference
`tests/reference_id3.py` through `SelectiveOptimizer` in `tests/test_optimizer.py`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_clear

from unmask.optimize.slot_adamw import SlotAdamW

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"lr": NAN}, "lr"),
        ({"lr": INF}, "lr"),
        ({"lr": torch.tensor(INF)}, "lr"),
        ({"eps": NAN}, "eps"),
        ({"eps": INF}, "eps"),
        ({"weight_decay": NAN}, "weight_decay"),
        ({"weight_decay": INF}, "weight_decay"),
        ({"betas": (NAN, 0.999)}, "betas"),
        ({"betas": (0.9, INF)}, "betas"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_slot_adamw_refuses_nonfinite_hyperparameters(options, name):
    with pytest.raises(ValueError) as err:
        SlotAdamW([torch.zeros(3, requires_grad=True)], **options)
    assert_clear(str(err.value), rf"^{name} must be .*finite.*, got", r"finite number")
