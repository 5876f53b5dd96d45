"""SelectiveOptimizer: only selected individual weights ever change; state scales with budget B.

It composes the parts, each in its own module:

    configuration   what the method and the options need; the budget of the slots
    candidates      which parameters compete (sparse) and which train whole (dense)
    methods         how weights are ranked and what a method needs (its capability fields)
    selector        which weights get slots when (quota, ranking, FSDP agreement)
    ranking         a method's keys of one tensor, chosen weights excluded
    index_space     global indices: tensor offsets, and their split per tensor
    slots           the selected weights' flat buffers: index, base value, delta
    repeat          repeat-S's active slots (the id3-repeat ablation only)
    gradient_tap    low-memory mode: gradients consumed in backward hooks
    backward_switch freezing and the sparse backward, on the steps whose mask is known
    sparse_backward the backward that computes only the selected weights' gradients
    gradients       the non-finite guard and clipping
    calibration     FISH's Fisher sums over calibration batches
    sharding        FSDP2: the same selection on every rank, slots per rank
    checkpoint      the state_dict layout and its checks
    inner_optimizer the wrapped torch optimizers and their state

Each step gathers the selected weights' gradients into delta.grad (zero in unused slots, whose
moments therefore stay zero and whose update is exactly zero), steps the wrapped optimizer on
`delta`, and writes ``param.view(-1)[i] = (base + delta).to(param.dtype)`` back. Saved deltas are
applied with the same expression, so applying a delta reproduces the trained weights bit for bit.
No other weight is ever written: unselected weights stay bit-identical to the pretrained ones.

Weight decay acts on `delta`, i.e. it pulls a selected weight towards its *pretrained* value,
never towards zero, and it never touches an unselected weight.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from unmask.choose.budget import Budget
from unmask.choose.candidates import Patterns, find_candidates
from unmask.choose.methods import Method, make_method
from unmask.choose.schedules import Schedule, check_total_steps, get_schedule
from unmask.optimize.backward_switch import BackwardSwitch
from unmask.optimize.calibration import LossFn, fisher_sums
from unmask.optimize.checkpoint import build_state_dict, restore_state_dict
from unmask.optimize.configuration import (
    check_calibrated,
    check_model_free,
    check_options,
    check_same_device,
    check_same_parameters,
    detect_shards,
    sparse_budget,
    total_budget,
)
from unmask.optimize.gradients import (
    check_max_nonfinite_steps,
    clip_grad_norm_,
    step_is_finite,
    warn_or_stop,
)
from unmask.optimize.inner_optimizer import (
    WrappedState,
    check_finite_options,
    make_sparse_inner,
    state_bytes,
)
from unmask.optimize.selector import Selector
from unmask.optimize.sharding import full as _full
from unmask.store.delta import SparseDelta


class SelectiveOptimizer(torch.optim.Optimizer):
    """Wrap a torch optimizer so that it trains at most `budget` individual weights of `model`.

    Args:
        model: the model being fine-tuned. Its trainable parameters are the candidates.
        method: a name from `unmask.METHODS` ("id3", "pafi", "bitfit", ...) or a `Method`.
        budget: weights that may change, as a count (5000, "100K") or a fraction of the
            candidates (0.001, "0.1%"); see `resolve_budget`. None for the methods without
            `takes_budget` ("bitfit", "full"), which train every bias / every weight.
        total_steps: T, the number of optimizer steps over which the budget is spent; required
            by the methods with `needs_total_steps` ("id3", "id3-repeat", ...).
        optimizer: the torch optimizer class to wrap: any whose update is elementwise and whose
            per-weight state has the parameter's shape (AdamW, Adam, SGD, RMSprop, Adagrad).
        include, exclude: regexes searched in parameter names that choose the candidates.
        dense: regexes of parameters trained whole (e.g. a new head), saved whole in the delta;
            if `dense_in_budget`, their size counts against B.
        schedule: "uniform" (default), "linear-decay", or a `Schedule`.
        adam_step: for Adam/AdamW, "per-weight" (each weight's bias correction uses the number
            of updates it has received) or "global" (torch's own optimizer: one step count for
            all, so a weight unmasked late takes larger first steps). Ignored otherwise.
        score_eps, score_exp: ε and exp of the D3 score |g| / (|θ| + ε)^exp.
        seed: seed of the "random" method.
        max_nonfinite_steps: a step whose selected or dense gradients hold NaN or inf is
            skipped with a RuntimeWarning (nothing is unmasked or updated, the step counter
            stays); after more than this many skips in a row, step() raises FloatingPointError.
        freeze_unselected: once the mask is final, set requires_grad=False on the candidates
            holding no selected weight (`unmask.optimize.backward_switch`). None (default): on
            in low-memory mode, off otherwise.
        low_memory: use each candidate's gradient during backward, then free it
            (`unmask.optimize.gradient_tap`): peak gradient memory is one tensor's gradient plus
            O(B), same selection and values. `.grad` is then None after backward: clip with
            `clip_grad_norm_`. `close()` removes the hooks. Needs `supports_low_memory`.
        sparse_backward: on the steps whose mask is known, compute only the selected weights'
            gradients (`unmask.optimize.backward_switch`); the trained weights are the dense
            path's up to float rounding, and clipping's norm is over the gradients computed.
            They accumulate in the optimizer, not in `.grad` (clear with `opt.zero_grad()`);
            what else user code sees: docs/sparse_backward.md. Under DDP, wrap the model with
            `find_unused_parameters=True`. Not for methods that reselect every step or train
            densely, nor on FSDP. `close()` gives the model back.
        unmask_every: k, for increment methods; 1 (default) is the paper. On steps 0, k, 2k, ...
            the weights the schedule unmasks over that step and the k - 1 after it are unmasked
            at once (|Λ| after step s never exceeds the schedule's count after step
            min(s + k - 1, T - 1)); the steps in between rank nothing.
        **optimizer_kwargs: passed to the wrapped optimizer (lr, weight_decay, betas, ...).

    Weights whose score is zero or not finite are never selected; the schedule's quota they
    leave unused carries over to the next step (so |Λ| may lag the schedule, never exceed it).

    Where it differs from a torch.optim.Optimizer: `param_groups` are the wrapped optimizers'
    groups (LR schedulers work), and the slots' group holds the slot buffer, not the model's
    candidates; `state` is a read-only view of the wrapped optimizers' state; `add_param_group`
    raises. `state_dict()` has torch's `state` and `param_groups` plus unmask's entries (see
    `unmask.optimize.checkpoint`). torch.distributed.checkpoint's `get_optimizer_state_dict` is not
    supported (it keys state by model parameter name; the slot buffer has none: KeyError):
    save `state_dict()` with torch.save, one file per rank under FSDP.

    FSDP2 (`fully_shard`, Shard(0) on a 1-D mesh): build the optimizer on every rank, on the
    sharded model; every rank makes the selection a single process would make. Slots,
    optimizer state and `state_dict()` are per rank; counts, `selected()`, `allocation()` and
    `delta()` are global; which calls communicate is listed in `unmask.optimize.sharding`.
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
        sparse_backward: bool = False,
        unmask_every: int = 1,
        **optimizer_kwargs: Any,
    ) -> None:
        check_finite_options(optimizer, optimizer_kwargs)  # before anything touches the model
        check_model_free(model)
        self.model = model
        self.method = make_method(method, score_eps=score_eps, score_exp=score_exp, seed=seed)
        self.schedule = get_schedule(schedule)
        check_options(
            self.method, adam_step, total_steps, low_memory, sparse_backward, unmask_every
        )
        self.unmask_every = unmask_every
        self.total_steps = None if total_steps is None else check_total_steps(total_steps)
        self.method.attach(model)
        cands = find_candidates(model, self.method, include, exclude, dense)
        self.method.bind(model, [p for _, p in cands.sparse])
        self._names = [n for n, _ in cands.sparse]
        self._params = [p for _, p in cands.sparse]
        self._shards = detect_shards(
            self.method, cands, freeze_unselected, low_memory, sparse_backward
        )
        self._dense_names = [n for n, _ in cands.dense]
        self._dense_params = [p for _, p in cands.dense]
        self._dense_numel = cands.dense_numel
        self.budget = sparse_budget(self.method, budget, cands, dense_in_budget)
        self.dense_in_budget = dense_in_budget
        self.total_budget = total_budget(self.method, self.budget, cands, dense_in_budget)

        self._selector = Selector(
            self.method, self.schedule, self.budget, self.total_steps, cands.sparse, self._shards
        )
        self._slots, self._repeat = self._selector.slots, self._selector.repeat

        self._sparse = (
            make_sparse_inner(optimizer, [self._slots.delta], optimizer_kwargs, adam_step)
            if self._params
            else None
        )
        self._slots.inner = self._sparse
        self._dense = (
            optimizer(self._dense_params, **optimizer_kwargs) if self._dense_params else None
        )
        super().__init__([self._slots.delta] + self._dense_params, {})
        self._built = True
        self._inner = [o for o in (self._sparse, self._dense) if o is not None]
        self._link_param_groups()
        self.state = WrappedState(self._inner)

        self.steps_done = self.num_updates = self.num_skipped_steps = self.consecutive_skips = 0
        self.max_nonfinite_steps = check_max_nonfinite_steps(max_nonfinite_steps)
        self.calibrated = not self.method.needs_calibration
        if self.method.selects_all:
            self._selector.choose_all()
        elif self.method.chooses_once and self.calibrated:
            with torch.no_grad():
                self._selector.choose_once(None)
        self.low_memory, self.sparse_backward = low_memory, sparse_backward
        # A weak reference: the tap must not keep a dropped optimizer alive.
        quota = weakref.WeakMethod(self._quota)
        self._tap = self._selector.tap(lambda: quota()()) if low_memory else None
        self._switch = BackwardSwitch(
            model,
            self._selector,
            freeze_unselected=freeze_unselected,
            sparse_backward=sparse_backward,
            unmask_every=unmask_every,
            low_memory=low_memory,
        )
        self._switch.refresh(self.steps_done, self.calibrated)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once built: the parameters this optimizer trains are chosen at construction
        (`include`, `exclude`, `dense`); build a new SelectiveOptimizer to train others."""
        if getattr(self, "_built", False):  # not the group torch.optim.Optimizer.__init__ adds
            raise ValueError(
                "SelectiveOptimizer does not take new parameter groups: its parameters are the "
                "candidates and dense parameters chosen when it was built; build a new "
                "SelectiveOptimizer (with include=/dense= patterns) to train other parameters"
            )
        super().add_param_group(param_group)

    def _link_param_groups(self) -> None:
        # The inner optimizers own the hyperparameters; sharing their group dicts lets LR
        # schedulers and Trainer adjust `lr` on this object as on any torch optimizer.
        self.param_groups = [group for o in self._inner for group in o.param_groups]

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
        check_same_device(self._params, self._slots.delta.device)
        slots = self._slots
        check_calibrated(self.method, self.calibrated)
        if not self._gradients_finite():
            self._skip_step()
            return loss
        self.consecutive_skips = 0
        gathered_for = slots.layout
        if self.method.grows_mask and self._selector.num_chosen < self.budget:
            self._selector.unmask(self._quota(), self._tap)
            if self._selector.num_chosen >= self.budget:
                self.method.detach()  # the mask is final: stop gathering statistics
            self._switch.freeze_if_final(self.calibrated)
        elif self._repeat is not None:
            self._selector.reselect()
        # Under FSDP a rank may hold none of the selected weights yet; it still steps its (zero)
        # slots, so that a per-tensor step count (adam_step="global") matches a single process.
        if slots.layout or (self._shards is not None and self._selector.num_chosen > 0):
            if slots.layout is not gathered_for and self._tap is None:
                slots.gather_grads()  # new weights were unmasked
            self._selector.update(self._sparse)
        if self._dense is not None:
            self._dense.step()
        dense = 0 if self.method.trains_dense else self._dense_numel  # `full`: in num_selected
        self.num_updates += self.num_selected + dense
        self.steps_done += 1
        self._clear_pending()
        self.method.clear()
        self._switch.prepare(self.steps_done, self.calibrated)
        return loss

    def _check_same_parameters(self) -> None:
        if self._shards is None:  # FSDP swaps the registered parameters itself
            names = self._names + self._dense_names
            params = self._params + self._dense_params
            check_same_parameters(self.model, list(zip(names, params, strict=True)))

    def _gradients_finite(self) -> bool:
        self._switch.average_grads()
        gather = self._tap is None
        return step_is_finite(self._selector, self._dense_params, self._shards, gather)

    def _skip_step(self) -> None:
        self._clear_pending()
        self.method.clear()
        self.num_skipped_steps += 1
        self.consecutive_skips += 1
        warn_or_stop(
            self.steps_done,
            self.consecutive_skips,
            self.num_skipped_steps,
            self.max_nonfinite_steps,
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every candidate and dense parameter of the model."""
        self._clear_pending()
        self.method.clear()
        for p in self._params + self._dense_params:
            if p.grad is not None and set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def _quota(self) -> int:
        """How many weights the coming step unmasks (0 before calibration)."""
        return self._selector.quota(self.steps_done, self.unmask_every) if self.calibrated else 0

    # ------------------------------------------------------------------ hooks and clipping

    def close(self) -> None:
        """Give the model back: remove low-memory mode's gradient hooks and the sparse backward.

        Call before building another optimizer on the same model. `requires_grad` flags that
        `freeze_unselected` turned off stay off (set them back with `requires_grad_(True)`).
        """
        if self._tap is not None:
            self._tap.close()
        self._switch.remove()
        self.method.detach()

    def _clear_pending(self) -> None:
        if self._tap is not None:
            self._tap.clear()
        self._switch.clear()

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
        if self._switch.backward is not None:
            return self._switch.clip_grad_norm_(dense, max_norm)
        if self._tap is not None:  # the candidates' gradients are gone: the tap kept the rest
            return self._tap.clip_grad_norm_(dense, max_norm)
        grads = [p.grad for p in self._params if p.grad is not None] + dense
        return clip_grad_norm_(grads, max_norm, self._shards)

    # ------------------------------------------------------------------ calibration (FISH)

    @torch.no_grad()
    def calibrate(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn | None = None,
        num_batches: int | None = None,
    ) -> None:
        """Choose the mask of a calibration method ("fish") from Σ g² over `batches`.

        `loss_fn(model, batch)` returns the loss; by default ``model(**batch).loss``. Uses at
        most `num_batches` batches. Holds one float32 accumulator per candidate while it runs.
        Leaves the model's gradients cleared and its weights unchanged.
        """
        if not self.method.needs_calibration:
            raise RuntimeError(f"method {self.method.name!r} does not use calibration batches")
        with self._tap.paused() if self._tap is not None else nullcontext():
            fisher = fisher_sums(
                self.model, self._params, batches, loss_fn, num_batches, self.zero_grad
            )
        self._selector.choose_once(fisher)
        self.calibrated = True
        self._switch.refresh(self.steps_done, self.calibrated)

    # ------------------------------------------------------------------ inspection

    @property
    def num_selected(self) -> int:
        """Weights currently selected for training (all weights, for `full`); global under FSDP."""
        return self._dense_numel if self.method.trains_dense else self._selector.num_training

    @property
    def num_changed(self) -> int:
        """Weights whose value may differ from the pretrained model (what the delta stores)."""
        return self._selector.num_chosen + self._dense_numel

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are FSDP2 shards (see sharding.py)."""
        return self._shards is not None

    @property
    def sparse_names(self) -> list[str]:
        """Candidates whose selected gradients the sparse backward computes (the others keep
        the dense path); empty while it is not installed."""
        return self._switch.sparse_names

    @property
    def sparse_entries_computed(self) -> int:
        """Selected-weight gradients the sparse backward computed so far (0 if not installed)."""
        return self._switch.entries_computed

    @property
    def dense_names(self) -> list[str]:
        """Parameters trained whole by the wrapped optimizer (a new head; all, for `full`)."""
        return list(self._dense_names)

    def selected(self) -> dict[str, Tensor]:
        """Per candidate tensor, the ascending flat indices of its selected weights (int64).

        Under FSDP: every rank's selection, as flat indices of the full tensors (no communication).
        """
        return self._selector.selected()

    def allocation(self) -> dict[str, int]:
        """Per parameter name, how many of its weights may have changed (dense ones: all)."""
        dense = zip(self._dense_names, self._dense_params, strict=True)
        return {**self._selector.counts(), **{n: p.numel() for n, p in dense}}

    def state_bytes(self) -> int:
        """Bytes of every persistent buffer this optimizer holds (slots and optimizer state);
        under FSDP, this rank's."""
        return state_bytes(self._selector.buffers(), self._inner)

    # ------------------------------------------------------------------ results and checkpoints

    def delta(self) -> SparseDelta:
        """The trained change: the selected weights' deltas plus the dense tensors.

        Under FSDP this is collective: every rank must call it. It gathers every rank's slots
        and the full dense tensors, and every rank gets the same delta, the one an unsharded
        process would make (indices of the full tensors); save it from rank 0.
        """
        self._check_same_parameters()
        return _trained_delta(self)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: slots, wrapped optimizer state, counters, configuration
        (the layout is in `unmask.optimize.checkpoint`).

        Under FSDP it is this rank's (its slots and shards' state, plus the global selection):
        each rank saves its own and loads it back on the same rank of as many ranks.
        """
        return build_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()` and write the selected weights' trained values into the model.

        Dense parameters are not written: load them with the model checkpoint. Everything is
        checked first (configuration, slot tensors' types, shapes and index ranges against this
        model, finite values in the parameters' dtypes, the wrapped optimizers' state shapes); a
        state_dict that fails raises ValueError and leaves the model and the optimizer unchanged.
        """
        restore_state_dict(self, state_dict)
        if self.method.grows_mask and self._selector.num_chosen >= self.budget:
            self.method.detach()  # resumed with a final mask: no statistics to gather
        self._switch.refresh(self.steps_done, self.calibrated, reload=True)


def _trained_delta(opt: SelectiveOptimizer) -> SparseDelta:
    """`opt.delta()`: the selected weights' deltas plus the dense tensors, whole (collective
    under FSDP)."""
    sparse, base_values = opt._selector.trained()
    dense = zip(opt._dense_names, opt._dense_params, strict=True)
    replace = {n: _full(p.detach()).cpu().clone() for n, p in dense}
    return SparseDelta.from_training(
        opt.model, sparse, base_values, replace, _training_metadata(opt)
    )


def _training_metadata(opt: SelectiveOptimizer) -> dict[str, Any]:
    """What a delta records of the training run that made it."""
    return {
        **opt.method.config(),
        "budget": opt.total_budget,
        "sparse_budget": opt.budget,
        "dense_in_budget": opt.dense_in_budget,
        "total_steps": opt.total_steps,
        "steps_done": opt.steps_done,
        "schedule": opt.schedule.name,
        "base_model": _base_model_name(opt.model),
    }


def _base_model_name(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None)
    config = getattr(model, "config", None)
    if not name and config is not None:
        name = getattr(config, "_name_or_path", None)
    return str(name) if name else None
