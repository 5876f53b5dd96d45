"""Repeat-S (the `id3-repeat` ablation): a fresh top-B every step.

Only the paper's comparison needs it. A weight that leaves the top-B keeps its slot and its
current value (its delta is frozen, not reset); one that comes back after a pause starts with
fresh optimizer state. The slots therefore grow past B (over-spending the budget) while at most
B of them train: `active` marks those, and the slots' `layout` holds only them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unmask.optimize.slots import SlotBuffers, pad


class RepeatSlots:
    """Which of `slots`' slots train this step (`active`, one bool per slot)."""

    def __init__(self, slots: SlotBuffers) -> None:
        self.slots = slots
        self.active = torch.zeros(slots.capacity, dtype=torch.bool, device=slots.index.device)

    @property
    def num_active(self) -> int:
        return int(self.active.sum())

    def reselect(self, chosen: Tensor) -> None:
        """Make `chosen` (ascending global indices, at most B) the training set: new weights
        get fresh slots, held ones are reactivated, all others pause."""
        slots, n = self.slots, self.slots.n
        if n:
            pos = torch.searchsorted(slots.sorted_index, chosen).clamp_(max=n - 1)
            found = slots.sorted_index[pos] == chosen
            kept = slots.sorted_slots[pos[found]]
        else:
            found = torch.zeros(chosen.numel(), dtype=torch.bool, device=chosen.device)
            kept = torch.zeros(0, dtype=torch.long, device=chosen.device)
        slots.assign(chosen[~found])
        self._fit()
        previously_active = self.active.clone()
        self.active.zero_()
        self.active[kept] = True
        self.active[n : slots.n] = True
        # A weight that comes back after a pause starts with fresh optimizer state.
        slots.reset_state(kept[~previously_active[kept]])
        slots.rebuild_layout(self.active)

    def step(self, inner: torch.optim.Optimizer) -> None:
        """Step `inner` on the slots; paused slots keep their delta (weight decay included)."""
        saved = self.slots.delta.clone()
        inner.step()
        torch.where(self.active, self.slots.delta, saved, out=self.slots.delta)

    def load(self, active: Tensor) -> None:
        """Restore the saved `active` flags of the first active.numel() slots."""
        self._fit()
        self.active.zero_()
        self.active[: active.numel()] = active.to(self.active.device)

    def _fit(self) -> None:
        """Follow the slot buffers when they grew."""
        if self.active.numel() < self.slots.capacity:
            self.active = pad(self.active, self.slots.capacity)
