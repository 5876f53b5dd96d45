"""Importance keys used to rank weights. Larger key = more important = chosen first.

Each function writes one key per weight into `out` (1-D float32, at least param.numel() long)
and returns the filled slice; it never allocates a tensor of the parameter's size unless noted.
"""

from __future__ import annotations

import torch
from torch import Tensor


def d3(param: Tensor, grad: Tensor, out: Tensor, eps: float, exp: float) -> Tensor:
    """D3 importance |g| / (|θ| + eps)^exp of every weight.

    exp = 0 and exp = 1 are computed directly; a weight with a zero gradient gets key 0.
    Any other exponent is ranked by the logarithm log|g| - exp * log(|θ| + eps), which orders
    weights the same way without overflowing for large |exp|; a zero gradient gets key -inf.
    `d3_floor(exp)` gives the key at or below which a weight is not eligible.
    """
    n = param.numel()
    out = out[:n]
    g = grad.detach().reshape(-1)
    if exp == 0:
        return _abs_into(g, out)
    p = param.detach().reshape(-1)
    if exp == 1:
        _abs_into(p, out).add_(eps)
        torch.div(g, out, out=out)
        return out.abs_()
    _abs_into(p, out).add_(eps).log_().mul_(-exp)
    # Allocates |g| once per tensor: only for exponents other than 0 and 1.
    return out.add_(g.abs().to(out.dtype).log_())


def d3_floor(exp: float) -> float:
    """Keys must be strictly above this to be selected: excludes zero-gradient weights."""
    return 0.0 if exp in (0, 1) else float("-inf")


def small_magnitude(param: Tensor, out: Tensor) -> Tensor:
    """-|θ|: the smallest-magnitude weights rank first (PaFi)."""
    return _abs_into(param.detach().reshape(-1), out[: param.numel()]).neg_()


def uniform_random(
    numel: int, out: Tensor, generator: torch.Generator, start: int = 0, count: int | None = None
) -> Tensor:
    """i.i.d. uniform keys: the top-B of these is a uniformly random subset of size B.

    Draws `numel` keys (one per weight of the tensor) and returns keys [start, start + count)
    (all of them by default), so a shard of a tensor gets exactly its part of the whole tensor's
    keys. Allocates `numel` keys.
    """
    count = numel - start if count is None else count
    keys = torch.rand(numel, generator=generator, dtype=out.dtype)
    return out[:count].copy_(keys[start : start + count])


def _abs_into(x: Tensor, out: Tensor) -> Tensor:
    if x.dtype == out.dtype:
        return torch.abs(x, out=out)
    return out.copy_(x).abs_()  # low-precision weights: upcast, then take the magnitude
