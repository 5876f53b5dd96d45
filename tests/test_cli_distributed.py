"""`unmask train` under torchrun: two CPU processes (gloo) split every batch of the run between
them, so they train what one process trains on the whole batches; process zero alone writes
the delta, the step log, the report and the checkpoints, and prints the summary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_clear, torchrun, train_argv

from unmask import SparseDelta
from unmask.app.cli import EXIT_OK, main
from unmask.app.task_trainer import check_batches_split, process_share

RUN = ("--steps", "4", "--budget", "5%", "--batch-size", "4", "--lr", "1e-2", "--save-every", "2")
LAUNCH_TIMEOUT_S = 150  # generous for a loaded 2-core machine; the run takes ~15 s


def _delta_folders(out):
    return sorted(str(p.parent.relative_to(out)) for p in out.rglob("delta_config.json"))


def test_two_processes_train_the_single_process_delta(tiny_model_dir, reviews_csv, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(train_argv(tiny_model_dir, reviews_csv, single, *RUN)) == EXIT_OK
    argv = train_argv(tiny_model_dir, reviews_csv, double, *RUN)
    output = torchrun(["-m", "unmask.app.cli", *argv], 2, LAUNCH_TIMEOUT_S)

    assert output.count("weights changed:") == 1, output[-3000:]  # one summary, by process 0
    report = json.loads((double / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 4
    # the same files as the single-process run: one delta, one checkpoint (one RNG state each)
    assert _delta_folders(double) == _delta_folders(single)
    assert "delta" in _delta_folders(double)
    checkpoint = double / "checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    logs = [
        [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        for out in (single, double)
    ]
    assert [r["step"] for r in logs[1]] == [0, 1, 2, 3]  # written once, not once per process
    for one, two in zip(*logs, strict=True):
        assert abs(one["loss"] - two["loss"]) < 1e-4  # the whole batch's mean loss, not twice it

    a = SparseDelta.from_pretrained(single / "delta")
    b = SparseDelta.from_pretrained(double / "delta")
    assert b.num_weights == a.num_weights > 0
    assert set(a.sparse) == set(b.sparse) and set(a.replace) == set(b.replace)
    for name, (indices, values) in a.sparse.items():
        assert torch.equal(indices, b.sparse[name][0]), name  # the same weights selected
        torch.testing.assert_close(values, b.sparse[name][1], rtol=0, atol=1e-5)
    for name, tensor in a.replace.items():
        torch.testing.assert_close(tensor, b.replace[name], rtol=0, atol=1e-5)


def test_every_process_gets_a_share_of_every_batch():
    batch = [7, 3, 9, 1, 5]
    shares = [process_share(batch, rank, 2) for rank in range(2)]
    assert shares == [[7, 9, 5], [3, 1]]
    assert sorted(shares[0] + shares[1]) == sorted(batch)
    check_batches_split([[0, 1, 2, 3], [4, 5]], world=2, batch_size=4)  # every share non-empty
    with pytest.raises(ValueError) as err:
        check_batches_split([[0, 1, 2, 3], [4]], world=2, batch_size=4)
    assert_clear(
        str(err.value),
        r"a batch of only 1 example\(s\).*leaves a process without any",
        r"use a --batch-size that is a multiple of 2",
    )
