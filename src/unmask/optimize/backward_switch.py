"""Which backward the coming step runs: a cheaper one on the steps whose mask is known.

`freeze_unselected` turns `requires_grad` off on the candidates that hold no selected weight
once the mask is final (static methods from the start, increment methods after their last
unmask), so backward skips their weight gradients. `sparse_backward` installs `SparseBackward`
(`unmask.optimize.sparse_backward`), which computes only the selected weights' gradients, before
every step whose mask is already known: the final mask, or with `unmask_every` = k > 1 the mask
so far on the steps that unmask nothing; it is removed before a step that ranks every weight and
rebuilt when the mask has grown. While it is installed, this also averages the slots' gradients
under DDP and clips them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unmask.optimize.gradients import clip_grad_norm_, scale_to_norm
from unmask.optimize.selector import Selector
from unmask.optimize.sharding import world_size
from unmask.optimize.sparse_backward import SparseBackward


class BackwardSwitch:
    """Freezing and the sparse backward of one SelectiveOptimizer.

    Args:
        model: the model being trained.
        selector: the optimizer's selection (method, budget, candidates, slots).
        freeze_unselected, sparse_backward, unmask_every: the optimizer's options. None for
            freeze_unselected is on in low-memory mode; the sparse backward freezes the
            candidates holding no selected weight, while installed, unless it is False.
        low_memory: whether a gradient tap gathers (and clears) the slots' gradients.

    It holds no reference to the optimizer, so dropping the optimizer drops the sparse backward,
    whose finalizer gives the model back.

    Attributes:
        backward: the installed sparse backward, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        selector: Selector,
        *,
        freeze_unselected: bool | None,
        sparse_backward: bool,
        unmask_every: int,
        low_memory: bool,
    ) -> None:
        self.model, self.selector = model, selector
        self.freeze_idle = freeze_unselected is not False
        self.freeze_unselected = low_memory if freeze_unselected is None else freeze_unselected
        self.sparse_backward = sparse_backward
        self.unmask_every, self.low_memory = unmask_every, low_memory
        self.backward: SparseBackward | None = None
        self._averaged = False  # this step's slot gradients were all-reduced already

    def _budget_spent(self) -> bool:
        return self.selector.num_chosen >= self.selector.budget

    def freeze_if_final(self, calibrated: bool) -> None:
        """requires_grad=False on the candidates holding no slot, if the mask is final."""
        if not self.freeze_unselected or not calibrated:
            return
        method = self.selector.method
        if method.chooses_once or (method.grows_mask and self._budget_spent()):
            self.selector.freeze_unheld()

    def _sparse_next_step(self, steps_done: int, calibrated: bool) -> bool:
        """Whether step `steps_done` can run the sparse backward: its mask is already known
        (final, or `unmask_every` > 1 and the step unmasks nothing)."""
        method = self.selector.method
        if not self.sparse_backward or not calibrated or method.reselects:
            return False
        return method.chooses_once or self._budget_spent() or steps_done % self.unmask_every != 0

    def prepare(self, steps_done: int, calibrated: bool, reload: bool = False) -> None:
        """Install the sparse backward for step `steps_done` if it can run it (again, if the mask
        grew or was `reload`ed); remove it before a step that ranks every weight."""
        if not self._sparse_next_step(steps_done, calibrated):
            self.remove()
            return
        slots = self.selector.slots
        if self.backward is not None and self.backward.num_slots == slots.n and not reload:
            return
        self.remove()
        self.backward = SparseBackward(
            self.model, self.selector.params, slots, freeze_idle=self.freeze_idle
        )
        # From now on the sparse tensors' gradients accumulate in delta.grad during backward,
        # so gathering must not clear them; clear() clears them once a step has used them.
        slots.computed = frozenset(self.backward.sparse)
        slots.delta.grad.zero_()

    def refresh(self, steps_done: int, calibrated: bool, reload: bool = False) -> None:
        """After the mask or the calibration changed outside a step: `freeze_if_final`, then
        `prepare`."""
        self.freeze_if_final(calibrated)
        self.prepare(steps_done, calibrated, reload)

    def remove(self) -> None:
        """Give the model back its own forward and requires_grad flags (if installed)."""
        if self.backward is not None:
            self.backward.remove()
            self.backward = None
            self.selector.slots.computed = frozenset()

    def average_grads(self) -> None:
        """Under DDP, average the slots' gradients that the sparse backward computed, once per
        step (O(B); DDP itself averages only the parameters' `.grad`)."""
        if self.backward is None or self._averaged or world_size() == 1:
            return
        grads = self.selector.slots.delta.grad[: self.selector.slots.n]
        torch.distributed.all_reduce(grads)
        grads.div_(world_size())
        self._averaged = True

    def clear(self) -> None:
        """Forget this step's slot gradients (the tap clears its own in low-memory mode)."""
        self._averaged = False
        if self.backward is not None and not self.low_memory:
            self.selector.slots.delta.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, dense: list[Tensor], max_norm: float) -> Tensor:
        """Clipping while installed: the norm of the selected weights' gradients (gathered into
        the slots first) and of `dense`, the dense parameters' gradients. The dense-path
        candidates' `.grad` is scaled too, so that step()'s gathering reads the clipped values.
        Returns the norm before clipping."""
        self.average_grads()
        slots = self.selector.slots
        if not self.low_memory:
            slots.gather_grads()
        dense_path = [
            p.grad
            for i, p in enumerate(self.selector.params)
            if p.grad is not None and i not in slots.computed
        ]
        norm = clip_grad_norm_([slots.delta.grad, *dense], max_norm, None)
        scale_to_norm(dense_path, norm, max_norm)
        return norm

    @property
    def entries_computed(self) -> int:
        """Selected-weight gradients computed so far (0 while not installed)."""
        return 0 if self.backward is None else self.backward.entries_computed

    @property
    def sparse_names(self) -> list[str]:
        """Candidates whose selected gradients the sparse backward computes (empty while it is
        not installed)."""
        names = self.selector.names
        return [] if self.backward is None else [names[i] for i in self.backward.sparse]
