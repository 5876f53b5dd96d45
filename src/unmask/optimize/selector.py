"""Which candidate weights hold slots, and when they get them.

The selector ranks the candidates with the method's keys, takes the schedule's quota each step
(increment), a fresh top-B (repeat) or one choice before training (static, all), agrees on it
over the FSDP ranks, and assigns the chosen weights their slots.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from unmask.choose.methods import Method
from unmask.choose.schedules import Schedule
from unmask.choose.selection import KeySource, select_top
from unmask.optimize.gradient_tap import GradientTap
from unmask.optimize.index_space import offsets_of
from unmask.optimize.ranking import tensor_sources
from unmask.optimize.repeat import RepeatSlots
from unmask.optimize.sharding import Shards
from unmask.optimize.sharding import local as _local
from unmask.optimize.slots import SlotBuffers


class Selector:
    """The selection of `budget` weights among the candidate tensors.

    Args:
        method, schedule, budget, total_steps: what is chosen, and how fast.
        candidates: (name, tensor) of the candidates, in model order.
        shards: where this rank's shards lie (FSDP), or None.
    """

    def __init__(
        self,
        method: Method,
        schedule: Schedule,
        budget: int,
        total_steps: int | None,
        candidates: list[tuple[str, Tensor]],
        shards: Shards | None,
    ) -> None:
        self.method, self.schedule = method, schedule
        self.budget, self.total_steps = budget, total_steps
        self.names = [n for n, _ in candidates]
        self.params = params = [p for _, p in candidates]
        self.offsets = offsets = offsets_of(params)
        self.shards = shards
        device = params[0].device if params else torch.device("cpu")
        # Where this process's part of each candidate starts in its flattened full tensor (0
        # unless sharded), and the global index of that part's element 0: slots, keys and
        # reads/writes of weights work on the local part, indices stay global.
        self.starts = shards.starts if shards else [0] * len(params)
        self.origins = [o + s for o, s in zip(offsets, self.starts, strict=True)]
        self._max_numel = max((_local(p).numel() for p in params), default=0)
        offsets_tensor = torch.tensor(offsets, dtype=torch.long, device=device)
        # float64 models keep float64 deltas; all others float32 (bf16 deltas would lose updates)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        self.slots = SlotBuffers(params, offsets_tensor, self.origins, budget, dtype)
        self.repeat = RepeatSlots(self.slots) if method.reselects else None

    @property
    def num_chosen(self) -> int:
        """Weights selected so far on all ranks together (this process's slots, unless sharded)."""
        return self.slots.n if self.shards is None else self.shards.chosen.numel()

    @property
    def num_training(self) -> int:
        """Weights that train in the coming step: the chosen ones, or repeat-S's active ones."""
        return self.num_chosen if self.repeat is None else self.repeat.num_active

    def quota(self, steps_done: int, unmask_every: int = 1) -> int:
        """How many weights step `steps_done` unmasks (increment methods; 0 once B is spent).
        With `unmask_every` = k: the schedule's count of steps s ... s + k - 1 on every k-th
        step s (capped at the last step T - 1), else 0."""
        k, s = unmask_every, steps_done
        if s % k:
            return 0
        ahead = s + k - 1 if self.total_steps is None else min(s + k - 1, self.total_steps - 1)
        chosen = self.num_chosen  # global under FSDP
        if not self.method.grows_mask or chosen >= self.budget:
            return 0
        target = self.schedule.cumulative(ahead, self.budget, self.total_steps)
        return min(target, self.budget) - chosen

    def choose_all(self) -> None:
        """Select every candidate weight (methods that select all)."""
        self.assign(torch.arange(self.budget, device=self.slots.offsets.device))

    def choose_once(self, signals: list[Tensor] | None) -> None:
        """Select the budget's best weights by `signals` (None: the weights alone). Collective
        under FSDP."""
        self.assign(self._select(self.sources(signals, exclude=False), self.budget))

    def unmask(self, k: int, tap: GradientTap | None) -> None:
        """Select the k best weights not yet selected, ranked on the parameters' `.grad`, or
        on what the low-memory `tap` kept of them."""
        if tap is not None:
            self._unmask_from_tap(tap, k)
            return
        if k <= 0:
            return
        signals = [p.grad for p in self.params] if self.method.needs_grad else None
        if self.method.allocation_of() == "proportional":
            k -= self._unmask_proportional(signals, k)
        self.assign(self._select(self.sources(signals, exclude=True), k))

    def _unmask_from_tap(self, tap: GradientTap, k: int) -> None:
        """Select the k best weights the low-memory hooks kept this step, with their gradients
        (the standard mode's choice; see `unmask.optimize.gradient_tap`)."""
        best = tap.best(k) if k > 0 else None
        if best is None:
            return
        index, grads = best
        n = self.slots.n
        self.assign(index)
        self.slots.delta.grad[n : self.slots.n] = grads

    def tap(self, quota: Callable[[], int]) -> GradientTap:
        """Hooks that feed the candidates' gradients to this selection in backward."""
        return GradientTap(self.params, self.names, self.offsets, self.method, self.slots, quota)

    def update(self, inner: torch.optim.Optimizer) -> None:
        """Step `inner` on the slots (whose delta.grad is gathered) and write the training
        slots' new values into the model."""
        if self.repeat is not None:
            self.repeat.step(inner)
        else:
            inner.step()
        self.slots.write_back(self.slots.layout)

    def gradients_finite(self, gather: bool) -> bool:
        """Whether the training slots' gradients are finite (this process's); `gather`: read
        them from the parameters' `.grad` first."""
        if not self.slots.layout:
            return True
        if gather:
            self.slots.gather_grads()
        return bool(torch.isfinite(self.slots.delta.grad).all())

    def freeze_unheld(self) -> None:
        """requires_grad=False on the candidates that hold no slot (the mask is final)."""
        holding = self.slots.held()
        for i, p in enumerate(self.params):
            if i not in holding:
                p.requires_grad_(False)

    def buffers(self) -> list[Tensor]:
        """The persistent buffers of the slots (for memory accounting)."""
        extra = [] if self.repeat is None else [self.repeat.active]
        return self.slots.buffers() + extra

    def reselect(self) -> None:
        """Repeat-S: the budget's best weights by this step's gradients train this step."""
        grads = [p.grad for p in self.params]
        chosen = select_top(
            self.sources(grads, exclude=False),
            self.budget,
            self.method.eligibility_floor(),
            self.slots.offsets.device,
        )
        self.repeat.reselect(chosen)

    def _unmask_proportional(self, signals: list[Tensor | None] | None, k: int) -> int:
        """Top each tensor up towards its size's share of the schedule's count, in model order
        while the quota k lasts; returns how many weights were unmasked (at most k)."""
        target = min(self.num_chosen + k, self.budget)
        total = sum(p.numel() for p in self.params)
        held = dict.fromkeys(range(len(self.params)), 0)
        held.update({i: local.numel() for i, local in self.slots.held().items()})
        chosen = []
        sources = self.sources(signals, exclude=True, with_tensor=True)
        for i, source in sources:
            want = target * self.params[i].numel() // total - held[i]
            if want > 0:
                floor = self.method.eligibility_floor()
                chosen.append(select_top([source], min(want, k), floor, self.slots.offsets.device))
                k -= chosen[-1].numel()
        if not chosen:
            return 0
        picked = torch.cat(chosen).sort().values
        self.assign(picked)
        return picked.numel()

    def _select(self, sources: list[KeySource], k: int) -> Tensor:
        """Ascending global indices of the at most k best eligible keys; under FSDP, over every
        rank's shards and the same on every rank (collective)."""
        floor = self.method.eligibility_floor()
        if self.shards is None:
            return select_top(sources, k, floor, self.slots.offsets.device)
        return self.shards.select(sources, k, floor)

    def sources(
        self, signals: list[Tensor | None] | None, exclude: bool, with_tensor: bool = False
    ) -> list:
        """One key source per candidate (per candidate with a signal, if `signals` is given);
        `exclude`: the weights already selected get key -inf; `with_tensor`: (position, source)
        pairs."""
        scratch = torch.empty(
            self._max_numel, dtype=torch.float32, device=self.slots.offsets.device
        )
        held = self.slots.held() if exclude else {}
        sources = []
        for i, (name, p) in enumerate(zip(self.names, self.params, strict=True)):
            signal = signals[i] if signals is not None else None
            if signals is not None and signal is None:
                continue
            (source,) = tensor_sources(
                self.method,
                name,
                _local(p),
                None if signal is None else _local(signal),
                scratch,
                start=self.starts[i],
                numel=p.numel(),
                origin=self.origins[i],
                chosen=held.get(i),
            )
            sources.append((i, source) if with_tensor else source)
        return sources

    def assign(self, chosen: Tensor) -> None:
        """Give each global index in `chosen` (ascending) a fresh slot with zero delta and state.

        Under FSDP `chosen` is the global choice (the same on every rank); this rank records it
        and assigns slots to the part inside its own shards.
        """
        if self.shards is not None:
            chosen = self.shards.take(chosen)
        if chosen.numel():
            self.slots.assign(chosen)
            self.slots.rebuild_layout()

    def selected(self) -> dict[str, Tensor]:
        """Per candidate holding training slots, the ascending flat indices of its selected
        weights (int64). Under FSDP every rank's selection, in full-tensor indices."""
        if self.shards is not None:
            return {self.names[i]: flat for i, flat in self.shards.chosen_by_tensor()}
        return {self.names[i]: local.clone() for i, _, local in self.slots.layout}

    def counts(self) -> dict[str, int]:
        """Per candidate holding slots, how many of its weights may have changed (global)."""
        if self.shards is not None:
            return {self.names[i]: flat.numel() for i, flat in self.shards.chosen_by_tensor()}
        return {self.names[i]: int(v.numel()) for i, v in self.slots.held().items()}

    def trained(self) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Per candidate holding slots: (flat indices, deltas) and the base values, on the CPU,
        indices int32 where they fit. Under FSDP every rank's slots (collective)."""
        s = self.slots
        if self.shards is None:
            entries = [(i, local, s.delta[slots], s.base[slots]) for i, slots, local in s.touched]
        else:
            entries = self.shards.gather_selected(s.index[: s.n], s.delta[: s.n], s.base[: s.n])
        sparse, base_values = {}, {}
        for i, flat, change, base in entries:
            index_dtype = torch.int32 if self.params[i].numel() < 2**31 else torch.long
            sparse[self.names[i]] = (flat.to(index_dtype).cpu(), change.cpu())
            base_values[self.names[i]] = base.cpu()
        return sparse, base_values
