"""Low-memory mode's gradient tap: each candidate's gradient is used in backward, then freed.

A post-accumulate-grad hook on every candidate tensor hands its fresh gradient to the tap,
which copies out the selected weights' gradients (into the slots' delta.grad), keeps the
tensor's own top-k candidates for this step (global index, key, gradient), adds its squared
norm for clipping, and frees the gradient. Peak gradient memory is one tensor's gradient plus
O(k + B).

Why the choice is exact: the k largest keys of all tensors lie in the union of each tensor's k
largest, and both orders break ties by the lowest index, so the top-k of the pool equals the
standard mode's choice. Gradient accumulation over micro-batches: selected weights' gradients
are summed exactly; a new weight's key is its largest per-micro-batch key among the
micro-batches where it was among its tensor's top-k, and its first update uses the sum of its
gradients over those micro-batches (exact for one micro-batch). Clipping uses the root of the
summed per-micro-batch squared norms.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from unmask.choose.methods import Method
from unmask.choose.selection import PRUNE_AT, lexicographic_top, select_top_keys
from unmask.optimize.gradients import scale_to_norm, squared_norm
from unmask.optimize.ranking import tensor_sources
from unmask.optimize.slots import SlotBuffers

# A tensor's weights are ranked in chunks of this many (4 MB of float32 keys).
KEY_CHUNK = 1 << 20
_NEG_INF = float("-inf")


class GradientTap:
    """The hooks and this step's candidate pool of low-memory mode.

    Args:
        params, names: the candidate tensors and their names, in model order.
        offsets: global index of each tensor's element 0.
        method: ranks the weights.
        slots: where selected weights' gradients go (their `layout`; `held()` are excluded).
        quota: how many weights the coming step unmasks (0: keep no candidates).

    The hooks hold only a weak reference to the tap: a dropped optimizer (and its tap) must
    not keep consuming the model's gradients. `close()` removes them.
    """

    def __init__(
        self,
        params: list[Tensor],
        names: list[str],
        offsets: list[int],
        method: Method,
        slots: SlotBuffers,
        quota: Callable[[], int],
    ) -> None:
        self.params, self.names, self.offsets = params, names, offsets
        self.method, self.slots, self.quota = method, slots, quota
        self.enabled = True  # off while calibrate() needs whole gradients
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (global index, key, grad)
        self.pending_count = 0
        self.seen: set[int] = set()  # tensors whose gradient came this step
        self.grad_sq = torch.zeros((), dtype=torch.float64, device=slots.offsets.device)
        this = weakref.ref(self)
        self.hooks = [
            p.register_post_accumulate_grad_hook(_TapHook(this, i)) for i, p in enumerate(params)
        ]

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the gradients alone meanwhile (calibration needs them whole)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def close(self) -> None:
        """Remove the hooks from the model."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def clear(self) -> None:
        """Forget this step's pool, norm and selected gradients (a new step starts)."""
        self.pending, self.pending_count, self.seen = [], 0, set()
        self.grad_sq.zero_()
        self.slots.delta.grad.zero_()

    def consume(self, i: int, param: Tensor) -> None:
        """Take what the step needs from tensor i's fresh gradient, then free the gradient."""
        grad = param.grad
        if grad is None or not self.enabled:
            return
        flat = grad.detach().reshape(-1)
        self.grad_sq += torch.linalg.vector_norm(flat, dtype=torch.float32).double().square()
        self.slots.take_grad(i, flat, accumulate=True)
        self.seen.add(i)
        k = self.quota()
        if k > 0 and flat.numel():
            self._add_candidates(i, param, flat, k)
        self.method.release(param)
        param.grad = None

    def best(self, k: int) -> tuple[Tensor, Tensor] | None:
        """This step's exact top-k: (ascending global indices, their summed gradients), or None
        when the pool is empty.

        Methods that rank without gradients (increment-pafi) also rank the tensors that got no
        gradient this step, as the standard mode does (their first update is then zero).
        """
        if not self.method.needs_grad:
            for i, p in enumerate(self.params):
                if i not in self.seen and p.numel():
                    self._add_candidates(i, p, None, k)
        if not self.pending:
            return None
        index, _, grads = self._merged(k)
        return index, grads

    def clip_grad_norm_(self, dense: list[Tensor], max_norm: float) -> Tensor:
        """Scale what this step will use (the selected weights' gradients, the pool's and the
        `dense` ones) so that the global L2 norm is <= max_norm; returns the norm before. The
        candidates' norm comes from the hooks (summed over micro-batches)."""
        grads = [self.slots.delta.grad, *dense, *(g for _, _, g in self.pending)]
        norm = (self.grad_sq + squared_norm(dense)).sqrt().cpu()
        return scale_to_norm(grads, norm, max_norm)

    def _add_candidates(self, i: int, param: Tensor, flat_grad: Tensor | None, k: int) -> None:
        """Keep tensor i's top-k (global index, key, gradient); cut the pool back to O(k)."""
        flat_param = param.detach().reshape(-1)
        numel = flat_param.numel()
        scratch = torch.empty(min(numel, KEY_CHUNK), dtype=torch.float32, device=param.device)
        sources = tensor_sources(
            self.method,
            self.names[i],
            flat_param,
            flat_grad,
            scratch,
            start=0,
            numel=numel,
            origin=self.offsets[i],
            chosen=self.slots.held().get(i),
            chunk=KEY_CHUNK,
        )
        index, keys = select_top_keys(sources, k, self.method.eligibility_floor())
        index, keys = index.to(param.device), keys.to(param.device)
        grads = (
            torch.zeros(index.numel(), dtype=self.slots.delta.dtype, device=param.device)
            if flat_grad is None
            else flat_grad.index_select(0, index - self.offsets[i]).to(self.slots.delta.dtype)
        )
        self.pending.append((index, keys, grads))
        self.pending_count += index.numel()
        if self.pending_count > PRUNE_AT * k:
            # Within one backward, a candidate outside the pool's top-k has k better ones.
            self.pending = [self._merged(k)]
            self.pending_count = self.pending[0][0].numel()

    def _merged(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The pool's at most k best (ascending global index, key, gradient).

        A weight that came back from several micro-batches takes its largest key (keys may be
        logarithms, so they are not added) and the sum of its gradients.
        """
        device = self.slots.offsets.device
        index = torch.cat([x for x, _, _ in self.pending]).to(device)
        keys = torch.cat([v for _, v, _ in self.pending]).to(device)
        grads = torch.cat([g for _, _, g in self.pending]).to(device)
        index, where = torch.unique(index, sorted=True, return_inverse=True)
        best = torch.full((index.numel(),), _NEG_INF, dtype=keys.dtype, device=device)
        best.scatter_reduce_(0, where, keys, reduce="amax")
        summed = torch.zeros(index.numel(), dtype=grads.dtype, device=device)
        summed.index_add_(0, where, grads)
        keep = best > self.method.eligibility_floor()
        index, best, summed = index[keep], best[keep], summed[keep]
        if index.numel() > k:
            top, _ = lexicographic_top(best, index, k)
            order = torch.searchsorted(index, top.sort().values)
            index, best, summed = index[order], best[order], summed[order]
        return index, best, summed


class _TapHook:
    """Post-accumulate-grad hook: hands tensor i's gradient to the tap while the tap lives."""

    def __init__(self, tap: weakref.ref, i: int) -> None:
        self.tap, self.i = tap, i

    def __call__(self, param: Tensor) -> None:
        tap = self.tap()
        if tap is not None:
            with torch.no_grad():
                tap.consume(self.i, param)
