"""Exact global top-k over many tensors, without concatenating them.

The k largest keys of a union of tensors lie inside the union of each tensor's own k largest, so
each tensor contributes at most k candidates and one small top-k over the pool decides. Ties are
broken by the lowest global index (tensor order, then flat index), so reruns, resumed runs and
distributed ranks that see the same keys choose the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# torch.topk over one long 1-D tensor is slow on CPU (~130 ms for 11.7M floats at k=25); as
# rows of this length it is ~10x faster, and the rows' top-k still contain the tensor's top-k.
_ROW = 65536


@dataclass
class KeySource:
    """One tensor's ranking keys.

    offset: global index of the tensor's element 0.
    fill: computes the 1-D keys (length = the tensor's numel) and returns them. It may reuse a
        scratch buffer, so it is called again whenever the keys are needed a second time.
        Weights that must not be chosen carry the key -inf.
    """

    offset: int
    fill: Callable[[], Tensor]


def select_top(sources: Sequence[KeySource], k: int, floor: float) -> Tensor:
    """Global indices (int64, ascending) of the at most `k` largest keys above `floor`.

    Keys that are NaN, +inf or -inf, or not strictly greater than `floor`, are never chosen, so
    fewer than `k` indices come back when fewer keys are eligible.
    """
    if k <= 0 or not sources:
        return torch.empty(0, dtype=torch.long)
    values, indices, hidden = [], [], []
    for source in sources:
        v, i, h = _candidates(source.fill(), k)
        keep = v > floor
        values.append(v[keep])
        indices.append(i[keep] + source.offset)
        hidden.append(h)
    pool_v = torch.cat(values)
    pool_i = torch.cat(indices)
    if pool_v.numel() <= k:
        return pool_i.sort().values
    chosen, kth = _lexicographic_top(pool_v, pool_i, k)
    # A tensor may hold keys equal to the k-th value that its own top-k left out; they compete
    # on index, so fetch them all (rare: it needs an exact tie at the boundary).
    tied = (torch.stack(hidden).to(kth.device) == kth).nonzero().flatten().tolist()
    if not tied:
        return chosen.sort().values
    extra = []
    for t in tied:
        keys = _finite_or_neg_inf(sources[t].fill())
        extra.append((keys == kth).nonzero().flatten() + sources[t].offset)
    extra_i = torch.cat(extra).to(pool_i.device)
    extra_i = extra_i[~torch.isin(extra_i, pool_i)]
    pool_i = torch.cat([pool_i, extra_i])
    pool_v = torch.cat([pool_v, kth.expand(extra_i.numel()).to(pool_v.dtype)])
    chosen, _ = _lexicographic_top(pool_v, pool_i, k)
    return chosen.sort().values


def _candidates(keys: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """A superset of the k largest keys: (values, flat indices, largest key possibly left out)."""
    v, i, hidden = _row_topk(keys, k)
    if torch.isnan(v).any() or torch.isposinf(v).any():
        # NaN and +inf sort above everything and would crowd out real candidates.
        v, i, hidden = _row_topk(_finite_or_neg_inf(keys), k)
    return v, i, hidden


def _row_topk(keys: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    n = keys.numel()
    neg_inf = torch.tensor(float("-inf"), device=keys.device, dtype=keys.dtype)
    if k >= n:
        return keys.clone(), torch.arange(n, device=keys.device), neg_inf
    if n <= _ROW or 16 * k > _ROW:
        v, i = keys.topk(k, sorted=False)
        return v, i, v.min()
    rows = n // _ROW
    v, i = keys[: rows * _ROW].view(rows, _ROW).topk(k, dim=1, sorted=False)
    hidden = v.min(dim=1).values.max()
    i = i + torch.arange(rows, device=keys.device).unsqueeze(1) * _ROW
    v, i = v.flatten(), i.flatten()
    if rows * _ROW < n:
        tv, ti, th = _row_topk(keys[rows * _ROW :], k)
        v, i = torch.cat([v, tv]), torch.cat([i, ti + rows * _ROW])
        hidden = torch.maximum(hidden, th)
    return v, i, hidden


def _finite_or_neg_inf(keys: Tensor) -> Tensor:
    ninf = float("-inf")
    return keys.nan_to_num_(nan=ninf, posinf=ninf, neginf=ninf)


def _lexicographic_top(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k entries with the largest value, lowest index first among equals; and the k-th value."""
    kth = values.topk(k, sorted=False).values.min()
    above = values > kth
    tied = (values == kth).nonzero().flatten()
    needed = k - int(above.sum())
    tied = tied[torch.argsort(indices[tied])[:needed]]
    return torch.cat([indices[above], indices[tied]]), kth
