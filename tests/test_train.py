"""`unmask.app.train`: the run behind `unmask train`: its resumable checkpoints and its step log.

Runs go through `unmask.app.cli.main` in process on `tiny_model_dir` and `reviews_csv` (conftest).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import assert_clear, cli, train_argv, write_reviews

from unmask.app.checkpoints import CHECKPOINTS, RUN_FILE, last_checkpoint
from unmask.app.cli import EXIT_OK, EXIT_USAGE, main
from unmask.app.train import read_train_log


def resume_argv(model, task, out) -> list[str]:
    """`unmask train --resume` with the settings of `trained_run`."""
    return train_argv(model, task, out, "--steps", "4", "--budget", "5%", "--resume")


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of `run`'s checkpoints and step log in a new folder `dest`."""
    dest.mkdir()
    shutil.copytree(run / CHECKPOINTS, dest / CHECKPOINTS)
    (dest / "train_log.jsonl").write_bytes((run / "train_log.jsonl").read_bytes())
    return dest


# ---------------------------------------------------------------- --resume


def test_cli_resume_without_checkpoint(tiny_model_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, reviews_csv, out, "--budget", "5%", "--resume")
    code, err = cli(argv, capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err, rf"no checkpoint at {re.escape(str(out / CHECKPOINTS))}", r"run without --resume"
    )


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, reviews_csv, tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("run")
    flags = ["--budget", "5%", "--steps", "2", "--save-every", "1"]
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
    return out


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda c: (c / "optimizer.pt").write_bytes(random.Random(0).randbytes(5000)),
         r"has a optimizer\.pt that cannot be read"),
        (lambda c: (c / "rng_state.pth").write_bytes(b""), r"has a rng_state\.pth that cannot"),
        (lambda c: (c / "rng_state.pth").unlink(), r"lacks \['rng_state\.pth'\]"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": '),
         r"has a trainer_state\.json that cannot be read"),
        (lambda c: shutil.rmtree(c / "unmask_delta"), r"lacks \['unmask_delta/'\]"),
    ],
    ids=["random-bytes", "empty", "no-rng-state", "torn-trainer-state", "no-delta"],
)  # fmt: skip
def test_resume_from_a_damaged_checkpoint_exits_2(
    checkpointed_run, tiny_model_dir, reviews_csv, tmp_path, capsys, damage, what
):
    out = copy_run(checkpointed_run, tmp_path / "run")
    damage(last_checkpoint(out))
    flags = ["--budget", "5%", "--steps", "2", "--resume"]
    code = main(train_argv(tiny_model_dir, reviews_csv, out, *flags))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert re.search(rf"--resume: checkpoint .*checkpoint-2 {what}", err), err
    assert re.search(r"delete it and run without --resume", err), err


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A 4-step run checkpointed every 2 steps (the last checkpoint is kept: checkpoint-4), its
    task file, and its flags."""
    root = tmp_path_factory.mktemp("resume")
    task = write_reviews(root / "reviews.csv")
    flags = ["--steps", "4", "--budget", "5%", "--seed", "0", "--lr", "1e-3"]
    out = root / "run"
    assert main(train_argv(tiny_model_dir, task, out, *flags, "--save-every", "2")) == EXIT_OK
    return out, task, flags


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
        ([("--method", "pafi")], [r"--method 'random' in the checkpoint's run, 'pafi' now"]),
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
    out = copy_run(run, tmp_path / "run")
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
    out = copy_run(run, tmp_path / "run")
    other_task = write_reviews(tmp_path / "other.csv")
    other_model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, other_model)
    code, err = cli(train_argv(other_model, other_task, out, *flags, "--resume"), capsys)
    assert code == EXIT_USAGE, err
    assert_clear(err, rf"--task '{re.escape(str(task))}' in the checkpoint's run", r"train anew")
    assert re.search(r"--model '.*' in the checkpoint's run, '.*model' now", err), err


def test_resume_with_the_same_settings_still_works(run_dir, tiny_model_dir, tmp_path):
    run, task, flags = run_dir
    out = copy_run(run, tmp_path / "run")
    # The same budget written as its count of weights is the same run.
    count = json.loads((last_checkpoint(out) / RUN_FILE).read_text())["budget_weights"]
    flags = with_flag(flags, "--budget", str(count))
    assert main(train_argv(tiny_model_dir, task, out, *flags, "--resume")) == EXIT_OK
    assert (out / "delta").is_dir()


def test_resume_skips_a_checkpoint_cut_short(run_dir, tiny_model_dir, tmp_path):
    run, task, flags = run_dir
    out = copy_run(run, tmp_path / "run")
    # A later save killed before the Trainer wrote trainer_state.json (its last file).
    partial = out / CHECKPOINTS / "checkpoint-6"
    shutil.copytree(last_checkpoint(out), partial)
    (partial / "trainer_state.json").unlink()
    assert last_checkpoint(out).name == "checkpoint-4"
    assert main(train_argv(tiny_model_dir, task, out, *flags, "--resume")) == EXIT_OK
    assert [r["step"] for r in read_train_log(out / "train_log.jsonl")[0]] == [0, 1, 2, 3]


# ---------------------------------------------------------------- the step log


def test_resume_drops_a_torn_last_log_line(trained_run, tiny_model_dir, reviews_csv, tmp_path):
    out = copy_run(trained_run, tmp_path / "run")
    log = out / "train_log.jsonl"
    complete = log.read_text()
    log.write_text(complete + '{"step": 4, "loss": 0.6')  # a write cut short by a kill
    with pytest.warns(RuntimeWarning, match="dropped its last line"):
        assert main(resume_argv(tiny_model_dir, reviews_csv, out)) == EXIT_OK
    assert log.read_text() == complete
    assert [json.loads(line)["step"] for line in complete.splitlines()] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("damage", "line"),
    [
        (lambda lines: [lines[0], '{"step": 1, "lo', *lines[2:]], 2),  # inside the file
        (lambda lines: [*lines, "not json"], 5),  # a complete (newline-ended) last line
        (lambda lines: [lines[0], '["step", 1]', *lines[2:]], 2),  # JSON, not a record
    ],
    ids=["torn-middle-line", "corrupt-complete-last-line", "not-a-record"],
)
def test_resume_refuses_other_corrupt_log_lines(
    trained_run, tiny_model_dir, reviews_csv, tmp_path, capsys, damage, line
):
    out = copy_run(trained_run, tmp_path / "run")
    log = out / "train_log.jsonl"
    damaged = "".join(x + "\n" for x in damage(log.read_text().splitlines()))
    log.write_text(damaged)
    code, err = cli(resume_argv(tiny_model_dir, reviews_csv, out), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"{re.escape(str(log))} line {line} is not", r"fix or delete that line")
    assert "Traceback" not in err
    assert log.read_text() == damaged


def test_a_step_log_line_nested_too_deeply_is_refused(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n" + '{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_train_log(log)
