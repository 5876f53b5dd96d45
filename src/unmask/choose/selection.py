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

# torch.topk over one long 1-D tensor is slow on CPU (~130 ms for 11.7M floats at k=25). Instead
# the keys are cut into blocks of this length: a tensor's top-k lie in the k blocks with the
# largest maxima, so one max per block (a single fast pass) plus two small top-k's suffice.
_BLOCK = 128
# Below this many keys one plain top-k is cheaper than the few extra calls blocks need.
_SMALL = 16384
# The candidate pool is cut back to its top-k whenever it holds more than this many times k.
PRUNE_AT = 4


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


def select_top(
    sources: Sequence[KeySource], k: int, floor: float, device: torch.device | None = None
) -> Tensor:
    """Global indices (int64, ascending) of the at most `k` largest keys above `floor`.

    Keys that are NaN, +inf or -inf, or not strictly greater than `floor`, are never chosen, so
    fewer than `k` indices come back when fewer keys are eligible. `device`: where an empty
    result lives (no key tells it); a non-empty one lives with the keys.
    """
    return select_top_keys(sources, k, floor, device)[0]


def select_top_keys(
    sources: Sequence[KeySource], k: int, floor: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """`select_top`'s indices and, in the same order, their keys (what FSDP ranks exchange)."""
    if k <= 0 or not sources:
        return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, device=device)
    values, indices, hidden = [], [], []
    pooled = 0
    for source in sources:
        v, i, h = _candidates(source.fill(), k)
        keep = v > floor
        values.append(v[keep])
        indices.append(i[keep] + source.offset)
        hidden.append(h)
        pooled += values[-1].numel()
        if pooled > PRUNE_AT * k:
            # Keep the pool O(k) across many tensors: a candidate outside the pool's top-k has
            # k better ones, so it cannot be chosen (ties left out are refetched below).
            pool_v, pool_i = torch.cat(values), torch.cat(indices)
            best, _ = _top_positions(pool_v, pool_i, k)
            values, indices, pooled = [pool_v[best]], [pool_i[best]], k
    pool_v = torch.cat(values)
    pool_i = torch.cat(indices)
    if pool_v.numel() < k:
        # Fewer eligible candidates than wanted: each tensor's left-out keys are not eligible.
        return _ascending(pool_i, pool_v)
    chosen, kth = _top_positions(pool_v, pool_i, k)
    # A tensor may hold keys equal to the k-th value that its own top-k left out; they compete
    # on index, so fetch them all (rare: it needs an exact tie at the boundary).
    tied = (torch.stack(hidden).to(kth.device) == kth).nonzero().flatten().tolist()
    if not tied:
        return _ascending(pool_i[chosen], pool_v[chosen])
    extra = []
    for t in tied:
        keys = _finite_or_neg_inf(sources[t].fill())
        extra.append((keys == kth).nonzero().flatten() + sources[t].offset)
    extra_i = torch.cat(extra).to(pool_i.device)
    extra_i = extra_i[~torch.isin(extra_i, pool_i)]
    pool_i = torch.cat([pool_i, extra_i])
    pool_v = torch.cat([pool_v, kth.expand(extra_i.numel()).to(pool_v.dtype)])
    chosen, _ = _top_positions(pool_v, pool_i, k)
    return _ascending(pool_i[chosen], pool_v[chosen])


def _ascending(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    indices, order = indices.sort()
    return indices, values[order]


def _candidates(keys: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """A superset of the k largest keys: (values, flat indices, bound on the keys left out).

    The bound is at least every key not returned and at most the tensor's k-th largest key.
    """
    v, i, hidden = _block_topk(keys, k)
    if torch.isnan(v).any() or torch.isposinf(v).any():
        # NaN and +inf sort above everything and would crowd out real candidates.
        v, i, hidden = _block_topk(_finite_or_neg_inf(keys), k)
    return v, i, hidden


def _block_topk(keys: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    n = keys.numel()
    if k >= n:
        return keys.clone(), torch.arange(n, device=keys.device), _neg_inf(keys)
    size = _BLOCK
    while size > 4 and 2 * k * size >= n:  # keep the k best blocks well under half the tensor
        size //= 2
    if 2 * k * size >= n or n <= _SMALL:
        v, i = keys.topk(k, sorted=False)
        return v, i, v.min()
    rows = n // size
    blocks = keys[: rows * size].view(rows, size)
    maxima = blocks.amax(dim=1)
    best = maxima.topk(k, sorted=False).indices
    pool = blocks.index_select(0, best).flatten()
    where = (best.unsqueeze(1) * size + torch.arange(size, device=keys.device)).flatten()
    v, j = pool.topk(k, sorted=False)
    # Exact largest key left out: from the blocks not taken, or from the taken blocks' rest.
    hidden = torch.maximum(
        maxima.index_fill_(0, best, float("-inf")).max(),
        pool.index_fill_(0, j, float("-inf")).max(),
    )
    i = where[j]
    if rows * size < n:
        tail = keys[rows * size :]
        tv, ti, th = _block_topk(tail, min(k, tail.numel()))
        v, i = torch.cat([v, tv]), torch.cat([i, ti + rows * size])
        hidden = torch.maximum(hidden, th)
    return v, i, hidden


def _neg_inf(like: Tensor) -> Tensor:
    return torch.tensor(float("-inf"), device=like.device, dtype=like.dtype)


def _finite_or_neg_inf(keys: Tensor) -> Tensor:
    ninf = float("-inf")
    return keys.nan_to_num_(nan=ninf, posinf=ninf, neginf=ninf)


def lexicographic_top(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k entries with the largest value, lowest index first among equals; and the k-th value."""
    positions, kth = _top_positions(values, indices, k)
    return indices[positions], kth


def _top_positions(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Positions of `lexicographic_top`'s entries in `values` / `indices`; and the k-th value."""
    kth = values.topk(k, sorted=False).values.min()
    above = (values > kth).nonzero().flatten()
    tied = (values == kth).nonzero().flatten()
    needed = k - above.numel()
    tied = tied[torch.argsort(indices[tied])[:needed]]
    return torch.cat([above, tied]), kth
