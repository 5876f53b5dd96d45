"""The torch optimizers SelectiveOptimizer wraps: one over the slot buffer, one over the dense
parameters, built from the user's class and options."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import torch
from torch import Tensor

from .slot_adamw import SlotAdamW


def make_sparse_inner(
    cls: type[torch.optim.Optimizer], params: list[Tensor], kwargs: dict[str, Any], adam_step: str
) -> torch.optim.Optimizer:
    """The optimizer of the slot buffer: `SlotAdamW` (one step count per slot) for Adam/AdamW
    with adam_step="per-weight", else `cls` itself."""
    if adam_step == "global" or cls not in (torch.optim.Adam, torch.optim.AdamW):
        return cls(params, **kwargs)
    unsupported = {
        k for k, v in kwargs.items() if k in ("amsgrad", "maximize", "differentiable") and v
    }
    if unsupported:
        raise ValueError(
            f"adam_step='per-weight' does not support {sorted(unsupported)}; "
            "pass adam_step='global' to use torch's optimizer as is"
        )
    signature = inspect.signature(cls).parameters
    options = {
        k: kwargs.get(k, signature[k].default) for k in ("lr", "betas", "eps", "weight_decay")
    }
    unknown = set(kwargs) - set(signature)
    if unknown:
        raise TypeError(f"{cls.__name__} got unexpected arguments {sorted(unknown)}")
    decoupled = cls is torch.optim.AdamW or bool(kwargs.get("decoupled_weight_decay", False))
    return SlotAdamW(params, decoupled=decoupled, **options)


def check_finite_options(cls: type, kwargs: dict[str, Any]) -> None:
    """Refuse a NaN or infinite float (alone, in a tuple/list, or a 0-d tensor) in `kwargs`.

    torch's optimizers accept lr=inf (and some NaNs), which would train to non-finite weights.
    """

    def finite(value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return all(finite(v) for v in value)
        if torch.is_tensor(value):
            return value.ndim != 0 or not value.is_floating_point() or bool(value.isfinite())
        if isinstance(value, numbers.Integral) or not isinstance(value, numbers.Real):
            return True
        return math.isfinite(value)  # float, numpy floats

    for name, value in kwargs.items():
        if not finite(value):
            raise ValueError(
                f"{getattr(cls, '__name__', cls)} option {name}={value!r} is not finite; "
                f"pass a finite number for {name}"
            )
