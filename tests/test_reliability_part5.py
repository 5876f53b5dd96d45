"""Issue 16 (part 2, continued): more bad input, each refused at its root.

A module replaced after the optimizer was built, a budget with a decimal comma, `--resume`
with other settings than the checkpoint's run, a delta file that is not a regular file, and
swapping deltas in place (apply A, remove A, apply B).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_clear, cli, tiny_bert, train_argv, write_reviews
from torch import nn

from unmask import SelectiveOptimizer, SparseDelta
from unmask.budget import resolve_budget
from unmask.cli import EXIT_OK, EXIT_USAGE, main
from unmask.delta import CONFIG_FILE, TENSORS_FILE, DeltaError

# ---------------------------------------------------------------- 1. a module replaced


def one_step(model, opt) -> None:
    ids = torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    opt.step()
    opt.zero_grad()


REPLACED = r"parameter classifier\.(weight|bias) of the model was replaced by a new tensor"
REBUILD = r"build a new SelectiveOptimizer after changing the model"


@pytest.mark.parametrize("dense", [["classifier"], None], ids=["dense-head", "sparse-head"])
def test_a_module_replaced_after_building_the_optimizer_is_refused(dense):
    torch.manual_seed(0)
    model = tiny_bert()
    opt = SelectiveOptimizer(model, "id3", budget="5%", total_steps=4, lr=1e-2, dense=dense)
    one_step(model, opt)
    old = model.classifier
    model.classifier = nn.Linear(old.in_features, old.out_features)
    ids = torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert_clear(str(err.value), REPLACED, REBUILD)
    with pytest.raises(RuntimeError) as err:
        opt.delta()
    assert_clear(str(err.value), REPLACED, REBUILD)


def test_a_module_removed_after_building_the_optimizer_is_refused():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, "id3", budget="5%", total_steps=4, dense=["classifier"])
    del model.classifier
    model.classifier = nn.Identity()
    with pytest.raises(RuntimeError) as err:
        opt.delta()
    assert_clear(str(err.value), r"parameter classifier\.weight of the model is gone", REBUILD)


def test_an_unchanged_model_still_trains_and_saves():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, "id3", budget="5%", total_steps=2, dense=["classifier"])
    for _ in range(2):
        one_step(model, opt)
    model.to(torch.float32)  # keeps the parameter objects
    assert opt.delta().num_weights > 0


# ---------------------------------------------------------------- 2. a decimal comma


@pytest.mark.parametrize("budget", ["0,1%", "1,5M", "100,000", "0,001"])
def test_a_budget_with_a_comma_is_refused(budget):
    with pytest.raises(ValueError) as err:
        resolve_budget(budget, 10**6)
    assert_clear(
        str(err.value),
        rf"cannot read budget {re.escape(repr(budget))}: ',' is not part of a number",
        r"write decimals with a dot \('0\.1%'",
    )


@pytest.mark.parametrize("budget", ["1_000", "5 %", "1e3"])
def test_a_budget_with_another_foreign_character_is_refused(budget):
    with pytest.raises(ValueError) as err:
        resolve_budget(budget, 10**6)
    assert_clear(str(err.value), r"is not part of a number", r"use a count \(5000")


def test_cli_budget_with_a_comma_exits_2(tiny_model_dir, tmp_path, capsys):
    task = write_reviews(tmp_path / "reviews.csv")
    code, err = cli(train_argv(tiny_model_dir, task, tmp_path / "o", "--budget", "0,1%"), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, r"cannot read budget '0,1%'", r"write decimals with a dot")
    assert "Traceback" not in err


# ---------------------------------------------------------------- 3. --resume with other settings


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A 4-step run with a checkpoint after step 2, its task file, and its flags."""
    root = tmp_path_factory.mktemp("resume")
    task = write_reviews(root / "reviews.csv")
    flags = ["--steps", "4", "--budget", "5%", "--seed", "0", "--lr", "1e-3"]
    out = root / "run"
    assert main(train_argv(tiny_model_dir, task, out, *flags, "--save-every", "2")) == EXIT_OK
    return out, task, flags


def copy_checkpoint(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("checkpoint.pt", "train_log.jsonl"):
        shutil.copyfile(run / name, dest / name)
    return dest


def with_flag(flags: list[str], flag: str, value: str) -> list[str]:
    flags = list(flags)
    if flag in flags:
        flags[flags.index(flag) + 1] = value
    else:
        flags += [flag, value]
    return flags


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ([("--seed", "1")], [r"--seed 0 in the checkpoint's run, 1 now"]),
        ([("--lr", "0.01")], [r"--lr 0\.001 in the checkpoint's run, 0\.01 now"]),
        (
            [("--budget", "10%")],
            [r"--budget '5%' \([\d,]+ weights\) in the checkpoint's run, '10%' \([\d,]+ weights\)"],
        ),
        ([("--method", "random")], [r"--method 'id3' in the checkpoint's run, 'random' now"]),
        (
            [("--seed", "3"), ("--lr", "0.5")],
            [r"--seed 0 in the checkpoint's run, 3 now", r"--lr 0\.001 in the checkpoint's run"],
        ),
    ],
    ids=["seed", "lr", "budget", "method", "seed-and-lr"],
)
def test_resume_with_other_settings_exits_2_naming_them(
    run_dir, tiny_model_dir, tmp_path, capsys, changes, named
):
    run, task, flags = run_dir
    out = copy_checkpoint(run, tmp_path / "run")
    for flag, value in changes:
        flags = with_flag(flags, flag, value)
    log = (out / "train_log.jsonl").read_text()
    code, err = cli(train_argv(tiny_model_dir, task, out, *flags, "--resume"), capsys)
    assert code == EXIT_USAGE, err
    for what in named:
        assert_clear(err, what, r"Resume with the settings of that run, or train anew")
    assert "Traceback" not in err
    assert (out / "train_log.jsonl").read_text() == log and not (out / "delta").exists()


