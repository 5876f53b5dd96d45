"""Sparse backward: once the mask is final, compute only the selected weights' gradients.

For a `nn.Linear` whose weight W (out x in) holds selected flat indices S = {(r_i, c_i)}, the
weight no longer requires a gradient; backward computes the input gradient dX = dY W as usual and,
instead of the dense dW = dYᵀX, only

    g_i = Σ_t dY[t, r_i] · X[t, c_i]            (t over every token of the batch)

which it adds straight into the slots' `delta.grad` (so gradient accumulation over micro-batches
sums, as `.grad` does). A selected bias entry gets Σ_t dY[t, r]. An `nn.Embedding` entry (token r,
column c) gets the sum of dOut[t, c] over the positions t holding token r, from a compact sum over
the batch's distinct tokens (never the vocab x hidden gradient); a tied LM head is a Linear that
shares the embedding's weight, so both contributions reach the same slots.

Cost and memory: the entries of a Linear weight are a sampled dense-dense matrix product over
S's pattern, built once when the backward is installed (`unmask.optimize.entry_grads`, which
states its temporaries: O(T · (in + ROW_BLOCK)) elements in a reused scratch, never out x in);
the work is T·|S| multiply-adds instead of T·out·in.

What keeps the dense path (its selected entries are gathered from `.grad` as before): candidates
that are not the weight or bias of an `nn.Linear` or a transformers `Conv1D` (GPT-2, whose weight
is stored in x out: its entries' rows index the input) or the weight of an `nn.Embedding`
(LayerNorm, RMSNorm, convolutions, ...), embeddings with `max_norm`, `scale_grad_by_freq` or
`sparse=True`, a parameter that any unsupported module also holds, and tensors whose selected
fraction exceeds `MAX_DENSITY` (there the dense GEMM is the faster one; see
docs/sparse_backward.md).

The model is changed only while this is installed: the modules' `forward` is replaced by an
instance attribute and the sparse tensors' `requires_grad` is turned off; `remove()` (or the
owner being garbage-collected) puts both back. `state_dict` keys never change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.choose.token_moments import conv1d_type
from unmask.optimize import entry_grads
from unmask.optimize.entry_grads import EntryPattern, Scratch, entry_pattern
from unmask.optimize.slots import SlotBuffers

# A tensor whose selected fraction is above this keeps the dense path: the measured crossover,
# the largest fraction at which the entry kernel beat the dense weight GEMM on every Linear
# shape of the 135M model at T = 256 and 1024 (benchmarks/results/sparse_backward/crossover.json).
MAX_DENSITY = 0.02


@dataclass
class Entries:
    """The selected entries of one parameter: their slots, rows and columns (int64, ascending by
    row, then column; for a bias `cols` is unused), and for a matrix their `pattern`."""

    slots: Tensor
    rows: Tensor
    cols: Tensor
    pattern: EntryPattern | None = None


class _SelectedLinear(torch.autograd.Function):
    """F.linear (or, for a `plan.transposed` Conv1D, x W + b) whose backward adds the selected
    entries' gradients into the slots."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, anchor: Tensor, plan: _Plan
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return F.linear(x, weight.t() if plan.transposed else weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        plan: _Plan = ctx.plan
        accumulate = plan.owner.accumulates()
        # In the (out x in) orientation of nn.Linear; a Conv1D's weight is its transpose.
        w = weight.t() if plan.transposed else weight
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = (dy @ w.to(dy.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy2.t() @ x2.to(dy.dtype)).to(weight.dtype)
            dw = dw.t() if plan.transposed else dw
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        if accumulate:
            with torch.no_grad():
                plan.add_linear(dy2, x2)
        return dx, dw, db, None, None


class _SelectedEmbedding(torch.autograd.Function):
    """F.embedding whose backward adds the selected entries' gradients into the slots."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, anchor: Tensor, plan: _Plan) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.plan, ctx.num_weights = plan, weight.shape[0]
        return F.embedding(ids, weight, plan.module.padding_idx)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        if ctx.plan.owner.accumulates():
            with torch.no_grad():
                ctx.plan.add_embedding(dout.reshape(-1, dout.shape[-1]), ids.reshape(-1))
        return None, None, None, None


class _Plan:
    """What one installed module computes in backward: the entries of its sparse parameters."""

    def __init__(
        self, owner: SparseBackward, module: nn.Module, weight: Entries | None, bias: Entries | None
    ) -> None:
        self.owner, self.module, self.weight, self.bias = owner, module, weight, bias
        # A Conv1D stores its weight as (in x out): its entries' rows index the input.
        self.transposed = not isinstance(module, (nn.Linear, nn.Embedding))

    def _add(self, entries: Entries, grads: Tensor) -> None:
        self.owner.slots.delta.grad.index_add_(0, entries.slots, grads)
        self.owner.entries_computed += entries.slots.numel()

    def add_linear(self, dy: Tensor, x: Tensor) -> None:
        dtype = self.owner.slots.delta.dtype
        if self.weight is not None:
            w = self.weight
            rows_of, cols_of = (x, dy) if self.transposed else (dy, x)
            grads = entry_grads.linear_entry_grads(
                rows_of, cols_of, w.pattern, dtype, self.owner.scratch
            )
            self._add(w, grads)
        if self.bias is not None:
            self._add(self.bias, dy.sum(0).to(dtype).index_select(0, self.bias.rows))

    def add_embedding(self, dout: Tensor, ids: Tensor) -> None:
        w, dtype = self.weight, self.owner.slots.delta.dtype
        grads = entry_grads.embedding_entry_grads(
            dout, ids, w.rows, w.cols, self.module.padding_idx, dtype
        )
        self._add(w, grads)


class _SparseForward:
    """The forward installed on a module holding sparse tensors (an instance attribute, so the
    module's class is untouched); falls back to the module's own once the owner is gone."""

    def __init__(self, ref: weakref.ref, module: nn.Module) -> None:
        self.ref, self.module = ref, module
        self.embedding = isinstance(module, nn.Embedding)

    def __call__(self, x: Tensor) -> Tensor:
        plan, module = self.ref(), self.module
        if plan is None:  # the owner is gone (its finalizer restores the forward)
            return type(module).forward(module, x)
        if self.embedding:
            return _SelectedEmbedding.apply(x, module.weight, plan.owner.anchor, plan)
        plan.owner.scratch.forget()  # a new forward: the inputs it transposed may change
        return _SelectedLinear.apply(x, module.weight, module.bias, plan.owner.anchor, plan)

    def _refuse(self, what: str) -> None:
        # A copy would share this module's forward (and its frozen flags): it would compute
        # with the original's weights and feed the original's optimizer.
        raise TypeError(
            f"cannot {what} a model while a SelectiveOptimizer's sparse backward is installed "
            "on it: call opt.close() first (or copy the base model and apply opt.delta() to it)"
        )

    def __deepcopy__(self, memo: dict) -> Any:
        self._refuse("deepcopy")

    def __reduce_ex__(self, protocol: Any) -> Any:
        self._refuse("pickle (torch.save)")


def installed_on(model: nn.Module) -> bool:
    """Whether a sparse backward is installed on `model` (some module has its forward)."""
    return any(isinstance(m.__dict__.get("forward"), _SparseForward) for m in model.modules())


def _supports(module: nn.Module, role: str) -> bool:
    """Whether the sparse backward computes `module`'s parameter `role`."""
    if type(module) is nn.Linear or type(module) is conv1d_type():
        return role in ("weight", "bias")
    if type(module) is nn.Embedding:
        plain = module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
        return role == "weight" and plain
    return False


def sparse_capable(model: nn.Module, params: list[Tensor]) -> list[bool]:
    """Per candidate tensor: whether every module holding it is one the sparse backward computes
    (a parameter shared with any other module keeps the dense path)."""
    ok = {id(p): True for p in params}
    seen = {id(p): False for p in params}
    for module in model.modules():
        for role, p in module._parameters.items():
            if p is not None and id(p) in ok:
                seen[id(p)] = True
                ok[id(p)] = ok[id(p)] and _supports(module, role)
    return [ok[id(p)] and seen[id(p)] for p in params]


def _restore(records: list[tuple[nn.Module, Any]], frozen: list[Tensor]) -> None:
    """Put the modules' own forward back and turn requires_grad back on."""
    for module, previous in records:
        module.__dict__.pop("forward", None)
        if previous is not None:
            module.forward = previous
    for p in frozen:
        p.requires_grad_(True)


class SparseBackward:
    """The sparse backward of one SelectiveOptimizer's final mask, installed on its model.

    Args:
        model: the model; its modules holding sparse tensors get the sparse forward.
        params: the candidate tensors, in the slots' order.
        slots: the slots (their `layout` is the final mask); gradients go to `slots.delta.grad`.
        max_density: tensors with a larger selected fraction keep the dense path (None: the
            module's MAX_DENSITY).
        freeze_idle: candidate tensors holding no selected weight stop requiring a gradient
            too (while installed).

    Gradients reach the slots only in a backward that accumulates (`loss.backward()`), not in
    `torch.autograd.grad`; a double backward (create_graph=True) raises. Copying or pickling
    the model while installed raises (close the optimizer first).

    Attributes:
        sparse: positions of the candidates whose selected gradients are computed here.
        entries_computed: selected-entry gradients computed so far (one per entry per backward).
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[Tensor],
        slots: SlotBuffers,
        max_density: float | None = None,
        freeze_idle: bool = True,
    ) -> None:
        max_density = MAX_DENSITY if max_density is None else max_density
        self.slots = slots
        self.num_slots = slots.n  # the mask this was built for (it only grows)
        self.entries_computed = 0
        self.scratch = Scratch()
        # Makes autograd call the sparse backward even where no input requires a gradient (the
        # first layer); it never gets a gradient itself.
        self.anchor = torch.zeros((), device=slots.delta.device, requires_grad=True)
        # The anchor's gradient accumulator: the engine runs it in loss.backward(), not in
        # torch.autograd.grad(loss, inputs), which must leave every gradient alone.
        with torch.enable_grad():  # this may be built inside step(), under no_grad
            self._anchor_node = self.anchor.view_as(self.anchor).grad_fn.next_functions[0][0]
        capable = sparse_capable(model, params)
        layout = {i: (s, local) for i, s, local in slots.layout}
        self.sparse = [
            i for i, p in enumerate(params)
            if capable[i] and i in layout and layout[i][1].numel() <= max_density * p.numel()
        ]  # fmt: skip
        by_id = {id(params[i]): i for i in self.sparse}
        self._plans: list[_Plan] = []
        records: list[tuple[nn.Module, Any]] = []
        for module in model.modules():
            held = module._parameters.items()
            roles = {r: by_id[id(p)] for r, p in held if p is not None and id(p) in by_id}
            if not roles:
                continue
            dtype = slots.delta.dtype
            entries = {r: _entries(params[i], *layout[i], r, dtype) for r, i in roles.items()}
            plan = _Plan(self, module, entries.get("weight"), entries.get("bias"))
            self._plans.append(plan)
            records.append((module, module.__dict__.get("forward")))
            module.forward = _SparseForward(weakref.ref(plan), module)
        # The sparse tensors need no weight gradient, nor (unless told to keep them, e.g. for a
        # reentrant checkpoint fed by an idle embedding) the tensors holding no selected weight.
        idle = [i for i in range(len(params)) if i not in layout] if freeze_idle else []
        frozen = [params[i] for i in self.sparse + idle if params[i].requires_grad]
        for p in frozen:
            p.requires_grad_(False)
            p.grad = None
        self._finalizer = weakref.finalize(self, _restore, records, frozen)

    def accumulates(self) -> bool:
        """In a backward: whether it accumulates gradients (loss.backward(), not autograd.grad).
        RuntimeError for a double backward, whose second-order terms through the selected
        weights this backward does not record."""
        if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
            raise RuntimeError(
                "sparse_backward=True does not support double backward (create_graph=True: "
                "gradient penalties, higher-order gradients): the selected weights' second-order "
                "terms are not recorded; use sparse_backward=False"
            )
        return torch._C._will_engine_execute_node(self._anchor_node)

    def remove(self) -> None:
        """Give the modules their own forward and the tensors their requires_grad back."""
        self.scratch.forget()
        self._finalizer()


def _entries(param: Tensor, slots: Tensor, local: Tensor, role: str, dtype: torch.dtype) -> Entries:
    if role == "bias" or param.dim() == 1:
        return Entries(slots, local, local)
    cols = param.shape[1]
    rows, cols = torch.div(local, cols, rounding_mode="floor"), local % cols
    return Entries(slots, rows, cols, entry_pattern(rows, cols, tuple(param.shape), dtype))
