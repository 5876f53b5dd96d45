"""unmask under torch DDP: two processes on gloo (CPU), launched with torchrun.

The test launches this file as a script under ``python -m torch.distributed.run --standalone
--nproc_per_node 2`` (torchrun picks a free port itself and stops the other process when one
fails), with a wall-clock timeout so a hung collective fails the test instead of hanging it. The
workers train a tiny random BERT, each on its half of the same global batches, and write their
results next to the deltas; the test process compares them with a single-process run on the
whole global batches.

Checked: every process selects the same weights at every step (ID3, PaFi, FISH, ID3 with
``freeze_unselected``), the final weights match the single-process run, only process zero writes
deltas (the plain loop and ``UnmaskTrainer``), and rank zero's delta rebuilds its trained model.
"""

from __future__ import annotations

import hashlib
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import launch_torchrun, make_batches, snapshot, tiny_bert
from torch.nn.parallel import DistributedDataParallel as DDP

from unmask import SelectiveOptimizer, SparseDelta

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 4  # each process gets GLOBAL_BATCH // WORLD rows: equal halves, same mean loss
BUDGET = 60
LR = 1e-2
LAUNCH_TIMEOUT_S = 150  # generous for a loaded 2-core machine; a normal run takes ~20 s

# Plain-loop scenarios: name -> (method, extra SelectiveOptimizer keywords, DDP keywords).
SCENARIOS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "id3": ("id3", {}, {}),
    "pafi": ("pafi", {}, {}),
    "fish": ("fish", {}, {}),
    # freeze_unselected turns requires_grad off after the last unmask; DDP then has parameters
    # that get no gradient and needs find_unused_parameters=True (without it the next forward
    # raises "Expected to have finished reduction in the prior iteration").
    "id3-freeze": ("id3", {"freeze_unselected": True}, {"find_unused_parameters": True}),
}


def _digest(selected: dict[str, torch.Tensor]) -> str:
    """A checksum of `opt.selected()`: parameter names and their selected flat indices."""
    h = hashlib.sha256()
    for name in sorted(selected):
        h.update(name.encode())
        h.update(selected[name].numpy().tobytes())
    return h.hexdigest()


def _shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    size = batch["input_ids"].shape[0] // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def _train(scenario: str, rank: int, world: int, out: Path | None) -> dict[str, Any]:
    """Train one scenario; with world > 1 under DDP, on this process's half of every batch.

    Returns the selection digest after every step (all-gathered from every process under DDP)
    and the trained parameters. Under DDP only rank 0 saves the delta, to ``out/<scenario>``.
    """
    method, opt_kwargs, ddp_kwargs = SCENARIOS[scenario]
    model = tiny_bert(0)  # eval mode: no dropout, so the halves' mean loss is the whole batch's
    module = DDP(model, **ddp_kwargs) if world > 1 else model
    # Built on the unwrapped module: parameter names (and so the delta) carry no "module." prefix.
    opt = SelectiveOptimizer(
        model, method=method, budget=BUDGET, total_steps=STEPS, lr=LR, **opt_kwargs
    )
    if opt.method.needs_calibration:
        calibration = [
            _shard(b, rank, world) for b in make_batches("bert", 2, seed=7, batch=GLOBAL_BATCH)
        ]
        # Calibrating through the DDP module all-reduces the gradients, so every process sums
        # the same Fisher values (calibrating ddp.module would give each process its own mask).
        opt.calibrate(calibration, loss_fn=lambda _model, b: module(**b).loss)
    digests = []
    for batch in make_batches("bert", STEPS, batch=GLOBAL_BATCH):
        module(**_shard(batch, rank, world)).loss.backward()
        opt.step()
        opt.zero_grad()
        mine = _digest(opt.selected())
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            digests.append(gathered)
        else:
            digests.append([mine])
    if world > 1 and rank == 0:
        opt.delta().save_pretrained(out / scenario)
    return {"digests": digests, "params": snapshot(model), "num_selected": opt.num_selected}


def _train_with_trainer(rank: int, out: Path) -> dict[str, Any]:
    """UnmaskTrainer with FISH on 2 processes: the callback calibrates and saves the deltas."""
    from transformers import TrainingArguments

    from unmask.integrations.trainer import UnmaskTrainer, unwrap_optimizer

    rows = [
        {"input_ids": ids, "labels": label}
        for b in make_batches("bert", 8, seed=3, batch=GLOBAL_BATCH)
        for ids, label in zip(b["input_ids"], b["labels"], strict=True)
    ]
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=STEPS,
        save_steps=2,
        per_device_train_batch_size=GLOBAL_BATCH // WORLD,
        learning_rate=LR,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = UnmaskTrainer(
        model=tiny_bert(0),
        args=args,
        train_dataset=rows,
        unmask_config=dict(method="fish", budget=BUDGET, calibration_batches=2),
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, _digest(opt.selected()))
    return {"digests": [gathered], "params": snapshot(trainer.model), "world": args.world_size}


