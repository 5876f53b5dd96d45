"""The global index space: the candidate tensors laid end to end, in model order.

A weight's global index is its tensor's offset (the summed numel of the full, unsharded tensors
before it) plus its flat index in that tensor. Selections, slots, checkpoints and deltas all
speak in global indices; this module is the one place that cuts them back per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def split_by_tensor(index: Tensor, offsets: Tensor) -> list[tuple[int, int, int]]:
    """Cut ascending global indices per tensor.

    Args:
        index: 1-D int64, ascending global indices.
        offsets: 1-D int64, ascending, offsets[i] = global index of tensor i's element 0.

    Returns:
        (tensor position i, start, end) for every tensor holding indices, in tensor order:
        index[start:end] are exactly the indices inside tensor i.
    """
    tensor_of = torch.searchsorted(offsets, index, right=True) - 1
    counts = torch.bincount(tensor_of, minlength=offsets.numel()).tolist()
    spans, start = [], 0
    for i, count in enumerate(counts):
        if count:
            spans.append((i, start, start + count))
            start += count
    return spans


def offsets_of(params: list[Tensor]) -> list[int]:
    """Global index of each tensor's element 0: the summed numel of the full (unsharded)
    tensors before it, so indices mean the same with or without FSDP."""
    numels = [p.numel() for p in params]
    return [sum(numels[:i]) for i in range(len(numels))]
