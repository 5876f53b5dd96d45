"""unmask on an FSDP2-sharded model: two processes on gloo (CPU), launched with torchrun.

As in test_distributed.py, the test launches this file as a script under ``python -m
torch.distributed.run --standalone --nproc_per_node 2`` with a wall-clock timeout (and a gloo
timeout inside), so a hung collective fails the test instead of hanging it. Each worker builds
the same tiny random BERT, shards every encoder layer and the root with ``fully_shard``, trains
on its half of each global batch and writes its results; the test process compares them with
a single unsharded process training on the whole global batches.

The model's shapes make the sharding uneven: 101 vocabulary rows (51 + 50), 63 intermediate
rows (32 + 31), a 3-row head (2 + 1) and a 1-row token-type table (rank 1's shard is empty).

Checked per method: every rank selects the same weights at every step, the same as the single
process; the global count follows the schedule exactly; each rank's slots are the selected
weights in its own rows, disjoint, together all of them; the full parameters match the single
process; unselected weights stay bit-identical to the pretrained ones; the delta (gathered on
every rank, saved by rank 0) equals the single process's and rebuilds the sharded model's full
parameters on a fresh unsharded model; a per-rank state_dict round trip mid-run changes nothing;
unsupported options are refused.
"""

from __future__ import annotations

import hashlib
import io
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import launch_torchrun, make_batches, tiny_bert

from unmask import METHODS, SelectiveOptimizer, SparseDelta
from unmask.choose.schedules import UniformSchedule

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 4  # each rank gets GLOBAL_BATCH // WORLD rows: equal halves, same mean loss
LR = 1e-2
LAUNCH_TIMEOUT_S = 80  # the whole test must stay under 90 s; a normal launch takes ~20-40 s
SHAPES = dict(vocab_size=101, intermediate_size=63, num_labels=3, type_vocab_size=1)

# name -> SelectiveOptimizer keywords. "id3" trains a dense head (99 weights, charged to the
# budget) and clips; "id3-global" unmasks 1-2 weights per step with torch's AdamW, so a rank
# may hold no slot while the other does (its per-tensor step count must still advance).
SCENARIOS: dict[str, dict[str, Any]] = {
    "id3": dict(method="id3", budget=200, dense=["classifier"], weight_decay=0.1),
    "id3-global": dict(method="id3", budget=6, adam_step="global"),
    "pafi": dict(method="pafi", budget=60),
    "random": dict(method="random", budget=60, seed=3),
    "fish": dict(method="fish", budget=60),
    "bitfit": dict(method="bitfit"),  # every bias: the "all" kind, slots without selection
    # Every parameter dense, in a torch optimizer on DTensors. SGD, not Adam: Adam divides by
    # the root of the second moment, so where a gradient is near zero (a rare token's embedding
    # row) the rounding difference between averaged half-batch gradients and the whole batch's
    # grows into a visible difference in the update (3.6e-6 seen with AdamW).
    "full": dict(method="full", optimizer=torch.optim.SGD, momentum=0.9),
}
CLIP = {"id3": 0.5}  # max_norm of opt.clip_grad_norm_ per scenario
RESUME_AFTER = {"id3": 2}  # steps after which the optimizer is rebuilt from its state_dict


def _model() -> torch.nn.Module:
    return tiny_bert(0, **SHAPES)


