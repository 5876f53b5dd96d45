"""The layout of `SelectiveOptimizer.state_dict()`, and the checks a checkpoint passes before
anything of it is loaded.

Layout (version 1; 0.1 wrote it without "state" and "param_groups", which loading ignores, so
its checkpoints load unchanged):

    "state", "param_groups": torch.optim's layout of the wrapped optimizers' state (the slot
        buffer first, if any, then the dense parameters), for generic readers; the same
        per-parameter state as "sparse_optimizer" / "dense_optimizer", which loading uses

    "unmask": {"version", "method", "budget", "total_steps", "schedule", "candidates", "dense",
               "capacity", "num_slots", "steps_done", "num_updates", "num_skipped_steps",
               "calibrated"}
    "index", "base", "delta": the used slots (1-D, num_slots long; see `unmask.optimize.slots`)
    "active": repeat-S's bool per slot, else None
    "sparse_optimizer", "dense_optimizer": the wrapped optimizers' own state_dicts, or None
    "sharded": under FSDP {"rank", "world", "chosen"}, else None
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from unmask.optimize.inner_optimizer import torch_layout
from unmask.optimize.sharding import local as _local

if TYPE_CHECKING:
    from unmask.optimize.optimizer import SelectiveOptimizer

STATE_VERSION = 1


def build_state_dict(opt: SelectiveOptimizer) -> dict[str, Any]:
    """`opt`'s state in the layout above (tensors cloned, the inner state_dicts live)."""
    slots, n = opt._slots, opt._slots.n
    sparse = opt._sparse.state_dict() if opt._sparse else None
    dense = opt._dense.state_dict() if opt._dense else None
    sharded = None
    if opt._shards is not None:
        sharded = {
            "rank": opt._shards.rank,
            "world": opt._shards.world,
            "chosen": opt._shards.chosen.clone(),
        }
    return {
        "unmask": {
            "version": STATE_VERSION,
            **_configuration(opt),
            "unmask_every": opt.unmask_every,
            "capacity": slots.capacity,
            "num_slots": n,
            "steps_done": opt.steps_done,
            "num_updates": opt.num_updates,
            "num_skipped_steps": opt.num_skipped_steps,
            "calibrated": opt.calibrated,
        },
        "index": slots.index[:n].clone(),
        "base": slots.base[:n].clone(),
        "delta": slots.delta[:n].clone(),
        "active": None if opt._repeat is None else opt._repeat.active[:n].clone(),
        "sparse_optimizer": sparse,
        "dense_optimizer": dense,
        "sharded": sharded,
        **torch_layout([d for d in (sparse, dense) if d is not None]),
    }


def restore_state_dict(opt: SelectiveOptimizer, state_dict: dict[str, Any]) -> None:
    """Check `state_dict` whole (ValueError, nothing changed), then load it into `opt` and
    write the selected weights' trained values into the model."""
    check_state_dict(opt, state_dict)  # the sharding record included
    opt._clear_pending()
    meta = state_dict["unmask"]
    if opt._shards is not None:
        opt._shards.chosen = state_dict["sharded"]["chosen"].to(opt._shards.device)
    slots = opt._slots
    if meta["capacity"] != slots.capacity:
        slots.grow(meta["capacity"])
    n = meta["num_slots"]
    device = slots.delta.device
    slots.index[:n] = state_dict["index"].to(device)
    slots.base[:n] = state_dict["base"].to(device)
    slots.delta[:n] = state_dict["delta"].to(device)
    slots.delta[n:] = 0
    slots.n = n
    if opt._repeat is not None:
        opt._repeat.load(state_dict["active"])
    if opt._sparse is not None:
        opt._sparse.load_state_dict(state_dict["sparse_optimizer"])
    if opt._dense is not None:
        opt._dense.load_state_dict(state_dict["dense_optimizer"])
    opt._link_param_groups()
    opt.steps_done = meta["steps_done"]
    opt.num_updates = meta["num_updates"]
    opt.num_skipped_steps = meta.get("num_skipped_steps", 0)
    opt.calibrated = meta["calibrated"]
    slots.rebuild_layout(None if opt._repeat is None else opt._repeat.active)
    with torch.no_grad():
        slots.write_back(slots.touched)


def _configuration(opt: SelectiveOptimizer) -> dict[str, Any]:
    """The settings a checkpoint must have been made with to be loaded into `opt`."""
    return {
        "method": opt.method.config(),
        "budget": opt.budget,
        "total_steps": opt.total_steps,
        "schedule": opt.schedule.name,
        "candidates": list(opt._names),
        "dense": list(opt._dense_names),
    }


