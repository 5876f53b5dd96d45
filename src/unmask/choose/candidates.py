"""Which parameters compete for the budget, and which are trained densely."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn import Parameter

from unmask.choose.methods import Method

Patterns = str | Sequence[str] | None


@dataclass
class Candidates:
    """Parameters split by role, each list in `model.named_parameters()` order.

    sparse: parameters whose individual weights compete for the budget.
    dense: parameters trained whole by the wrapped optimizer (a new head; or all, for `full`).
    """

    sparse: list[tuple[str, Parameter]]
    dense: list[tuple[str, Parameter]]

    @property
    def sparse_numel(self) -> int:
        return sum(p.numel() for _, p in self.sparse)

    @property
    def dense_numel(self) -> int:
        return sum(p.numel() for _, p in self.dense)


def find_candidates(
    model: nn.Module, method: Method, include: Patterns, exclude: Patterns, dense: Patterns
) -> Candidates:
    """Split the model's trainable parameters into sparse candidates and dense parameters.

    Patterns are regular expressions searched in parameter names (``"attention"`` matches
    ``encoder.layer.0.attention.self.query.weight``). Only parameters with requires_grad=True
    take part. Raises ValueError when a pattern matches nothing or nothing is left to train.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "the model has no parameter with requires_grad=True; nothing can be fine-tuned"
        )
    include_re, exclude_re, dense_re = (
        _compile(x, trainable, role)
        for x, role in ((include, "include"), (exclude, "exclude"), (dense, "dense"))
    )
    dense_params = [(n, p) for n, p in trainable if _matches(dense_re, n)]
    sparse = [
        (n, p)
        for n, p in trainable
        if not _matches(dense_re, n)
        and (not include_re or _matches(include_re, n))
        and not _matches(exclude_re, n)
        and method.is_candidate(n, p)
    ]
    if method.trains_dense:
        chosen = {n for n, _ in dense_params + sparse}
        dense_params, sparse = [(n, p) for n, p in trainable if n in chosen], []
    elif not sparse:
        raise ValueError(
            f"no parameter is a candidate for method {method.name!r}: {method.no_candidate_hint()}"
        )
    for name, p in sparse:
        if not p.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous; call .contiguous() on it")
    devices = {p.device for _, p in sparse}
    if len(devices) > 1:
        raise ValueError(
            f"candidate parameters live on several devices ({sorted(map(str, devices))}); "
            "unmask needs them on one device"
        )
    return Candidates(sparse=sparse, dense=dense_params)


def _compile(patterns: Patterns, trainable: Iterable[tuple[str, Parameter]], role: str):
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in trainable]
    compiled = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{role} pattern {pattern!r} is not a valid regex: {err}") from err
        if not any(regex.search(n) for n in names):
            sample = ", ".join(names[:4])
            raise ValueError(
                f"{role} pattern {pattern!r} matches no trainable parameter; names look like: "
                f"{sample}, ..."
            )
        compiled.append(regex)
    return compiled


def _matches(regexes, name: str) -> bool:
    return any(r.search(name) for r in regexes)