def _record_delta_saves(out: Path, rank: int) -> None:
    """Log every SparseDelta.save_pretrained call to ``out/saves-rank<r>.txt``."""
    original = SparseDelta.save_pretrained

    def recording(self: SparseDelta, path: Any, *args: Any, **kwargs: Any) -> Any:
        with open(out / f"saves-rank{rank}.txt", "a") as log:
            log.write(f"{Path(path).relative_to(out)}\n")
        return original(self, path, *args, **kwargs)

    SparseDelta.save_pretrained = recording  # type: ignore[method-assign]


def _worker(out: Path) -> None:
    """One torchrun process: every scenario, then the Trainer; results to ``out/rank<r>.pt``."""
    torch.set_num_threads(1)
    # A timeout turns a collective that waits for a dead peer into an error, not a hang.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    _record_delta_saves(out, rank)
    results = {name: _train(name, rank, world, out) for name in SCENARIOS}
    results["trainer"] = _train_with_trainer(rank, out)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _launch(out: Path) -> float:
    return launch_torchrun(Path(__file__), out, WORLD, LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """The distributed run (once for all tests here): its folder and each rank's results."""
    out = tmp_path_factory.mktemp("ddp")
    _launch(out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return out, ranks


pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ddp_matches_single_process(ddp_run, scenario):
    _, ranks = ddp_run
    single = _train(scenario, rank=0, world=1, out=None)
    for rank, everything in enumerate(ranks):
        result = everything[scenario]
        # (a) the all-gathered checksums: every process selected the same weights at every step,
        # and the same ones as one process on the whole batches.
        for step, gathered in enumerate(result["digests"]):
            assert gathered == [single["digests"][step][0]] * WORLD, f"rank {rank}, step {step}"
        assert result["num_selected"] == single["num_selected"] == BUDGET
        # (b) the same weights as the single-process run, up to float rounding: the all-reduced
        # mean of two half-batch gradients is not bit-identical to the whole batch's gradient.
        for name, value in single["params"].items():
            torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6)
    # DDP replicas do not merely agree approximately: both apply the same all-reduced gradients
    # to the same selected weights.
    for name, value in ranks[0][scenario]["params"].items():
        assert torch.equal(ranks[1][scenario]["params"][name], value), name


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ddp_rank_zero_delta_rebuilds_the_trained_model(ddp_run, scenario):
    out, ranks = ddp_run
    delta = SparseDelta.from_pretrained(out / scenario)
    rebuilt = delta.apply_(tiny_bert(0))
    for name, value in snapshot(rebuilt).items():
        assert torch.equal(value, ranks[0][scenario]["params"][name]), name


def test_only_rank_zero_writes_deltas(ddp_run):
    out, _ = ddp_run
    assert not (out / "saves-rank1.txt").exists()
    trainer_saves = [
        "trainer/checkpoint-2/unmask_delta",
        f"trainer/checkpoint-{STEPS}/unmask_delta",
        "trainer/unmask_delta",
    ]
    saves = (out / "saves-rank0.txt").read_text().split()
    assert sorted(saves) == sorted([*SCENARIOS, *trainer_saves])  # each written once
    for path in saves:
        assert (out / path / "delta.safetensors").is_file()


def test_trainer_on_two_processes_keeps_replicas_identical(ddp_run):
    """UnmaskTrainer + FISH: the calibration gradients are averaged over both processes."""
    out, ranks = ddp_run
    assert ranks[0]["trainer"]["world"] == WORLD
    [gathered] = ranks[0]["trainer"]["digests"]
    assert gathered[0] == gathered[1]
    for name, value in ranks[0]["trainer"]["params"].items():
        assert torch.equal(ranks[1]["trainer"]["params"][name], value), name
    delta = SparseDelta.from_pretrained(out / "trainer" / "unmask_delta")
    assert delta.num_weights > 0
    rebuilt = delta.apply_(tiny_bert(0))
    for name, value in snapshot(rebuilt).items():
        assert torch.equal(value, ranks[0]["trainer"]["params"][name]), name


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