def check_state_dict(opt: SelectiveOptimizer, state_dict: Any) -> None:
    """ValueError unless `state_dict` can be loaded whole into `opt` and its model."""
    meta = state_dict.get("unmask") if isinstance(state_dict, dict) else None
    if not isinstance(meta, dict) or meta.get("version") != STATE_VERSION:
        raise ValueError(
            "not a SelectiveOptimizer state_dict (missing 'unmask' section or unknown version)"
        )
    mine = _configuration(opt)
    counters = ("capacity", "num_slots", "steps_done", "num_updates")
    missing = [k for k in (*mine, *counters, "calibrated") if k not in meta]
    missing += [k for k in ("index", "base", "delta") if k not in state_dict]
    if missing:
        raise ValueError(
            f"the checkpoint lacks {missing}: it is damaged or not from SelectiveOptimizer."
            "state_dict(); resume from another checkpoint or start again"
        )
    # unmask_every changes which weights are unmasked when; checkpoints made before it existed
    # used the paper's schedule (1)
    for key, value in [*mine.items(), ("unmask_every", opt.unmask_every)]:
        if meta.get(key, 1) != value:
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
    n, capacity, have = meta["num_slots"], meta["capacity"], opt._slots.capacity
    if n > capacity or capacity < have:
        raise refuse(
            f"{n:,} slots in a capacity of {capacity:,} (this optimizer has {have:,};"
            " load into a freshly built optimizer)"
        )
    _check_slots(opt, state_dict, n, refuse)
    _check_inner_state(
        "sparse", opt._sparse, state_dict.get("sparse_optimizer"), [(capacity,)], refuse
    )
    _check_inner_state(
        "dense",
        opt._dense,
        state_dict.get("dense_optimizer"),
        [tuple(p.shape) for p in opt._dense_params],
        refuse,
    )
    saved = state_dict.get("sharded")
    if saved is not None and not (
        isinstance(saved, dict)
        and {"rank", "world"} <= set(saved)
        and torch.is_tensor(saved.get("chosen"))
    ):
        raise refuse("its sharding record is malformed")
    _check_sharding(opt, saved)


def _check_slots(
    opt: SelectiveOptimizer, state_dict: dict, n: int, refuse: Callable[[str], ValueError]
) -> None:
    """The slot tensors have n slots of the right types, inside `opt`'s candidate tensors
    (this process's parts of them), with values finite in each parameter's dtype."""
    index, base, delta = state_dict["index"], state_dict["base"], state_dict["delta"]
    for key, t, ok in (
        ("index", index, lambda t: not t.dtype.is_floating_point and t.dtype != torch.bool),
        ("base", base, lambda t: t.dtype.is_floating_point),
        ("delta", delta, lambda t: t.dtype.is_floating_point),
    ):
        if not (torch.is_tensor(t) and t.shape == (n,) and ok(t) and not t.is_complex()):
            raise refuse(f"'{key}' is not a 1-D tensor of {n:,} slots of the right type")
    if opt._repeat is not None:
        active = state_dict.get("active")
        if not (torch.is_tensor(active) and active.shape == (n,) and active.dtype == torch.bool):
            raise refuse(f"'active' is not a 1-D bool tensor of {n:,} slots")
    # Where each slot's weight lies: in which tensor, at which place of this process's part.
    # The indices are not sorted, so this cannot use `split_by_tensor`.
    slots, params, names = opt._slots, opt._params, opt._names
    index = index.to(slots.offsets.device, torch.long)
    tensor_of = torch.searchsorted(slots.offsets, index, right=True) - 1
    if n:
        if int(index.min()) < 0 or int(tensor_of.max()) >= len(params):
            raise refuse("slot indices lie outside the candidate tensors")
        origins = torch.tensor(slots.origins, dtype=torch.long, device=index.device)
        sizes = torch.tensor(
            [_local(p).numel() for p in params], dtype=torch.long, device=index.device
        )
        local = index - origins[tensor_of]
        outside = (local < 0) | (local >= sizes[tensor_of])
        if bool(outside.any()):
            i = int(tensor_of[outside.nonzero()[0, 0]])
            raise refuse(
                f"{int(outside.sum()):,} slot indices lie outside their tensors (the first "
                f"in {names[i]}, of shape {tuple(params[i].shape)} here)"
            )
    master = slots.delta.dtype
    values = base.to(master) + delta.to(master)
    for i in torch.unique(tensor_of).tolist():
        cast = values[tensor_of == i].to(params[i].dtype)
        if not bool(torch.isfinite(cast).all()):
            raise refuse(
                f"the values for {names[i]} are NaN or overflow its dtype {params[i].dtype}"
            )


def _check_sharding(opt: SelectiveOptimizer, saved: dict[str, Any] | None) -> None:
    """ValueError unless a checkpoint's sharding record `saved` matches `opt`'s."""
    shards = opt._shards
    mine = None if shards is None else {"rank": shards.rank, "world": shards.world}
    theirs = None if saved is None else {"rank": saved["rank"], "world": saved["world"]}
    if mine != theirs:
        raise ValueError(
            f"checkpoint was saved with sharding {theirs} (None: not sharded), this optimizer "
            f"has {mine}; under FSDP each rank loads the state_dict it saved itself, with as "
            "many ranks as when it was saved"
        )


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."