def _digest(selected: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(selected):
        h.update(name.encode())
        h.update(selected[name].numpy().tobytes())
    return h.hexdigest()


def _shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    size = batch["input_ids"].shape[0] // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (collective under FSDP: DTensor.full_tensor on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        value = p.detach()
        out[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    return out


def _gather(value: Any, world: int) -> list[Any]:
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _shard_model(model: torch.nn.Module, world: int, root: bool = True) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    if root:
        fully_shard(model, mesh=mesh)


def _train(scenario: str, rank: int, world: int, out: Path | None) -> dict[str, Any]:
    """Train one scenario; with world > 1 sharded with FSDP2, on this rank's half of each batch."""
    kwargs = {**SCENARIOS[scenario], "total_steps": STEPS, "lr": LR}
    model = _model()
    if world > 1:
        _shard_model(model, world)
    opt = SelectiveOptimizer(model, **kwargs)
    if opt.method.needs_calibration:
        calibration = make_batches("bert", 2, seed=7, batch=GLOBAL_BATCH)
        opt.calibrate([_shard(b, rank, world) for b in calibration])
    digests, counts, norms = [], [], []
    for step, batch in enumerate(make_batches("bert", STEPS, batch=GLOBAL_BATCH)):
        model(**_shard(batch, rank, world)).loss.backward()
        if scenario in CLIP:
            norms.append(float(opt.clip_grad_norm_(CLIP[scenario])))
        opt.step()
        opt.zero_grad()
        digests.append(_gather(_digest(opt.selected()), world))
        counts.append(opt.num_selected)
        if RESUME_AFTER.get(scenario) == step + 1:
            # Each rank checkpoints its own state and resumes from it in a fresh optimizer.
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            opt = SelectiveOptimizer(model, **kwargs)
            opt.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    delta = opt.delta()  # collective under FSDP: every rank calls it
    if world > 1 and rank == 0:
        delta.save_pretrained(out / scenario)
    return {
        "digests": digests,
        "counts": counts,
        "norms": norms,
        "params": _full_params(model),
        "selected": opt.selected(),
        "delta": {n: (i.long(), v) for n, (i, v) in delta.sparse.items()},
        "replaced": sorted(delta.replace),
        "num_weights": delta.num_weights,
        # Test-only look at the internals: this rank's slots (global indices) and the layout.
        "slots": opt._slots.index[: opt._slots.n].sort().values.clone(),
        "offsets": list(opt._selector.offsets),
        "names": list(opt._names),
    }


def _refusals() -> dict[str, str]:
    """The messages of what SelectiveOptimizer refuses on a sharded model."""
    messages = {}
    cases = {
        "low_memory": dict(method="id3", low_memory=True),
        "freeze_unselected": dict(method="id3", freeze_unselected=True),
        "id3-repeat": dict(method="id3-repeat"),
    }
    model = _model()
    _shard_model(model, WORLD)
    for name, kwargs in cases.items():
        try:
            SelectiveOptimizer(model, budget=10, total_steps=STEPS, **kwargs)
        except ValueError as err:
            messages[name] = str(err)
    partly = _model()
    _shard_model(partly, WORLD, root=False)  # layers sharded, embeddings and head not
    try:
        SelectiveOptimizer(partly, method="id3", budget=10, total_steps=STEPS)
    except ValueError as err:
        messages["mixed"] = str(err)
    return messages


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    # A timeout turns a collective that waits for a dead peer into an error, not a hang.
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {name: _train(name, rank, world, out) for name in SCENARIOS}
    results["refusals"] = _refusals()
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _launch(out: Path) -> float:
    return launch_torchrun(Path(__file__), out, WORLD, LAUNCH_TIMEOUT_S)


def _fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and _fsdp_available()),
    reason="needs torch.distributed with gloo and FSDP2 (fully_shard)",
)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """The sharded run (once for all tests here): its folder and each rank's results."""
    out = tmp_path_factory.mktemp("fsdp")
    _launch(out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, ranks


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    """Every scenario in one unsharded process on the whole global batches."""
    torch.set_num_threads(1)
    return {name: _train(name, rank=0, world=1, out=None) for name in SCENARIOS}


def _rows(d0: int, rank: int) -> range:
    c = -(-d0 // WORLD)
    return range(min(rank * c, d0), min((rank + 1) * c, d0))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fsdp_selects_what_one_process_selects(fsdp_run, single, scenario):
    _, ranks = fsdp_run
    ref = single[scenario]
    method = METHODS[SCENARIOS[scenario]["method"]]
    if method.grows_mask:
        budget = SCENARIOS[scenario]["budget"] - (99 if scenario == "id3" else 0)  # head charged
        schedule = [UniformSchedule().cumulative(t, budget, STEPS) for t in range(STEPS)]
    elif method.takes_budget:  # chosen once: the whole budget from the first step
        schedule = [SCENARIOS[scenario]["budget"]] * STEPS
    else:  # bitfit, full: everything they train, from the first step
        schedule = [ref["counts"][0]] * STEPS
    assert ref["counts"] == schedule
    for rank, everything in enumerate(ranks):
        result = everything[scenario]
        # (a) at every step both ranks hold the same global selection as the single process.
        for step, gathered in enumerate(result["digests"]):
            assert gathered == [ref["digests"][step][0]] * WORLD, f"rank {rank}, step {step}"
        # (b) the global count follows the schedule exactly on every rank.
        assert result["counts"] == schedule, f"rank {rank}"
        for name, value in ref["selected"].items():
            assert torch.equal(result["selected"][name], value), name


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fsdp_slots_are_the_selected_weights_in_each_ranks_rows(fsdp_run, scenario):
    _, ranks = fsdp_run
    result = ranks[0][scenario]
    offsets, names, params = result["offsets"], result["names"], result["params"]
    chosen = torch.cat(
        [result["selected"][n] + offsets[names.index(n)] for n in sorted(result["selected"])]
        + [torch.zeros(0, dtype=torch.long)]
    )
    slots = torch.cat([ranks[r][scenario]["slots"] for r in range(WORLD)])
    assert slots.unique().numel() == slots.numel(), "a weight has slots on two ranks"
    assert torch.equal(slots.sort().values, chosen.sort().values)
    for rank in range(WORLD):
        for index in ranks[rank][scenario]["slots"].tolist():
            i = max(t for t, o in enumerate(offsets) if o <= index)
            shape = params[names[i]].shape
            row = (index - offsets[i]) // (params[names[i]].numel() // shape[0])
            assert row in _rows(shape[0], rank), (rank, names[i], row)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fsdp_weights_match_one_process_and_stay_frozen_elsewhere(fsdp_run, single, scenario):
    _, ranks = fsdp_run
    ref = single[scenario]
    pretrained = dict(_model().named_parameters())
    for everything in ranks:
        result = everything[scenario]
        for name, value in ref["params"].items():
            # Averaged half-batch gradients round differently from the whole batch's.
            torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6)
            assert torch.equal(result["params"][name], ranks[0][scenario]["params"][name])
        for name, value in result["params"].items():
            if name in result["replaced"]:
                continue
            frozen = torch.ones(value.numel(), dtype=torch.bool)
            frozen[result["selected"].get(name, torch.zeros(0, dtype=torch.long))] = False
            base = pretrained[name].detach().reshape(-1)
            assert torch.equal(value.reshape(-1)[frozen], base[frozen]), name
        torch.testing.assert_close(result["norms"], ref["norms"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fsdp_delta_is_one_process_delta_and_rebuilds_the_model(fsdp_run, single, scenario):
    out, ranks = fsdp_run
    ref = single[scenario]
    for everything in ranks:
        delta = everything[scenario]["delta"]
        assert sorted(delta) == sorted(ref["delta"])
        for name, (index, values) in ref["delta"].items():
            assert torch.equal(delta[name][0], index), name
            torch.testing.assert_close(delta[name][1], values, rtol=1e-5, atol=1e-6)
    saved = SparseDelta.from_pretrained(out / scenario)
    assert saved.num_weights == ref["num_weights"]
    assert sorted(saved.replace) == ref["replaced"]
    if "budget" in SCENARIOS[scenario]:
        assert saved.num_weights == SCENARIOS[scenario]["budget"]
    rebuilt = saved.apply_(_model())
    for name, value in rebuilt.named_parameters():
        assert torch.equal(value.detach(), ranks[0][scenario]["params"][name]), name


def test_fsdp_refuses_what_it_does_not_support(fsdp_run):
    _, ranks = fsdp_run
    messages = ranks[0]["refusals"]
    assert "low_memory=False" in messages["low_memory"]
    assert "freeze_unselected=False" in messages["freeze_unselected"]
    assert "use 'id3'" in messages["id3-repeat"]
    assert "fully_shard on the root module" in messages["mixed"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
