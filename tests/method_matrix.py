"""The method test matrix, generated from `unmask.METHODS` and the methods' capability fields.

A method registered in METHODS is in every list here the moment it is registered; nothing in the
tests names a method to decide what it needs.
"""

from __future__ import annotations

import torch
from conftest import MODELS, make_batches, snapshot

from unmask import METHODS, SelectiveOptimizer, UniformSchedule


def method_names(*, low_memory: bool | None = None) -> list[str]:
    """The registered methods, sorted; `low_memory`: only those that do (True) or do not (False)
    support low-memory mode."""
    return [
        name
        for name in sorted(METHODS)
        if low_memory is None or METHODS[name].supports_low_memory == low_memory
    ]


def method_kwargs(method: str, total_steps: int, budget: str = "2%") -> dict:
    """The SelectiveOptimizer arguments `method` needs: a budget if it takes one, T if it
    spreads the budget over the run."""
    cls = METHODS[method]
    out: dict = {}
    if cls.takes_budget:
        out["budget"] = budget
    if cls.needs_total_steps:
        out["total_steps"] = total_steps
    return out


def prepare(opt: SelectiveOptimizer, batches: list) -> None:
    """What a method needs before its first step (calibration batches)."""
    if opt.method.needs_calibration:
        opt.calibrate(batches)


def can_run_on(method: str, model_kind: str) -> bool:
    """Whether the tiny model has candidates for the method (the Llama one has no biases)."""
    model = MODELS[model_kind]()
    try:
        SelectiveOptimizer(model, method=method, **method_kwargs(method, 2)).close()
    except ValueError as err:
        if "no parameter is a candidate" in str(err):
            return False
        raise
    return True


def _changed(model, base) -> dict[str, torch.Tensor]:
    return {
        n: (p.detach() != base[n]).flatten().nonzero().flatten()
        for n, p in model.named_parameters()
    }


def assert_changes_only_selected(method: str, model_kind: str, steps: int = 6) -> None:
    """Train `method` on a tiny model; after every step, every weight outside the delta is
    bit-identical to the pretrained one, the budget holds, and the mask follows its kind."""
    model = MODELS[model_kind]()
    base = snapshot(model)
    opt = SelectiveOptimizer(
        model, method=method, lr=1e-2, weight_decay=0.1, **method_kwargs(method, steps)
    )
    batches = make_batches(model_kind, steps + 2)
    prepare(opt, batches[:2])
    previous: dict[str, set] = {}
    for t, batch in enumerate(batches):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        selected = {n: set(i.tolist()) for n, i in opt.selected().items()}
        delta = opt.delta()
        # Every weight outside the delta is bit-identical to the pretrained one.
        for name, where in _changed(model, base).items():
            allowed = (
                set(range(base[name].numel()))
                if name in delta.replace
                else set(delta.sparse[name][0].tolist())
                if name in delta.sparse
                else set()
            )
            assert set(where.tolist()) <= allowed, f"{method}: {name} changed outside its delta"
        m = opt.method
        if not (m.reselects or m.trains_dense):
            assert opt.num_changed <= max(opt.budget, 1)
            for name, idx in previous.items():  # the mask only grows
                assert idx <= selected.get(name, set())
        if m.grows_mask:
            expected = UniformSchedule().cumulative(t, opt.budget, steps)
            assert opt.num_selected == expected
        if m.reselects:
            assert opt.num_selected <= opt.budget
        previous = selected
    if not opt.method.trains_dense:
        assert sum(p.numel() for p in model.parameters()) > opt.num_changed
    opt.close()
