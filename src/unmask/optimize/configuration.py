"""What a method and the options need before an optimizer is built, read from the method's
capability fields: total steps, low-memory mode, sparse backward, several processes, FSDP, and
the budget."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unmask.choose.budget import Budget, resolve_budget
from unmask.choose.candidates import Candidates
from unmask.choose.methods import Method
from unmask.optimize import sparse_backward
from unmask.optimize.index_space import offsets_of
from unmask.optimize.sharding import Shards, world_size


def check_options(
    method: Method,
    adam_step: str,
    total_steps: int | None,
    low_memory: bool,
    sparse_backward: bool,
    unmask_every: int,
) -> None:
    """ValueError for a SelectiveOptimizer option that is invalid or that the method cannot
    take (the checks below, in this order)."""
    if adam_step not in ("per-weight", "global"):
        raise ValueError(f"adam_step must be 'per-weight' or 'global', got {adam_step!r}")
    check_method_options(method, total_steps, low_memory)
    check_sparse_backward(method, sparse_backward)
    check_unmask_every(method, unmask_every)


def check_method_options(method: Method, total_steps: int | None, low_memory: bool) -> None:
    """ValueError for options the method cannot take, read from its capability fields."""
    if method.needs_total_steps and total_steps is None:
        raise ValueError(
            f"method {method.name!r} spreads the budget over the training run: pass "
            "total_steps=T (the number of optimizer steps)"
        )
    if low_memory and method.allocation_of() != "global":
        raise ValueError(
            f"low_memory=True is not available with allocation="
            f"{method.allocation_of()!r} yet; use the standard mode"
        )
    if low_memory and not method.supports_low_memory:
        raise ValueError(
            f"low_memory=True is not available for method {method.name!r}: it needs "
            "every weight's gradient at once; use the standard mode (low_memory=False)"
        )
    if not method.distributed and world_size() > 1:
        raise ValueError(
            f"method {method.name!r} ranks with statistics each process gathers from "
            "its own batch, so the processes would select different weights; it runs in a "
            "single process only: use 'id3' under torch.distributed"
        )


def sparse_budget(
    method: Method, budget: Budget | None, candidates: Candidates, dense_in_budget: bool
) -> int:
    """The slots' budget: weights of the candidates that may change.

    A method that takes no budget trains all its candidates (none, as slots, for dense
    training); otherwise the budget over the pool, less the dense parameters' size when they
    count against it.
    """
    name, sparse_numel, dense_numel = method.name, candidates.sparse_numel, candidates.dense_numel
    dense_names = [n for n, _ in candidates.dense]
    pool = sparse_numel + (dense_numel if dense_in_budget else 0)
    if not method.takes_budget:
        if budget is not None and resolve_budget(budget, max(pool, 1)) < pool:
            raise ValueError(
                f"method {name!r} trains all {pool:,} of its weights, more than the budget "
                f"{budget!r}; pass budget=None, or use a method that selects (e.g. 'id3')"
            )
        return 0 if method.trains_dense else sparse_numel
    if budget is None:
        raise ValueError(f"method {name!r} needs a budget, e.g. budget='0.1%' or 100000")
    total = resolve_budget(budget, pool)
    sparse = total - dense_numel if dense_in_budget else total
    if sparse < 1:
        raise ValueError(
            f"budget {budget!r} is {total:,} weights, but the dense parameters "
            f"{dense_names} already use {dense_numel:,} of it; raise the budget or pass "
            "dense_in_budget=False"
        )
    return sparse


def total_budget(method: Method, sparse: int, candidates: Candidates, dense_in_budget: bool) -> int:
    """B as reported: the slots' budget `sparse` plus the dense parameters' size when they
    count against it (a dense-training method's weights are its candidates already)."""
    charged = dense_in_budget and not method.trains_dense
    return sparse + (candidates.dense_numel if charged else 0)


def check_sparse_backward(method: Method, sparse_backward: bool) -> None:
    """ValueError if `sparse_backward=True` cannot work with the method."""
    if not sparse_backward:
        return
    if method.reselects or method.trains_dense:
        what = "picks a new mask every step" if method.reselects else "trains every weight densely"
        raise ValueError(
            f"sparse_backward=True is not available for method {method.name!r}: it {what}, so "
            "every weight's gradient is needed; use sparse_backward=False, or a static or "
            "increment method (e.g. 'random', 'pafi', 'id3')"
        )


def check_calibrated(method: Method, calibrated: bool) -> None:
    """RuntimeError before a step of a calibration method that has not been calibrated."""
    if not calibrated:
        raise RuntimeError(
            f"method {method.name!r} chooses its mask from calibration batches: call "
            "opt.calibrate(batches) before the first step"
        )


def check_model_free(model: nn.Module) -> None:
    """ValueError if another SelectiveOptimizer's sparse backward is installed on `model`: it
    froze the tensors it computes, so a new optimizer would see other candidates."""
    if sparse_backward.installed_on(model):
        raise ValueError(
            "this model still carries another SelectiveOptimizer's sparse backward (its "
            "selected tensors are frozen, so this optimizer would train other candidates): "
            "call close() on that optimizer first"
        )


def check_unmask_every(method: Method, unmask_every: int) -> None:
    """ValueError unless `unmask_every` is a positive int, and 1 for methods that do not grow
    their mask step by step."""
    if isinstance(unmask_every, bool) or not isinstance(unmask_every, int) or unmask_every < 1:
        raise ValueError(f"unmask_every must be an int >= 1, got {unmask_every!r}")
    if unmask_every > 1 and not method.grows_mask:
        raise ValueError(
            f"unmask_every={unmask_every} applies to methods that unmask weights step by step "
            f"(e.g. 'id3'); method {method.name!r} does not: leave unmask_every=1"
        )


def _refuse_under_fsdp(
    method: Method, freeze_unselected: bool | None, low_memory: bool, sparse_backward: bool
) -> None:
    """ValueError for the options that do not work on FSDP-sharded parameters, with what to do."""
    if sparse_backward:
        raise ValueError(
            "sparse_backward=True is not available on FSDP-sharded models (FSDP gathers and "
            "reduces whole weight gradients); use sparse_backward=False"
        )
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
    if not method.supports_fsdp:
        raise ValueError(
            f"method {method.name!r} is not available on FSDP-sharded models (its slots change "
            "owners every step); use 'id3'"
        )


def detect_shards(
    method: Method,
    candidates: Candidates,
    freeze_unselected: bool | None,
    low_memory: bool,
    sparse_backward: bool = False,
) -> Shards | None:
    """The FSDP2 shards of the candidates (None: not sharded), after refusing what does not
    work on them, or under DDP."""
    params: list[Tensor] = [p for _, p in candidates.sparse]
    shards = Shards.detect(candidates.sparse + candidates.dense, params, offsets_of(params))
    if shards is not None:
        _refuse_under_fsdp(method, freeze_unselected, low_memory, sparse_backward)
    elif low_memory and world_size() > 1:
        raise ValueError(
            "low_memory=True reads each gradient in backward, before DDP averages it over "
            f"the {world_size()} processes, so they would select different weights; "
            "use low_memory=False under torch.distributed"
        )
    return shards


def check_same_parameters(model: nn.Module, trained: list[tuple[str, Tensor]]) -> None:
    """RuntimeError if a trained parameter of the model is no longer the one held here.

    A module replaced after the optimizer was built (``model.classifier = nn.Linear(...)``)
    brings new parameter objects: the optimizer would go on training the old, detached ones
    and save them in the delta. An identity check by name, once per step. Not under FSDP,
    which swaps the registered parameters itself (the caller skips it there).
    """
    current = dict(model.named_parameters())
    for name, param in trained:
        if current.get(name) is not param:
            what = "is gone" if name not in current else "was replaced by a new tensor"
            raise RuntimeError(
                f"parameter {name} of the model {what} after the SelectiveOptimizer was "
                "built (a module was replaced or removed); this optimizer would train and "
                "save the old, detached parameter: build a new SelectiveOptimizer after "
                "changing the model"
            )


def check_same_device(params: list[Tensor], device: torch.device) -> None:
    """RuntimeError if the candidates left the device the optimizer was built on."""
    if params and params[0].device != device:
        raise RuntimeError(
            f"the model's parameters moved to {params[0].device} after the optimizer "
            f"was built on {device}; build the optimizer after model.to(device)"
        )
