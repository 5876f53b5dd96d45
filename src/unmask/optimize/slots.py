"""The selected weights' flat slot buffers: assign, layout, gather, write back, grow.

The selected weights live in flat buffers of *slots*, filled in the order the weights are
unmasked (a slot never changes owner):

    index[s]   global index of the weight in slot s (see `unmask.optimize.index_space`)
    base[s]    its pretrained value (float32, or float64 for float64 models)
    delta[s]   its change from the pretrained value; the wrapped optimizer's only parameter

Slots [0, n) are in use. Unused slots have zero gradient and zero optimizer state, so their
update is exactly zero. A weight's trained value is ``(base + delta).to(param.dtype)``, the same
expression a saved delta is applied with, so applying a delta reproduces the trained weights bit
for bit. Under FSDP the slots hold only the weights inside this process's shards (`origins`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from unmask.optimize.index_space import split_by_tensor
from unmask.optimize.sharding import local as _local

# (candidate position, its slots, the slots' flat indices into this process's part of it)
Layout = list[tuple[int, Tensor, Tensor]]


class SlotBuffers:
    """Flat buffers of `capacity` slots for weights of the candidate tensors `params`.

    Args:
        params: the candidate tensors, in model order.
        offsets: 1-D int64, global index of each full tensor's element 0.
        origins: global index of element 0 of this process's part of each tensor (= offsets
            unless sharded).
        capacity: slots to allocate; `assign` grows the buffers when more are needed.
        dtype: the master dtype of base and delta.

    Attributes kept up to date by `assign` / `rebuild_layout`:
        touched: per tensor holding slots, every slot of it, in ascending index order.
        layout: the slots that train (`touched`, or its active part for repeat-S).
        sorted_index / sorted_slots: the used slots' indices in ascending order, and the slots.
        inner: the wrapped optimizer stepping `delta` (set once built): `assign` zeroes its
            per-slot state, `grow` carries it over.
        computed: positions of the tensors whose slots' gradients the sparse backward adds
            into delta.grad during backward (`unmask.optimize.sparse_backward`): gathering
            leaves their slots alone (whatever their `.grad` holds: DDP may set it), and the
            owner clears delta.grad once a step has used it.
    """

    def __init__(
        self,
        params: list[Tensor],
        offsets: Tensor,
        origins: list[int],
        capacity: int,
        dtype: torch.dtype,
    ) -> None:
        device = offsets.device
        self.params, self.offsets, self.origins = params, offsets, origins
        self.capacity, self.n = capacity, 0
        self.delta = torch.zeros(capacity, dtype=dtype, device=device)
        self.delta.grad = torch.zeros_like(self.delta)
        self.base = torch.zeros_like(self.delta)
        self.index = torch.zeros(capacity, dtype=torch.long, device=device)
        self.inner: torch.optim.Optimizer | None = None
        self.computed: frozenset[int] = frozenset()
        self.touched: Layout = []
        self.layout: Layout = []
        self._layout_of: dict[int, tuple[Tensor, Tensor]] = {}
        self.sorted_index = torch.zeros(0, dtype=torch.long, device=device)
        self.sorted_slots = torch.zeros(0, dtype=torch.long, device=device)

    def assign(self, chosen: Tensor) -> None:
        """Give each global index in `chosen` (ascending, inside this process's parts) a fresh
        slot with its pretrained value as base, zero delta and zero optimizer state."""
        m = chosen.numel()
        if m == 0:
            return
        n = self.n
        if n + m > self.capacity:
            self.grow(max(2 * self.capacity, n + m))
        self.index[n : n + m] = chosen
        for i, lo, hi in split_by_tensor(chosen, self.offsets):
            local = chosen[lo:hi] - self.origins[i]
            flat = _local(self.params[i]).detach().view(-1)
            self.base[n + lo : n + hi] = flat.index_select(0, local).to(self.base.dtype)
        self.delta[n : n + m] = 0
        self.reset_state(torch.arange(n, n + m, device=chosen.device))
        self.n = n + m

    def reset_state(self, slots: Tensor) -> None:
        """Zero the wrapped optimizer's per-slot state (moments, step counts) of `slots`."""
        if self.inner is None or slots.numel() == 0:
            return
        for value in self.inner.state.get(self.delta, {}).values():
            if torch.is_tensor(value) and value.shape == self.delta.shape:
                value[slots] = 0

    def grow(self, capacity: int) -> None:
        """Grow the buffers to `capacity` slots, keeping the wrapped optimizer's state (which
        is re-keyed to the new `delta`, and its per-slot tensors padded with zeros)."""
        old = self.delta
        grown = pad(old, capacity)
        grown.grad = torch.zeros_like(grown)
        if self.inner is not None:
            self.inner.param_groups[0]["params"][0] = grown
            state = self.inner.state.pop(old, {})
            self.inner.state[grown] = {k: pad_like(v, old, capacity) for k, v in state.items()}
        self.delta = grown
        self.base = pad(self.base, capacity)
        self.index = pad(self.index, capacity)
        self.capacity = capacity

    def rebuild_layout(self, active: Tensor | None = None) -> None:
        """Recompute `touched` and `layout` from the used slots; `active` (bool per slot)
        restricts `layout` to the slots that train now (repeat-S)."""
        slots = torch.arange(self.n, device=self.index.device)
        order = torch.argsort(self.index[: self.n])
        self.sorted_index = self.index[: self.n][order]
        self.sorted_slots = slots[order]
        self.touched = self._group(self.sorted_slots, self.sorted_index)
        if active is None:
            self.layout = self.touched
        else:
            keep = active[self.sorted_slots]
            self.layout = self._group(self.sorted_slots[keep], self.sorted_index[keep])
        self._layout_of = {i: (s, local) for i, s, local in self.layout}

    def _group(self, slots: Tensor, index: Tensor) -> Layout:
        return [
            (i, slots[lo:hi], index[lo:hi] - self.origins[i])
            for i, lo, hi in split_by_tensor(index, self.offsets)
        ]

    def held(self) -> dict[int, Tensor]:
        """Per tensor holding slots: the ascending local flat indices of all its slots."""
        return {i: local for i, _, local in self.touched}

    def gather_grads(self) -> None:
        """delta.grad = the training slots' gradients read from the parameters' `.grad`
        (zero in other slots, and for tensors whose `.grad` is None; the `computed` tensors'
        slots keep what the sparse backward added)."""
        if not self.computed:
            self.delta.grad.zero_()
        for i, _, _ in self.layout:
            grad = None if i in self.computed else self.params[i].grad
            if grad is not None:
                self.take_grad(i, _local(grad).detach().reshape(-1), accumulate=False)

    def take_grad(self, i: int, flat_grad: Tensor, accumulate: bool) -> None:
        """Copy (or, `accumulate`, add) tensor i's training slots' gradients from its
        flattened gradient `flat_grad` into delta.grad."""
        entry = self._layout_of.get(i)
        if entry is None:
            return
        slots, local = entry
        picked = flat_grad.index_select(0, local).to(self.delta.dtype)
        if accumulate:
            self.delta.grad.index_add_(0, slots, picked)
        else:
            self.delta.grad.index_copy_(0, slots, picked)

    def write_back(self, layout: Layout) -> None:
        """param.view(-1)[i] = (base + delta).to(param.dtype) for the slots in `layout`."""
        values = self.base + self.delta
        for i, slots, local in layout:
            p = _local(self.params[i]).detach()
            new = values.index_select(0, slots).to(p.dtype)
            if p.is_contiguous():
                p.view(-1).index_copy_(0, local, new)
            else:  # channels_last and other strides: `local` indexes the logical order
                p.index_put_(torch.unravel_index(local, p.shape), new)

    def buffers(self) -> list[Tensor]:
        """The persistent buffers (for memory accounting)."""
        return [self.delta, self.delta.grad, self.base, self.index]


def pad(value: Tensor, capacity: int) -> Tensor:
    """A copy of 1-D `value` zero-padded to `capacity` elements."""
    grown = torch.zeros(capacity, dtype=value.dtype, device=value.device)
    grown[: value.numel()] = value
    return grown


def pad_like(value: object, old: Tensor, capacity: int) -> object:
    """`value` padded to `capacity` if it is a per-slot tensor of `old`'s shape, else as is."""
    if not torch.is_tensor(value) or value.shape != old.shape:
        return value
    return pad(value, capacity)
