"""SelectiveOptimizer: only selected individual weights ever change; state scales with budget B.

Data layout. The selected weights live in flat buffers of B *slots*, filled in the order the
weights are unmasked (a slot never changes owner, except for the `repeat` ablation, which grows
its buffers instead):

    index[s]   global index of the weight in slot s (tensor offset + flat index)
    base[s]    its pretrained value (float32, or float64 for float64 models)
    delta[s]   its change from the pretrained value; the wrapped torch optimizer's only parameter

Each step gathers the selected weights' gradients into delta.grad (zero in unused slots, whose
moments therefore stay zero and whose update is exactly zero), steps the wrapped optimizer on
`delta`, and writes ``param.view(-1)[i] = (base + delta).to(param.dtype)`` back. Saved deltas are
applied with the same expression, so applying a delta reproduces the trained weights bit for bit.
No other weight is ever written: unselected weights stay bit-identical to the pretrained ones.

Weight decay acts on `delta`, i.e. it pulls a selected weight towards its *pretrained* value,
never towards zero, and it never touches an unselected weight.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .budget import Budget, resolve_budget
from .candidates import Patterns, find_candidates
from .delta import SparseDelta
from .methods import Method, make_method
from .schedules import Schedule, check_total_steps, get_schedule
from .selection import KeySource, lexicographic_top, select_top, select_top_keys
from .sharding import Shards, world_size
from .sharding import full as _full
from .sharding import local as _local
from .slot_adamw import SlotAdamW

STATE_VERSION = 1
# Low-memory mode ranks a tensor's weights in chunks of this many (4 MB of float32 keys).
_KEY_CHUNK = 1 << 20
_NEG_INF = float("-inf")


class SelectiveOptimizer(torch.optim.Optimizer):
    """Wrap a torch optimizer so that it trains at most `budget` individual weights of `model`.

    Args:
        model: the model being fine-tuned. Its trainable parameters are the candidates.
        method: a name from `unmask.METHODS` ("id3", "id3-repeat", "increment-pafi", "pafi",
            "random", "fish", "bitfit", "full") or a `Method` instance.
        budget: weights that may change, as a count (5000, "100K") or a fraction of the
            candidates (0.001, "0.1%"); see `resolve_budget`. Not used by "bitfit" and "full"
            (leave it None): they train every bias / every weight.
        total_steps: T, the number of optimizer steps over which ID3 spends the budget.
            Required for "id3", "id3-repeat" and "increment-pafi".
        optimizer: the torch optimizer class to wrap. Any optimizer whose update is elementwise
            and whose per-weight state has the parameter's shape works (AdamW, Adam, SGD with
            momentum, RMSprop, Adagrad, ...).
        include, exclude: regexes searched in parameter names that choose the candidates.
        dense: regexes of parameters trained whole (e.g. a new classification head). They are
            saved whole in the delta and, if `dense_in_budget`, their size counts against B.
        schedule: "uniform" (default), "linear-decay", or a `Schedule`.
        adam_step: for Adam/AdamW, "per-weight" (each weight's bias correction uses the number
            of updates it has received) or "global" (torch's own optimizer: one step count for
            all, so a weight unmasked late takes larger first steps). Ignored otherwise.
        score_eps, score_exp: ε and exp of the D3 score |g| / (|θ| + ε)^exp.
        seed: seed of the "random" method.
        max_nonfinite_steps: a step whose selected or dense gradients hold NaN or inf is
            skipped (nothing is unmasked or updated, the step counter does not advance, a
            RuntimeWarning is issued); after more than this many skips in a row, step() raises
            FloatingPointError.
        freeze_unselected: once the selection is final (static methods from the start,
            increment methods after their last unmask), set requires_grad=False on candidate
            tensors that hold no selected weight, so backward stops computing their gradients.
            None (default): on in low-memory mode, off otherwise.
        low_memory: process each candidate tensor's gradient during backward, as soon as it
            is ready (a post-accumulate-grad hook): copy out its selected weights' gradients,
            keep its own top-k candidates for this step (score, index, gradient), then free it.
            Peak gradient memory is one tensor's gradient plus O(B); the selected weights and
            the trained values are the same as in the standard mode. The candidates' `.grad`
            is therefore None after backward: clip with `clip_grad_norm_` of this optimizer.
            Gradient accumulation over micro-batches: selected weights' gradients are summed
            exactly; a new weight's score is its largest per-micro-batch score among the
            micro-batches where it was among its tensor's top-k, and its first update uses the
            sum of its gradients over those micro-batches (exact for one micro-batch). The hooks
            stay on the model until `close()`. Not available for "id3-repeat" and "full".
        **optimizer_kwargs: passed to the wrapped optimizer (lr, weight_decay, betas, ...).

    Weights whose score is zero or not finite are never selected; the schedule's quota they
    leave unused carries over to the next step (so |Λ| may lag the schedule, never exceed it).

    FSDP2 (`fully_shard`, every trained parameter a DTensor with placement Shard(0) on a 1-D
    mesh): build the optimizer on every rank, on the sharded model. Indices stay those of the
    unsharded tensors, and every rank makes the same selection, the one a single process would
    make from the same gradients (see `unmask.sharding`). What is per rank: the slots and the
    wrapped optimizers' state (each rank keeps the selected weights inside its own shards), and
    `state_dict()` / `load_state_dict()` (each rank saves and loads its own, with the same
    number of ranks). What is global (the same on every rank): `num_selected`, `num_changed`,
    `selected()`, `allocation()`, the schedule, and `delta()`, which is collective (every rank
    must call it; all get the same delta, and rank 0 saves it). The construction of a static
    method, `calibrate()`, `step()`, `delta()` and `clip_grad_norm_()` communicate, so every
    rank calls them equally often. Not available under FSDP: `low_memory`,
    `freeze_unselected`, "id3-repeat".
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method = "id3",
        budget: Budget | None = None,
        total_steps: int | None = None,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        include: Patterns = None,
        exclude: Patterns = None,
        dense: Patterns = None,
        dense_in_budget: bool = True,
        schedule: str | Schedule = "uniform",
        adam_step: str = "per-weight",
        score_eps: float = 1e-3,
        score_exp: float = 1.0,
        seed: int = 0,
        max_nonfinite_steps: int = 10,
        freeze_unselected: bool | None = None,
        low_memory: bool = False,
        **optimizer_kwargs: Any,
    ) -> None:
        # First, before anything is attached to the model: torch's optimizers accept lr=inf
        # (and some NaNs), which would train to non-finite weights.
        _check_finite_options(optimizer, optimizer_kwargs)
        self.model = model
        self.method = make_method(method, score_eps=score_eps, score_exp=score_exp, seed=seed)
        self.schedule = get_schedule(schedule)
        if adam_step not in ("per-weight", "global"):
            raise ValueError(f"adam_step must be 'per-weight' or 'global', got {adam_step!r}")
        kind = self.method.kind
        if kind in ("increment", "repeat") and total_steps is None:
            raise ValueError(
                f"method {self.method.name!r} spreads the budget over the training run: pass "
                "total_steps=T (the number of optimizer steps)"
            )
        self.total_steps = None if total_steps is None else check_total_steps(total_steps)
        if low_memory and self.method.allocation_of() != "global":
            raise ValueError(
                f"low_memory=True is not available with allocation="
                f"{self.method.allocation_of()!r} yet; use the standard mode"
            )
        if low_memory and kind in ("repeat", "dense"):
            raise ValueError(
                f"low_memory=True is not available for method {self.method.name!r}: it needs "
                "every weight's gradient at once; use the standard mode (low_memory=False)"
            )
        if not self.method.distributed and world_size() > 1:
            raise ValueError(
                f"method {self.method.name!r} ranks with statistics each process gathers from "
                "its own batch, so the processes would select different weights; it runs in a "
                "single process only: use 'id3' under torch.distributed"
            )
        self.method.attach(model)
        cands = find_candidates(model, self.method, include, exclude, dense)
        self.method.bind(model, [p for _, p in cands.sparse])
        self._names = [n for n, _ in cands.sparse]
        self._params = [p for _, p in cands.sparse]
        # Offsets over the full (unsharded) tensors: the global index space of the selection
        # and of deltas, the same with or without FSDP.
        numels = [p.numel() for p in self._params]
        self._offsets_list = [sum(numels[:i]) for i in range(len(numels))]
        self._shards = Shards.detect(cands.sparse + cands.dense, self._params, self._offsets_list)
        if self._shards is not None:
            _refuse_under_fsdp(self.method, freeze_unselected, low_memory)
        elif low_memory and world_size() > 1:
            raise ValueError(
                "low_memory=True reads each gradient in backward, before DDP averages it over "
                f"the {world_size()} processes, so they would select different weights; "
                "use low_memory=False under torch.distributed"
            )
        self._dense_names = [n for n, _ in cands.dense]
        self._dense_params = [p for _, p in cands.dense]
        self._dense_numel = cands.dense_numel
        self.budget = self._sparse_budget(
            budget, cands.sparse_numel, cands.dense_numel, dense_in_budget
        )
        self.dense_in_budget = dense_in_budget
        dense_charge = cands.dense_numel if dense_in_budget and self.method.kind != "dense" else 0
        self.total_budget = self.budget + dense_charge

        device = self._params[0].device if self._params else torch.device("cpu")
        self._master = (
            torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        )
        self._offsets = torch.tensor(self._offsets_list, dtype=torch.long, device=device)
        # Where this process's part of each candidate starts in its flattened full tensor (0
        # unless sharded), and the global index of that part's element 0: slots, keys and
        # reads/writes of weights work on the local part, indices stay global.
        self._starts = self._shards.starts if self._shards else [0] * len(self._params)
        self._origins = [o + s for o, s in zip(self._offsets_list, self._starts, strict=True)]
        self._max_numel = max((_local(p).numel() for p in self._params), default=0)

        self._capacity = self.budget
        self._n = 0
        self._delta = torch.zeros(self._capacity, dtype=self._master, device=device)
        self._delta.grad = torch.zeros_like(self._delta)
        self._base = torch.zeros_like(self._delta)
        self._index = torch.zeros(self._capacity, dtype=torch.long, device=device)
        self._active = (
            torch.zeros(self._capacity, dtype=torch.bool, device=device)
            if kind == "repeat"
            else None
        )
        self._layout: list[tuple[int, Tensor, Tensor]] = []
        self._touched: list[tuple[int, Tensor, Tensor]] = []
        self._sorted_index = torch.zeros(0, dtype=torch.long, device=device)
        self._sorted_slots = torch.zeros(0, dtype=torch.long, device=device)

        self._sparse = (
            _make_inner(optimizer, [self._delta], optimizer_kwargs, adam_step)
            if self._params
            else None
        )
        self._dense = (
            optimizer(self._dense_params, **optimizer_kwargs) if self._dense_params else None
        )
        super().__init__([self._delta] + self._dense_params, {})
        self._link_param_groups()

        self.steps_done = 0
        self.num_updates = 0
        self.num_skipped_steps = 0
        self.consecutive_skips = 0
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.calibrated = not self.method.needs_calibration
        if kind == "static" and self.calibrated:
            with torch.no_grad():
                self._assign(self._select(self._sources(None, exclude=False), self.budget))
        elif kind == "all":
            self._assign(torch.arange(self.budget, device=device))
        self.freeze_unselected = low_memory if freeze_unselected is None else freeze_unselected
        self.low_memory = low_memory
        # Hooks hold only a weak reference: a dropped optimizer must not keep consuming the
        # model's gradients (close() also removes them).
        this = weakref.ref(self)
        self._hooks = (
            [
                p.register_post_accumulate_grad_hook(_TapHook(this, i))
                for i, p in enumerate(self._params)
            ]
            if low_memory
            else []
        )
        # Low-memory mode, per step: candidates (global index, key, gradient), tensors seen.
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pending_count = 0
        self._seen: set[int] = set()
        self._grad_sq = torch.zeros((), dtype=torch.float64, device=device)
        self._tapping = True  # off while calibrate() needs whole gradients
        self._freeze_if_final()

    # ------------------------------------------------------------------ budget and inner optimizers

    def _sparse_budget(
        self, budget: Budget | None, sparse_numel: int, dense_numel: int, dense_in_budget: bool
    ) -> int:
        kind, name = self.method.kind, self.method.name
        pool = sparse_numel + (dense_numel if dense_in_budget else 0)
        if kind in ("all", "dense"):
            trained = sparse_numel if kind == "all" else 0
            if budget is not None and resolve_budget(budget, max(pool, 1)) < pool:
                raise ValueError(
                    f"method {name!r} trains all {pool:,} of its weights, more than the budget "
                    f"{budget!r}; pass budget=None, or use a method that selects (e.g. 'id3')"
                )
            return trained
        if budget is None:
            raise ValueError(f"method {name!r} needs a budget, e.g. budget='0.1%' or 100000")
        total = resolve_budget(budget, pool)
        sparse = total - dense_numel if dense_in_budget else total
        if sparse < 1:
            raise ValueError(
                f"budget {budget!r} is {total:,} weights, but the dense parameters "
                f"{self._dense_names} already use {dense_numel:,} of it; raise the budget or pass "
                "dense_in_budget=False"
            )
        return sparse

    def _link_param_groups(self) -> None:
        # The inner optimizers own the hyperparameters; sharing their group dicts lets LR
        # schedulers and Trainer adjust `lr` on this object as on any torch optimizer.
        self.param_groups = (self._sparse.param_groups if self._sparse else []) + (
            self._dense.param_groups if self._dense else []
        )

    # ------------------------------------------------------------------ the training step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Unmask this step's weights (ID3), then update every selected weight.

        Newly selected weights are updated in the same step. Parameters whose `.grad` is None
        are neither scored nor updated.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_same_parameters()
        if self._params and self._params[0].device != self._delta.device:
            raise RuntimeError(
                f"the model's parameters moved to {self._params[0].device} after the optimizer "
                f"was built on {self._delta.device}; build the optimizer after model.to(device)"
            )
        if not self.calibrated:
            raise RuntimeError(
                f"method {self.method.name!r} chooses its mask from calibration batches: call "
                "opt.calibrate(batches) before the first step"
            )
        if not self._gradients_finite():
            self._skip_step()
            return loss
        self.consecutive_skips = 0
        gathered_for = self._layout
        kind = self.method.kind
        if kind == "increment" and self._num_chosen < self.budget:
            if self.low_memory:
                self._unmask_from_pending()
            else:
                self._unmask()
            if self._num_chosen >= self.budget:
                self.method.detach()  # the mask is final: stop gathering statistics
            self._freeze_if_final()
        elif kind == "repeat":
            self._reselect()
        # Under FSDP a rank may hold none of the selected weights yet; it still steps its (zero)
        # slots, so that a per-tensor step count (adam_step="global") matches a single process.
        if self._layout or (self._shards is not None and self._num_chosen > 0):
            if self._layout is not gathered_for and not self.low_memory:
                self._gather_grads()  # new weights were unmasked
            saved = self._delta.clone() if self._active is not None else None
            self._sparse.step()
            if saved is not None:
                torch.where(self._active, self._delta, saved, out=self._delta)
            self._write_back(self._layout)
        if self._dense is not None:
            self._dense.step()
        self.num_updates += self.num_selected + (
            self._dense_numel if self.method.kind != "dense" else 0
        )
        self.steps_done += 1
        self._clear_pending()
        self.method.clear()
        return loss

    def _check_same_parameters(self) -> None:
        """RuntimeError if a trained parameter of the model is no longer the one held here.

        A module replaced after the optimizer was built (``model.classifier = nn.Linear(...)``)
        brings new parameter objects: the optimizer would go on training the old, detached ones
        and save them in the delta. An identity check by name, once per step. Not under FSDP,
        which swaps the registered parameters itself.
        """
        if self._shards is not None:
            return
        current = dict(self.model.named_parameters())
        names = zip(self._names + self._dense_names, self._params + self._dense_params, strict=True)
        for name, param in names:
            if current.get(name) is not param:
                what = "is gone" if name not in current else "was replaced by a new tensor"
                raise RuntimeError(
                    f"parameter {name} of the model {what} after the SelectiveOptimizer was "
                    "built (a module was replaced or removed); this optimizer would train and "
                    "save the old, detached parameter: build a new SelectiveOptimizer after "
                    "changing the model"
                )

    def _freeze_if_final(self) -> None:
        if not self.freeze_unselected or not self.calibrated:
            return
        kind = self.method.kind
        if kind in ("static", "all") or (kind == "increment" and self._num_chosen >= self.budget):
            holding = {i for i, _, _ in self._touched}
            for i, p in enumerate(self._params):
                if i not in holding:
                    p.requires_grad_(False)

    def _gradients_finite(self) -> bool:
        """Whether every gradient that would enter the weights or the optimizer state is finite.

        Only selected weights and dense parameters are checked (O(B) plus the dense size):
        weights chosen this step are finite by construction, since non-finite scores are never
        selected. Under FSDP the answer is every rank's (collective): a non-finite gradient may
        sit in one rank's shard only, and the ranks must skip a step together.
        """
        finite = True
        if self._layout:
            if not self.low_memory:
                self._gather_grads()
            finite = bool(torch.isfinite(self._delta.grad).all())
        finite = finite and all(
            bool(torch.isfinite(_local(p.grad)).all())
            for p in self._dense_params
            if p.grad is not None
        )
        return finite if self._shards is None else self._shards.all_true(finite)

    def _skip_step(self) -> None:
        self._clear_pending()
        self.method.clear()
        self.num_skipped_steps += 1
        self.consecutive_skips += 1
        message = (
            f"step {self.steps_done}: non-finite gradient in a selected or dense weight; the step "
            f"was skipped ({self.consecutive_skips} in a row, {self.num_skipped_steps} in all)"
        )
        if self.consecutive_skips > self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{message}; more than max_nonfinite_steps={self.max_nonfinite_steps} in a row, "
                "so training stops: lower the learning rate, check the data for bad examples, or "
                "resume from the last checkpoint"
            )
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every candidate and dense parameter of the model."""
        self._clear_pending()
        self.method.clear()
        for p in self._params + self._dense_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def _unmask(self) -> None:
        k = self._quota()
        if k <= 0:
            return
        signals = [p.grad for p in self._params] if self.method.needs_grad else None
        if self.method.allocation_of() == "proportional":
            k -= self._unmask_proportional(signals, k)
        self._assign(self._select(self._sources(signals, exclude=True), k))

    def _unmask_proportional(self, signals: list[Tensor | None] | None, k: int) -> int:
        """Top each tensor up towards its size's share of the schedule's count, in model order
        while the quota k lasts; returns how many weights were unmasked (at most k)."""
        target = min(self._num_chosen + k, self.budget)
        total = sum(p.numel() for p in self._params)
        held = dict.fromkeys(range(len(self._params)), 0)
        held.update({i: local.numel() for i, _, local in self._touched})
        chosen = []
        sources = self._sources(signals, exclude=True, with_tensor=True)
        for i, source in sources:
            want = target * self._params[i].numel() // total - held[i]
            if want > 0:
                chosen.append(select_top([source], min(want, k), self.method.eligibility_floor()))
                k -= chosen[-1].numel()
        if not chosen:
            return 0
        picked = torch.cat(chosen).sort().values
        self._assign(picked)
        return picked.numel()

    def _select(self, sources: list[KeySource], k: int) -> Tensor:
        """Ascending global indices of the at most k best eligible keys; under FSDP, over every
        rank's shards and the same on every rank (collective)."""
        floor = self.method.eligibility_floor()
        if self._shards is None:
            return select_top(sources, k, floor)
        return self._shards.select(sources, k, floor)

    def _reselect(self) -> None:
        chosen = select_top(
            self._sources([p.grad for p in self._params], exclude=False),
            self.budget,
            self.method.eligibility_floor(),
        )
        n = self._n
        if n:
            pos = torch.searchsorted(self._sorted_index, chosen).clamp_(max=n - 1)
            found = self._sorted_index[pos] == chosen
        else:
            pos = found = torch.zeros(chosen.numel(), dtype=torch.bool, device=chosen.device)
        kept = self._sorted_slots[pos[found]] if n else torch.zeros(0, dtype=torch.long)
        self._assign(chosen[~found])
        previously_active = self._active.clone()
        self._active.zero_()
        self._active[kept] = True
        self._active[n : self._n] = True
        # A weight that comes back after a pause starts with fresh optimizer state.
        self._reset_state(kept[~previously_active[kept]])
        self._rebuild_layout()

    def _sources(
        self, signals: list[Tensor | None] | None, exclude: bool, with_tensor: bool = False
    ) -> list:
        scratch = torch.empty(self._max_numel, dtype=torch.float32, device=self._offsets.device)
        excluded = {i: local for i, _, local in self._touched} if exclude else {}
        sources = []
        for i, (name, p) in enumerate(zip(self._names, self._params, strict=True)):
            signal = signals[i] if signals is not None else None
            if signals is not None and signal is None:
                continue

            skip = excluded.get(i)
            shard = _local(p)
            signal = None if signal is None else _local(signal)

            def fill(i=i, name=name, shard=shard, signal=signal, skip=skip) -> Tensor:
                keys = self.method.shard_keys(
                    name, shard, signal, scratch, self._starts[i], self._params[i].numel()
                )
                if skip is not None:
                    keys.index_fill_(0, skip, _NEG_INF)
                return keys

            source = KeySource(self._origins[i], fill)
            sources.append((i, source) if with_tensor else source)
        return sources

    # ------------------------------------------------------------------ low-memory mode

    def close(self) -> None:
        """Remove the low-memory mode's gradient hooks from the model.

        Call before building another optimizer on the same model. `requires_grad` flags that
        `freeze_unselected` turned off stay off (set them back with `requires_grad_(True)`).
        """
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.method.detach()

    def _consume_grad(self, i: int, param: Tensor) -> None:
        """Take what the step needs from tensor i's fresh gradient, then free the gradient."""
        grad = param.grad
        if grad is None or not self._tapping:
            return
        flat = grad.detach().reshape(-1)
        self._grad_sq += torch.linalg.vector_norm(flat, dtype=torch.float32).double().square()
        for j, slots, local in self._layout:
            if j == i:
                picked = flat.index_select(0, local).to(self._delta.dtype)
                self._delta.grad.index_add_(0, slots, picked)
                break
        self._seen.add(i)
        k = self._quota()
        if k > 0 and flat.numel():
            self._add_candidates(i, param, flat, k)
        self.method.release(param)
        param.grad = None

    def _add_candidates(self, i: int, param: Tensor, flat_grad: Tensor | None, k: int) -> None:
        """Keep tensor i's top-k (global index, key, gradient); cut the pool back to O(k)."""
        local, keys = select_top_keys(
            self._chunk_sources(i, param, flat_grad), k, self.method.eligibility_floor()
        )
        local, keys = local.to(param.device), keys.to(param.device)
        grads = (
            torch.zeros(local.numel(), dtype=self._delta.dtype, device=param.device)
            if flat_grad is None
            else flat_grad.index_select(0, local).to(self._delta.dtype)
        )
        self._pending.append((local + self._offsets_list[i], keys, grads))
        self._pending_count += local.numel()
        if self._pending_count > 4 * k:
            # Within one backward, a candidate outside the pool's top-k has k better ones.
            self._pending = [self._merged_pending(k)]
            self._pending_count = self._pending[0][0].numel()

    def _merged_pending(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The pool's at most k best (ascending global index, key, gradient).

        A weight that came back from several micro-batches takes its largest key (keys may be
        logarithms, so they are not added) and the sum of its gradients.
        """
        device = self._offsets.device
        index = torch.cat([x for x, _, _ in self._pending]).to(device)
        keys = torch.cat([v for _, v, _ in self._pending]).to(device)
        grads = torch.cat([g for _, _, g in self._pending]).to(device)
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

    def _chunk_sources(self, i: int, param: Tensor, flat_grad: Tensor | None) -> list[KeySource]:
        """Tensor i's keys in chunks of _KEY_CHUNK weights sharing one scratch buffer, so that
        ranking a tensor in a hook needs O(chunk) memory on top of its gradient, not O(numel)."""
        name, flat_param = self._names[i], param.detach().reshape(-1)
        numel = flat_param.numel()
        scratch = torch.empty(min(numel, _KEY_CHUNK), dtype=torch.float32, device=param.device)
        excluded = next((local for j, _, local in self._touched if j == i), None)

        def source(a: int) -> KeySource:
            b = min(a + _KEY_CHUNK, numel)

            def fill() -> Tensor:
                signal = None if flat_grad is None else flat_grad[a:b]
                keys = self.method.shard_keys(name, flat_param[a:b], signal, scratch, a, numel)
                if excluded is not None:  # ascending: the chunk's part is one slice
                    bounds = torch.tensor([a, b], device=excluded.device)
                    lo, hi = torch.searchsorted(excluded, bounds).tolist()
                    keys.index_fill_(0, excluded[lo:hi] - a, _NEG_INF)
                return keys

            return KeySource(a, fill)

        return [source(a) for a in range(0, numel, _KEY_CHUNK)]

    def _quota(self) -> int:
        """How many weights the coming step unmasks (increment methods; 0 once B is spent)."""
        chosen = self._num_chosen  # global under FSDP
        if self.method.kind != "increment" or chosen >= self.budget or not self.calibrated:
            return 0
        target = self.schedule.cumulative(self.steps_done, self.budget, self.total_steps)
        return min(target, self.budget) - chosen

    def _unmask_from_pending(self) -> None:
        """Exact global top-k over the per-tensor candidates the hooks kept this step.

        The k largest keys of all tensors lie in the union of each tensor's own k largest, and
        both orders break ties by the lowest index, so this equals the standard mode's choice.
        Methods that rank without gradients (increment-pafi) also rank the tensors that got no
        gradient this step, as the standard mode does (their first update is then zero).
        """
        k = self._quota()
        if k <= 0:
            return
        if not self.method.needs_grad:
            for i, p in enumerate(self._params):
                if i not in self._seen and p.numel():
                    self._add_candidates(i, p, None, k)
        if not self._pending:
            return
        index, _, grads = self._merged_pending(k)
        n = self._n
        self._assign(index)
        self._delta.grad[n : self._n] = grads

    def _clear_pending(self) -> None:
        if self.low_memory:
            self._pending, self._pending_count, self._seen = [], 0, set()
            self._grad_sq.zero_()
            self._delta.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the gradients this step will use so that their global L2 norm is <= max_norm.

        The norm is over the gradients of the parameters this optimizer trains (candidates and
        dense ones), as `torch.nn.utils.clip_grad_norm_` computes it over them; parameters
        outside the candidates, and tensors frozen by `freeze_unselected`, have no part in it.
        In low-memory mode it comes from the hooks (with several micro-batches: the root of the
        summed per-micro-batch squared norms). Call after backward, before step(). Returns the
        norm before clipping. Under FSDP, the norm of the full gradients (collective).
        """
        dense = [p.grad for p in self._dense_params if p.grad is not None]
        if self.low_memory:
            square = self._grad_sq + sum(
                torch.linalg.vector_norm(g, dtype=torch.float32).double().square() for g in dense
            )
            norm = square.sqrt().cpu()
            grads = [self._delta.grad, *dense, *(g for _, _, g in self._pending)]
        else:
            grads = [p.grad for p in self._params if p.grad is not None] + dense
            if self._shards is not None:  # the norm of the full gradients, from every rank
                norm = self._shards.total_norm(grads)
            else:
                norm = torch.nn.utils.get_total_norm(grads).cpu() if grads else torch.tensor(0.0)
        scale = max_norm / (float(norm) + 1e-6)
        if scale < 1.0:
            for g in grads:
                g.mul_(scale)
        return norm

    # ------------------------------------------------------------------ slots

    def _assign(self, chosen: Tensor) -> None:
        """Give each global index in `chosen` (ascending) a fresh slot with zero delta and state.

        Under FSDP `chosen` is the global choice (the same on every rank); this rank records it
        and assigns slots to the part inside its own shards.
        """
        if self._shards is not None:
            chosen = self._shards.take(chosen)
        m = chosen.numel()
        if m == 0:
            return
        n = self._n
        if n + m > self._capacity:
            self._resize(max(2 * self._capacity, n + m))
        self._index[n : n + m] = chosen
        tensor_of = torch.searchsorted(self._offsets, chosen, right=True) - 1
        counts = torch.bincount(tensor_of, minlength=len(self._params)).tolist()
        start = n
        for i, c in enumerate(counts):
            if c:
                local = chosen[start - n : start - n + c] - self._origins[i]
                flat = _local(self._params[i]).detach().view(-1)
                self._base[start : start + c] = flat.index_select(0, local).to(self._master)
                start += c
        self._delta[n : n + m] = 0
        self._reset_state(torch.arange(n, n + m, device=chosen.device))
        self._n = n + m
        self._rebuild_layout()

    def _reset_state(self, slots: Tensor) -> None:
        if self._sparse is None or slots.numel() == 0:
            return
        for value in self._sparse.state.get(self._delta, {}).values():
            if torch.is_tensor(value) and value.shape == self._delta.shape:
                value[slots] = 0

    def _resize(self, capacity: int) -> None:
        """Grow the slot buffers (repeat ablation), keeping the wrapped optimizer's state."""
        old = self._delta
        grown = torch.zeros(capacity, dtype=old.dtype, device=old.device)
        grown[: old.numel()] = old
        grown.grad = torch.zeros_like(grown)
        self._sparse.param_groups[0]["params"][0] = grown
        state = self._sparse.state.pop(old, {})
        self._sparse.state[grown] = {k: _pad(v, old.shape, capacity) for k, v in state.items()}
        self._delta = grown
        self._base = _pad(self._base, old.shape, capacity)
        self._index = _pad(self._index, old.shape, capacity)
        if self._active is not None:
            self._active = _pad(self._active, old.shape, capacity)
        self._capacity = capacity

    def _rebuild_layout(self) -> None:
        """Per tensor: its slots and their flat indices, in ascending index order."""
        slots = torch.arange(self._n, device=self._index.device)
        order = torch.argsort(self._index[: self._n])
        self._sorted_index = self._index[: self._n][order]
        self._sorted_slots = slots[order]
        self._touched = self._group(self._sorted_slots, self._sorted_index)
        if self._active is None:
            self._layout = self._touched
        else:
            keep = self._active[self._sorted_slots]
            self._layout = self._group(self._sorted_slots[keep], self._sorted_index[keep])

    def _group(self, slots: Tensor, index: Tensor) -> list[tuple[int, Tensor, Tensor]]:
        """(tensor, slots, flat indices into this process's part of the tensor), per tensor."""
        tensor_of = torch.searchsorted(self._offsets, index, right=True) - 1
        counts = torch.bincount(tensor_of, minlength=len(self._params)).tolist()
        groups, start = [], 0
        for i, c in enumerate(counts):
            if c:
                local = index[start : start + c] - self._origins[i]
                groups.append((i, slots[start : start + c], local))
                start += c
        return groups

    def _gather_grads(self) -> None:
        flat_grad = self._delta.grad
        flat_grad.zero_()
        for i, slots, local in self._layout:
            grad = self._params[i].grad
            if grad is not None:
                picked = _local(grad).detach().reshape(-1).index_select(0, local)
                flat_grad.index_copy_(0, slots, picked.to(flat_grad.dtype))

    def _write_back(self, layout: list[tuple[int, Tensor, Tensor]]) -> None:
        values = self._base + self._delta
        for i, slots, local in layout:
            p = _local(self._params[i]).detach()
            new = values.index_select(0, slots).to(p.dtype)
            if p.is_contiguous():
                p.view(-1).index_copy_(0, local, new)
            else:  # channels_last and other strides: `local` indexes the logical order
                p.index_put_(torch.unravel_index(local, p.shape), new)

    # ------------------------------------------------------------------ calibration (FISH)

    @torch.no_grad()
    def calibrate(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        num_batches: int | None = None,
    ) -> None:
        """Choose the mask of a calibration method ("fish") from Σ g² over `batches`.

        `loss_fn(model, batch)` returns the loss; by default ``model(**batch).loss``. Uses at
        most `num_batches` batches. Holds one float32 accumulator per candidate while it runs.
        Leaves the model's gradients cleared and its weights unchanged.
        """
        if not self.method.needs_calibration:
            raise RuntimeError(f"method {self.method.name!r} does not use calibration batches")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        fisher = [torch.zeros_like(_local(p), dtype=torch.float32) for p in self._params]
        self._tapping = False
        try:
            used = self._accumulate_fisher(batches, loss_fn, num_batches, fisher)
        finally:
            self._tapping = True
        self.zero_grad()
        if used == 0:
            raise ValueError("calibrate() got no batches; pass at least one batch")
        self._assign(self._select(self._sources(fisher, exclude=False), self.budget))
        self.calibrated = True
        self._freeze_if_final()

    def _accumulate_fisher(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor] | None,
        num_batches: int | None,
        fisher: list[Tensor],
    ) -> int:
        """Add Σ g² of up to `num_batches` batches into `fisher`; returns the batches used."""
        used = 0
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            self.zero_grad()
            with torch.enable_grad():
                loss = loss_fn(self.model, batch) if loss_fn else self.model(**batch).loss
                loss.backward()
            for acc, p in zip(fisher, self._params, strict=True):
                if p.grad is not None:
                    grad = _local(p.grad)  # under FSDP: this rank's rows of the averaged gradient
                    acc.addcmul_(grad, grad)
            used += 1
        return used

    # ------------------------------------------------------------------ inspection

    @property
    def _num_chosen(self) -> int:
        """Weights selected so far on all ranks together (this process's slots, unless sharded)."""
        return self._n if self._shards is None else self._shards.chosen.numel()

    @property
    def num_selected(self) -> int:
        """Weights currently selected for training (all weights, for `full`); global under FSDP."""
        if self.method.kind == "dense":
            return self._dense_numel
        if self._active is not None:
            return int(self._active.sum())
        return self._num_chosen

    @property
    def num_changed(self) -> int:
        """Weights whose value may differ from the pretrained model (what the delta stores)."""
        return self._num_chosen + self._dense_numel

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are FSDP2 shards (see sharding.py)."""
        return self._shards is not None

    @property
    def dense_names(self) -> list[str]:
        """Parameters trained whole by the wrapped optimizer (a new head; all, for `full`)."""
        return list(self._dense_names)

    def selected(self) -> dict[str, Tensor]:
        """Per candidate tensor, the ascending flat indices of its selected weights (int64).

        Under FSDP: every rank's selection, as flat indices of the full tensors (no communication).
        """
        if self._shards is not None:
            return {self._names[i]: flat for i, flat in self._shards.chosen_by_tensor()}
        return {self._names[i]: local.clone() for i, _, local in self._layout}

    def allocation(self) -> dict[str, int]:
        """Per parameter name, how many of its weights may have changed (dense ones: all)."""
        if self._shards is not None:
            counts = {self._names[i]: flat.numel() for i, flat in self._shards.chosen_by_tensor()}
        else:
            counts = {self._names[i]: int(local.numel()) for i, _, local in self._touched}
        counts.update(
            {n: p.numel() for n, p in zip(self._dense_names, self._dense_params, strict=True)}
        )
        return counts

    def state_bytes(self) -> int:
        """Bytes of every persistent buffer this optimizer holds (slots and optimizer state);
        under FSDP, this rank's."""
        buffers = [self._delta, self._delta.grad, self._base, self._index]
        if self._active is not None:
            buffers.append(self._active)
        for inner in (self._sparse, self._dense):
            if inner is not None:
                buffers += [
                    _local(v)
                    for s in inner.state.values()
                    for v in s.values()
                    if torch.is_tensor(v)
                ]
        return sum(b.numel() * b.element_size() for b in buffers)

    # ------------------------------------------------------------------ results and checkpoints

    def delta(self) -> SparseDelta:
        """The trained change: the selected weights' deltas plus the dense tensors.

        Under FSDP this is collective: every rank must call it. It gathers every rank's slots
        and the full dense tensors, and every rank gets the same delta, the one an unsharded
        process would make (indices of the full tensors); save it from rank 0.
        """
        self._check_same_parameters()
        if self._shards is None:
            entries = [
                (i, local, self._delta[slots], self._base[slots])
                for i, slots, local in self._touched
            ]
        else:
            n = self._n
            entries = self._shards.gather_selected(self._index[:n], self._delta[:n], self._base[:n])
        sparse, base_values = {}, {}
        for i, flat, change, base in entries:
            index_dtype = torch.int32 if self._params[i].numel() < 2**31 else torch.long
            sparse[self._names[i]] = (flat.to(index_dtype).cpu(), change.cpu())
            base_values[self._names[i]] = base.cpu()
        replace = {
            n: _full(p.detach()).cpu().clone()
            for n, p in zip(self._dense_names, self._dense_params, strict=True)
        }
        metadata = {
            **self.method.config(),
            "budget": self.total_budget,
            "sparse_budget": self.budget,
            "dense_in_budget": self.dense_in_budget,
            "total_steps": self.total_steps,
            "steps_done": self.steps_done,
            "schedule": self.schedule.name,
            "base_model": _base_model_name(self.model),
        }
        return SparseDelta.from_training(self.model, sparse, base_values, replace, metadata)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: slots, wrapped optimizer state, counters, configuration.

        Under FSDP it is this rank's (its slots and shards' state, plus the global selection):
        each rank saves its own and loads it back on the same rank of as many ranks.
        """
        n = self._n
        sharded = None
        if self._shards is not None:
            sharded = {
                "rank": self._shards.rank,
                "world": self._shards.world,
                "chosen": self._shards.chosen.clone(),
            }
        return {
            "unmask": {
                "version": STATE_VERSION,
                "method": self.method.config(),
                "budget": self.budget,
                "total_steps": self.total_steps,
                "schedule": self.schedule.name,
                "candidates": list(self._names),
                "dense": list(self._dense_names),
                "capacity": self._capacity,
                "num_slots": n,
                "steps_done": self.steps_done,
                "num_updates": self.num_updates,
                "num_skipped_steps": self.num_skipped_steps,
                "calibrated": self.calibrated,
            },
            "index": self._index[:n].clone(),
            "base": self._base[:n].clone(),
            "delta": self._delta[:n].clone(),
            "active": None if self._active is None else self._active[:n].clone(),
            "sparse_optimizer": self._sparse.state_dict() if self._sparse else None,
            "dense_optimizer": self._dense.state_dict() if self._dense else None,
            "sharded": sharded,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()` and write the selected weights' trained values into the model.

        Dense parameters are not written: load them with the model checkpoint. Everything is
        checked first (configuration, slot tensors' types, shapes and index ranges against this
        model, finite values in the parameters' dtypes, the wrapped optimizers' state shapes); a
        state_dict that fails raises ValueError and leaves the model and the optimizer unchanged.
        """
        self._check_state_dict(state_dict)
        self._clear_pending()
        meta = state_dict["unmask"]
        self._load_sharding(state_dict.get("sharded"))
        if meta["capacity"] != self._capacity:
            self._resize(meta["capacity"])
        n = meta["num_slots"]
        device = self._delta.device
        self._index[:n] = state_dict["index"].to(device)
        self._base[:n] = state_dict["base"].to(device)
        self._delta[:n] = state_dict["delta"].to(device)
        self._delta[n:] = 0
        if self._active is not None:
            self._active.zero_()
            self._active[:n] = state_dict["active"].to(device)
        self._n = n
        if self._sparse is not None:
            self._sparse.load_state_dict(state_dict["sparse_optimizer"])
        if self._dense is not None:
            self._dense.load_state_dict(state_dict["dense_optimizer"])
        self._link_param_groups()
        self.steps_done = meta["steps_done"]
        self.num_updates = meta["num_updates"]
        self.num_skipped_steps = meta.get("num_skipped_steps", 0)
        self.calibrated = meta["calibrated"]
        self._rebuild_layout()
        with torch.no_grad():
            self._write_back(self._touched)
        if self.method.kind == "increment" and self._num_chosen >= self.budget:
            self.method.detach()  # resumed with a final mask: no statistics to gather
        self._freeze_if_final()

    def _check_state_dict(self, state_dict: Any) -> None:
        """ValueError unless `state_dict` can be loaded whole into this optimizer and model."""
        meta = state_dict.get("unmask") if isinstance(state_dict, dict) else None
        if not isinstance(meta, dict) or meta.get("version") != STATE_VERSION:
            raise ValueError(
                "not a SelectiveOptimizer state_dict (missing 'unmask' section or unknown version)"
            )
        counters = ("capacity", "num_slots", "steps_done", "num_updates")
        missing = [
            k
            for k in ("method", "budget", "total_steps", "schedule", "candidates", "dense")
            + counters
            + ("calibrated",)
            if k not in meta
        ]
        missing += [k for k in ("index", "base", "delta") if k not in state_dict]
        if missing:
            raise ValueError(
                f"the checkpoint lacks {missing}: it is damaged or not from SelectiveOptimizer."
                "state_dict(); resume from another checkpoint or start again"
            )
        mine = {
            "method": self.method.config(),
            "budget": self.budget,
            "total_steps": self.total_steps,
            "schedule": self.schedule.name,
            "candidates": self._names,
            "dense": self._dense_names,
        }
        for key, value in mine.items():
            if meta[key] != value:
                raise ValueError(
                    f"checkpoint was made with {key}={_short(meta[key])}, this optimizer has "
                    f"{key}={_short(value)}; build the optimizer with the same settings to resume"
                )

        def refuse(what: str) -> ValueError:
            return ValueError(
                f"checkpoint does not fit this optimizer and model: {what}; it was saved for "
                "another model (same parameter names, other shapes?) or is damaged; resume "
                "with the model it was saved from, or start again"
            )

        bad = [k for k in counters if not _is_count(meta[k])]
        if bad or not isinstance(meta["calibrated"], bool):
            raise refuse(f"counters {bad or ['calibrated']} are not non-negative integers/bools")
        n, capacity = meta["num_slots"], meta["capacity"]
        if n > capacity or capacity < self._capacity:
            raise refuse(
                f"{n:,} slots in a capacity of {capacity:,} (this optimizer has {self._capacity:,};"
                " load into a freshly built optimizer)"
            )
        index, base, delta = state_dict["index"], state_dict["base"], state_dict["delta"]
        for key, t, ok in (
            ("index", index, lambda t: not t.dtype.is_floating_point and t.dtype != torch.bool),
            ("base", base, lambda t: t.dtype.is_floating_point),
            ("delta", delta, lambda t: t.dtype.is_floating_point),
        ):
            if not (torch.is_tensor(t) and t.shape == (n,) and ok(t) and not t.is_complex()):
                raise refuse(f"'{key}' is not a 1-D tensor of {n:,} slots of the right type")
        if self._active is not None:
            active = state_dict.get("active")
            if not (
                torch.is_tensor(active) and active.shape == (n,) and active.dtype == torch.bool
            ):
                raise refuse(f"'active' is not a 1-D bool tensor of {n:,} slots")
        # Where each slot's weight lies: in which tensor, at which place of this process's part
        # (the same computation as `_group`, which the write uses).
        index = index.to(self._offsets.device, torch.long)
        tensor_of = torch.searchsorted(self._offsets, index, right=True) - 1
        if n:
            if int(index.min()) < 0 or int(tensor_of.max()) >= len(self._params):
                raise refuse("slot indices lie outside the candidate tensors")
            origins = torch.tensor(self._origins, dtype=torch.long, device=index.device)
            sizes = torch.tensor(
                [_local(p).numel() for p in self._params], dtype=torch.long, device=index.device
            )
            local = index - origins[tensor_of]
            outside = (local < 0) | (local >= sizes[tensor_of])
            if bool(outside.any()):
                i = int(tensor_of[outside.nonzero()[0, 0]])
                raise refuse(
                    f"{int(outside.sum()):,} slot indices lie outside their tensors (the first "
                    f"in {self._names[i]}, of shape {tuple(self._params[i].shape)} here)"
                )
        values = base.to(self._master) + delta.to(self._master)
        for i in torch.unique(tensor_of).tolist():
            cast = values[tensor_of == i].to(self._params[i].dtype)
            if not bool(torch.isfinite(cast).all()):
                raise refuse(
                    f"the values for {self._names[i]} are NaN or overflow its dtype "
                    f"{self._params[i].dtype}"
                )
        _check_inner_state(
            "sparse", self._sparse, state_dict.get("sparse_optimizer"), [(capacity,)], refuse
        )
        _check_inner_state(
            "dense",
            self._dense,
            state_dict.get("dense_optimizer"),
            [tuple(p.shape) for p in self._dense_params],
            refuse,
        )
        saved = state_dict.get("sharded")
        if saved is not None and not (
            isinstance(saved, dict)
            and {"rank", "world"} <= set(saved)
            and torch.is_tensor(saved.get("chosen"))
        ):
            raise refuse("its sharding record is malformed")
        shards = self._shards
        mine = None if shards is None else {"rank": shards.rank, "world": shards.world}
        theirs = None if saved is None else {"rank": saved["rank"], "world": saved["world"]}
        if mine != theirs:
            self._load_sharding(saved)  # raises, naming both

    def _load_sharding(self, saved: dict[str, Any] | None) -> None:
        """Check that a checkpoint's sharding matches this optimizer's; restore the selection."""
        shards = self._shards
        mine = None if shards is None else {"rank": shards.rank, "world": shards.world}
        theirs = None if saved is None else {"rank": saved["rank"], "world": saved["world"]}
        if mine != theirs:
            raise ValueError(
                f"checkpoint was saved with sharding {theirs} (None: not sharded), this optimizer "
                f"has {mine}; under FSDP each rank loads the state_dict it saved itself, with as "
                "many ranks as when it was saved"
            )
        if shards is not None:
            shards.chosen = saved["chosen"].to(shards.device)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_inner_state(
    role: str,
    inner: torch.optim.Optimizer | None,
    saved: Any,
    shapes: list[tuple[int, ...]],
    refuse: Callable[[str], ValueError],
) -> None:
    """The saved state of a wrapped optimizer has its groups and, per parameter, its shapes."""
    if inner is None:
        if saved is not None:
            raise refuse(f"it holds a {role} optimizer state that this optimizer does not have")
        return
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("state"), dict)
        and isinstance(saved.get("param_groups"), list)
        and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"]
        )
    ):
        raise refuse(f"the {role} optimizer state is missing or malformed")
    groups = saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in inner.param_groups]:
        raise refuse(f"the {role} optimizer has other parameter groups")
    ids = [i for g in groups for i in g["params"]]
    for key, shape in zip(ids, shapes, strict=True):
        for name, value in saved["state"].get(key, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != shape:
                raise refuse(
                    f"{role} optimizer state {name!r} has shape {tuple(value.shape)}, the "
                    f"parameter here has {shape}"
                )


def _refuse_under_fsdp(method: Method, freeze_unselected: bool | None, low_memory: bool) -> None:
    """ValueError for the options that do not work on FSDP-sharded parameters, with what to do."""
    if low_memory:
        raise ValueError(
            "low_memory=True is not available on FSDP-sharded models (its per-tensor gradient "
            "hooks are not built for FSDP's sharded, averaged gradients); use low_memory=False"
        )
    if freeze_unselected:
        raise ValueError(
            "freeze_unselected=True is not available on FSDP-sharded models: it changes the "
            "requires_grad flags of parameters that FSDP manages; use freeze_unselected=False"
        )
    if method.kind == "repeat":
        raise ValueError(
            f"method {method.name!r} is not available on FSDP-sharded models (its slots change "
            "owners every step); use 'id3'"
        )


class _TapHook:
    """Post-accumulate-grad hook: hands tensor i's gradient to the optimizer while it lives."""

    def __init__(self, optimizer: weakref.ref, i: int) -> None:
        self.optimizer, self.i = optimizer, i

    def __call__(self, param: Tensor) -> None:
        opt = self.optimizer()
        if opt is not None:
            with torch.no_grad():
                opt._consume_grad(self.i, param)


def _make_inner(
    cls: type[torch.optim.Optimizer], params: list[Tensor], kwargs: dict[str, Any], adam_step: str
) -> torch.optim.Optimizer:
    if adam_step == "global" or cls not in (torch.optim.Adam, torch.optim.AdamW):
        return cls(params, **kwargs)
    unsupported = {
        k for k, v in kwargs.items() if k in ("amsgrad", "maximize", "differentiable") and v
    }
    if unsupported:
        raise ValueError(
            f"adam_step='per-weight' does not support {sorted(unsupported)}; "
            "pass adam_step='global' to use torch's optimizer as is"
        )
    signature = inspect.signature(cls).parameters
    options = {
        k: kwargs.get(k, signature[k].default) for k in ("lr", "betas", "eps", "weight_decay")
    }
    unknown = set(kwargs) - set(signature)
    if unknown:
        raise TypeError(f"{cls.__name__} got unexpected arguments {sorted(unknown)}")
    decoupled = cls is torch.optim.AdamW or bool(kwargs.get("decoupled_weight_decay", False))
    return SlotAdamW(params, decoupled=decoupled, **options)


def _check_finite_options(cls: type, kwargs: dict[str, Any]) -> None:
    """Refuse a NaN or infinite float (alone, in a tuple/list, or a 0-d tensor) in `kwargs`."""

    def finite(value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return all(finite(v) for v in value)
        if torch.is_tensor(value):
            return value.ndim != 0 or not value.is_floating_point() or bool(value.isfinite())
        if isinstance(value, numbers.Integral) or not isinstance(value, numbers.Real):
            return True
        return math.isfinite(value)  # float, numpy floats

    for name, value in kwargs.items():
        if not finite(value):
            raise ValueError(
                f"{getattr(cls, '__name__', cls)} option {name}={value!r} is not finite; "
                f"pass a finite number for {name}"
            )


def _pad(value: Any, old_shape: torch.Size, capacity: int) -> Any:
    if not torch.is_tensor(value) or value.shape != old_shape:
        return value
    grown = torch.zeros(capacity, dtype=value.dtype, device=value.device)
    grown[: value.numel()] = value
    return grown


def _base_model_name(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None)
    config = getattr(model, "config", None)
    if not name and config is not None:
        name = getattr(config, "_name_or_path", None)
    return str(name) if name else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."
