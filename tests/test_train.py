"""`unmask.train`: the run behind `unmask train`: its resumable checkpoints and its step log.

Runs go through `unmask.cli.main` in process on `tiny_model_dir` and `reviews_csv` (conftest).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_clear, cli, train_argv

from unmask.cli import EXIT_OK, EXIT_USAGE, main
from unmask.train import CHECKPOINT_FILE, read_train_log


def resume_argv(model, task, out) -> list[str]:
    """`unmask train --resume` with the settings of `trained_run`."""
    return train_argv(model, task, out, "--steps", "4", "--budget", "5%", "--resume")


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of `run`'s checkpoint and step log in a new folder `dest`."""
    dest.mkdir()
    for name in ("checkpoint.pt", "train_log.jsonl"):
        (dest / name).write_bytes((run / name).read_bytes())
    return dest


# ---------------------------------------------------------------- --resume


def test_cli_resume_without_checkpoint(tiny_model_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, reviews_csv, out, "--budget", "5%", "--resume")
    code, err = cli(argv, capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"no checkpoint at {re.escape(str(out))}", r"run without --resume")


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, reviews_csv, tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("run")
    flags = ["--budget", "5%", "--steps", "2", "--save-every", "1"]
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
    return out


def no_rng(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    del state["torch_rng"]
    torch.save(state, path)


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda p: p.write_bytes(random.Random(0).randbytes(5000)), r"cannot be read"),
        (lambda p: p.write_bytes(b""), r"cannot be read"),
        (no_rng, r"lacks \['torch_rng'\]"),
    ],
    ids=["random-bytes", "empty", "no-torch_rng"],
)
def test_resume_from_a_damaged_checkpoint_exits_2(
    checkpointed_run, tiny_model_dir, reviews_csv, tmp_path, capsys, damage, what
):
    out = tmp_path / "run"
    out.mkdir()
    for name in (CHECKPOINT_FILE, "train_log.jsonl"):
        (out / name).write_bytes((checkpointed_run / name).read_bytes())
    damage(out / CHECKPOINT_FILE)
    flags = ["--budget", "5%", "--steps", "2", "--resume"]
    code = main(train_argv(tiny_model_dir, reviews_csv, out, *flags))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert re.search(rf"--resume: checkpoint .*checkpoint\.pt {what}", err), err
    assert re.search(r"delete it and run without --resume", err), err


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
