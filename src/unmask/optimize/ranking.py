"""A method's ranking keys for one tensor, as `KeySource`s, with chosen weights excluded.

The standard mode ranks a whole tensor (or this process's FSDP shard of it) at once; the
low-memory mode ranks it in flat chunks sharing one scratch buffer, inside a backward hook. Both
build their sources here, so both give every weight the same key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unmask.choose.methods import Method
from unmask.choose.selection import KeySource

_NEG_INF = float("-inf")


def tensor_sources(
    method: Method,
    name: str,
    part: Tensor,
    signal: Tensor | None,
    scratch: Tensor,
    *,
    start: int,
    numel: int,
    origin: int,
    chosen: Tensor | None,
    chunk: int | None = None,
) -> list[KeySource]:
    """Key sources of the weights of `part`.

    Args:
        method: ranks the weights (`Method.shard_keys`).
        name: the parameter's name.
        part: this process's part of parameter `name`: elements [start, start + part.numel())
            of the flattened parameter, which has `numel` elements in all.
        signal: the same part of its gradient or Fisher sum, or None.
        scratch: 1-D float32 buffer the keys are written into, at least as long as one source.
        origin: global index of part's element 0 (the sources' indices are global).
        chosen: ascending flat indices into `part` of weights already selected, which get key
            -inf; or None.
        chunk: None ranks `part` whole, in its own shape; otherwise in flat chunks of `chunk`
            weights, so ranking needs O(chunk) memory on top of the gradient.
    """
    if chunk is None:

        def fill_whole() -> Tensor:
            keys = method.shard_keys(name, part, signal, scratch, start, numel)
            if chosen is not None:  # all inside the part: no search (and no device sync)
                keys.index_fill_(0, chosen, _NEG_INF)
            return keys

        return [KeySource(origin, fill_whole)]
    flat = part.detach().reshape(-1)
    flat_signal = None if signal is None else signal.reshape(-1)
    count = flat.numel()

    def source(a: int) -> KeySource:
        b = min(a + chunk, count)

        def fill() -> Tensor:
            piece = None if flat_signal is None else flat_signal[a:b]
            keys = method.shard_keys(name, flat[a:b], piece, scratch, start + a, numel)
            return _exclude(keys, chosen, a)

        return KeySource(origin + a, fill)

    return [source(a) for a in range(0, count, chunk)]


def _exclude(keys: Tensor, chosen: Tensor | None, a: int) -> Tensor:
    """Set to -inf the keys (of weights [a, a + keys.numel())) of the chosen weights there."""
    if chosen is not None:  # ascending: the part inside the keys' range is one slice
        bounds = torch.tensor([a, a + keys.numel()], device=chosen.device)
        lo, hi = torch.searchsorted(chosen, bounds).tolist()
        keys.index_fill_(0, chosen[lo:hi] - a, _NEG_INF)
    return keys