def test_resume_with_another_task_or_model_exits_2(run_dir, tiny_model_dir, tmp_path, capsys):
    run, task, flags = run_dir
    out = copy_checkpoint(run, tmp_path / "run")
    other_task = write_reviews(tmp_path / "other.csv")
    other_model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, other_model)
    code, err = cli(train_argv(other_model, other_task, out, *flags, "--resume"), capsys)
    assert code == EXIT_USAGE, err
    assert_clear(err, rf"--task '{re.escape(str(task))}' in the checkpoint's run", r"train anew")
    assert re.search(r"--model '.*' in the checkpoint's run, '.*model' now", err), err


def test_resume_with_the_same_settings_still_works(run_dir, tiny_model_dir, tmp_path):
    run, task, flags = run_dir
    out = copy_checkpoint(run, tmp_path / "run")
    # The same budget written as its count of weights is the same run.
    count = torch.load(out / "checkpoint.pt", weights_only=True)["run"]["budget_weights"]
    flags = with_flag(flags, "--budget", str(count))
    assert main(train_argv(tiny_model_dir, task, out, *flags, "--resume")) == EXIT_OK
    assert (out / "delta").is_dir()


# ---------------------------------------------------------------- 4. not a regular file


@pytest.fixture(scope="module")
def saved_delta(tmp_path_factory):
    model = tiny_bert()
    opt = SelectiveOptimizer(model, "id3", budget="5%", total_steps=1)
    one_step(model, opt)
    folder = tmp_path_factory.mktemp("delta") / "d"
    opt.delta().save_pretrained(folder)
    return folder


def symlink_to_copy(path: Path) -> None:
    real = path.with_name("real-" + path.name)
    shutil.copyfile(path, real)
    path.unlink()
    path.symlink_to(real)


def symlink_to_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX file types")
@pytest.mark.parametrize("name", [TENSORS_FILE, CONFIG_FILE])
@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (symlink_to_copy, r"a symbolic link"),
        (symlink_to_dev_zero, r"a symbolic link"),
        (fifo, r"a FIFO"),
    ],
    ids=["symlink", "symlink-to-dev-zero", "fifo"],
)
def test_a_delta_file_that_is_not_a_regular_file_is_refused(
    saved_delta, tmp_path, name, make, kind
):
    folder = tmp_path / "d"
    shutil.copytree(saved_delta, folder)
    make(folder / name)
    with pytest.raises(DeltaError) as err:
        SparseDelta.from_pretrained(folder)  # a FIFO or /dev/zero, if read, would hang
    assert_clear(
        str(err.value),
        rf"{re.escape(str(folder / name))} is not a regular file \({kind}",
        r"copy the real files into the folder",
    )


# ---------------------------------------------------------------- 5. swapping deltas in place


def random_delta(model: nn.Module, seed: int, scale: float) -> SparseDelta:
    """A delta of every third weight of each tensor, with values of magnitude ~`scale`."""
    gen = torch.Generator().manual_seed(seed)
    sparse, base_values = {}, {}
    for name, p in model.named_parameters():
        index = torch.randperm(p.numel(), generator=gen)[: p.numel() // 3].sort().values
        values = torch.randn(index.numel(), generator=gen) * scale
        sparse[name] = (index.to(torch.int32), values)
        base_values[name] = p.detach().reshape(-1)[index].float()
    return SparseDelta.from_training(model, sparse, base_values, {}, {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-3, 1.0], ids=["small", "large"])
def test_apply_remove_apply_swaps_deltas_bit_exactly(dtype, scale, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4)).to(dtype)
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}
    a, b = random_delta(base, 1, scale), random_delta(base, 2, scale)
    b.save_pretrained(tmp_path / "b")
    b = SparseDelta.from_pretrained(tmp_path / "b")
    expected = b.apply_(copy.deepcopy(base))
    model = copy.deepcopy(base)
    a.apply_(model)
    a.remove_(model)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.uint8), base_state[name].view(torch.uint8)), name
    b.apply_(model)  # the base hash matches again
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p.detach().view(torch.uint8), q.detach().view(torch.uint8)), name
    b.remove_(model)
    a.apply_(model)  # and back
