"""The torch optimizers SelectiveOptimizer wraps (one over the slot buffer, one over the dense
parameters): how they are built from the user's class and options, and how their state is
shown to torch.optim readers and counted."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from unmask.optimize.sharding import local as _local
from unmask.optimize.slot_adamw import SlotAdamW

# torch Adam/AdamW options that unmask's per-slot Adam cannot honour.
_NOT_IN_SLOT_ADAMW = ("amsgrad", "maximize", "differentiable", "foreach", "fused", "capturable")


def make_sparse_inner(
    cls: type[torch.optim.Optimizer], params: list[Tensor], kwargs: dict[str, Any], adam_step: str
) -> torch.optim.Optimizer:
    """The optimizer of the slot buffer: `SlotAdamW` (one step count per slot) for Adam/AdamW
    with adam_step="per-weight", else `cls` itself with `kwargs`.

    ValueError for an option SlotAdamW cannot honour (amsgrad, maximize, differentiable,
    foreach, fused, capturable set to True), TypeError for one `cls` does not know.
    """
    if adam_step == "global" or cls not in (torch.optim.Adam, torch.optim.AdamW):
        return cls(params, **kwargs)
    # SlotAdamW is one plain loop over one flat buffer: it has none of these variants, and
    # dropping an option the user asked for would change what they measure without a word.
    unsupported = {k for k, v in kwargs.items() if k in _NOT_IN_SLOT_ADAMW and v}
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


class WrappedState(Mapping):
    """Read-only view of the wrapped optimizers' per-parameter state, keyed by the tensors of
    `param_groups` (the slot buffer, the dense parameters), as torch.optim readers expect."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, param: Tensor) -> dict:
        for optimizer in self._optimizers:
            if param in optimizer.state:
                return optimizer.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[Tensor]:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


def torch_layout(inner_state_dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The wrapped optimizers' state_dicts merged into one in torch.optim's layout: `state`
    keyed by the position of each parameter in the concatenated `param_groups`, whose `params`
    are those positions. The per-parameter state dicts are shared, not copied."""
    state: dict[int, Any] = {}
    groups: list[dict[str, Any]] = []
    count = 0
    for saved in inner_state_dicts:
        position = {}  # this optimizer's own ids -> positions over all of them
        for group in saved["param_groups"]:
            ids = list(range(count, count + len(group["params"])))
            position.update(zip(group["params"], ids, strict=True))
            groups.append({**group, "params": ids})
            count += len(ids)
        state.update({position[old]: value for old, value in saved["state"].items()})
    return {"state": state, "param_groups": groups}


def state_bytes(buffers: list[Tensor], optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of `buffers` and of every tensor in the optimizers' state (this rank's part)."""
    tensors = buffers + [
        _local(v)
        for o in optimizers
        for per_param in o.state.values()
        for v in per_param.values()
        if torch.is_tensor(v)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)
