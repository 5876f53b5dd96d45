"""Issue 16 ("Nothing lost, part 2"): bad input found after issue 5, each refused at its root.

Non-finite hyperparameters, a merge onto a file, single-label training data, a torn last line
of the step log, config-file values that a flag equal to its default did not override, and
private (0600) saved files. The messages are checked with `assert_clear` as in
`tests/test_bad_input.py`: they say what was wrong and what to do.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import stat
from pathlib import Path

import pytest
import torch
import transformers
from conftest import WORDS, tiny_bert

from unmask import SelectiveOptimizer, SparseDelta
from unmask.cli import EXIT_OK, EXIT_USAGE, main
from unmask.files import atomic_write, atomic_write_text
from unmask.slot_adamw import SlotAdamW
from unmask.tasks import load_task

NAN, INF = float("nan"), float("inf")
COLUMNS = ["--text-column", "sentence", "--label-column", "sentiment"]


def assert_clear(message: str, what: str, fix: str) -> None:
    """The message names the problem (regex `what`) and the way out (regex `fix`)."""
    assert re.search(what, message), f"does not say what was wrong ({what!r}): {message!r}"
    assert re.search(fix, message), f"does not say how to fix it ({fix!r}): {message!r}"


def write_reviews(path: Path, rows: int = 60, labels: tuple[str, ...] = ("neg", "pos")) -> Path:
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "sentiment"])
        for i in range(rows):
            word = rng.choice(WORDS[:4] if i % 2 else WORDS[4:8])
            writer.writerow([f"the movie was {word}", labels[i % len(labels)]])
    return path


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.csv")


def train_argv(model, task, out, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--task", str(task), *COLUMNS,
        "--output", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_csv, tmp_path_factory):
    """A finished 4-step run with a checkpoint written at its last step."""
    out = tmp_path_factory.mktemp("run")
    argv = train_argv(tiny_model_dir, tiny_csv, out, "--steps", "4", "--budget", "5%")
    assert main([*argv, "--save-every", "2"]) == EXIT_OK
    return out


# ---------------------------------------------------------------- 1. non-finite hyperparameters


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"lr": NAN}, "lr"),
        ({"lr": INF}, "lr"),
        ({"lr": torch.tensor(INF)}, "lr"),
        ({"eps": NAN}, "eps"),
        ({"eps": INF}, "eps"),
        ({"weight_decay": NAN}, "weight_decay"),
        ({"weight_decay": INF}, "weight_decay"),
        ({"betas": (NAN, 0.999)}, "betas"),
        ({"betas": (0.9, INF)}, "betas"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_slot_adamw_refuses_nonfinite_hyperparameters(options, name):
    with pytest.raises(ValueError) as err:
        SlotAdamW([torch.zeros(3, requires_grad=True)], **options)
    assert_clear(str(err.value), rf"^{name} must be .*finite.*, got", r"finite number")


@pytest.mark.parametrize(
    ("optimizer", "adam_step", "options", "name"),
    [
        (torch.optim.AdamW, "per-weight", {"lr": INF}, "lr"),
        (torch.optim.AdamW, "per-weight", {"lr": NAN}, "lr"),
        (torch.optim.AdamW, "global", {"lr": INF}, "lr"),
        (torch.optim.Adam, "per-weight", {"weight_decay": NAN}, "weight_decay"),
        (torch.optim.AdamW, "per-weight", {"eps": NAN}, "eps"),
        (torch.optim.AdamW, "global", {"betas": (0.9, INF)}, "betas"),
        (torch.optim.AdamW, "per-weight", {"lr": torch.tensor(INF)}, "lr"),
        (torch.optim.SGD, "per-weight", {"lr": INF}, "lr"),
        (torch.optim.SGD, "per-weight", {"lr": 0.1, "momentum": NAN}, "momentum"),
        (torch.optim.RMSprop, "global", {"alpha": INF}, "alpha"),
    ],
    ids=lambda v: getattr(v, "__name__", None) or (v if isinstance(v, str) else None),
)
def test_selective_optimizer_refuses_nonfinite_optimizer_options(
    optimizer, adam_step, options, name
):
    model = tiny_bert()
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(
            model, "id3", budget=100, total_steps=5, optimizer=optimizer, adam_step=adam_step,
            dense=[r"^classifier\."], **options,
        )  # fmt: skip
    assert_clear(
        str(err.value),
        rf"{optimizer.__name__} option {name}=.* is not finite",
        rf"pass a finite number for {name}",
    )


@pytest.mark.parametrize(
    "flags",
    [["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "nan"], ["--weight-decay", "-1"]],
    ids=["lr-inf", "lr-nan", "weight-decay-nan", "weight-decay-negative"],
)
def test_cli_nonfinite_hyperparameter_exits_2_before_training(
    tiny_model_dir, tiny_csv, tmp_path, capsys, flags
):
    out = tmp_path / "out"
    code, err = cli(train_argv(tiny_model_dir, tiny_csv, out, "--steps", "3", *flags), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"{flags[0]} must be a finite number >= 0, got", r"finite number")
    assert "Traceback" not in err
    assert not (out / "train_log.jsonl").exists()  # refused before the first step


# ---------------------------------------------------------------- 2. merge onto a file


def test_cli_merge_onto_an_existing_file_exits_2(trained_run, tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "merged.bin"
    target.write_bytes(b"keep me")
    argv = ["merge", "--delta", str(trained_run / "delta"), "--model", str(tiny_model_dir)]
    code, err = cli([*argv, "--output", str(target)], capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"--output {re.escape(str(target))} exists and is not a folder", r"new path")
    assert target.read_bytes() == b"keep me"


def test_cli_merge_checks_that_the_files_were_written(
    trained_run, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    # transformers' save_pretrained logs some failures and returns as if it had saved.
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", lambda *a, **k: None)
    out = tmp_path / "merged"
    argv = ["merge", "--delta", str(trained_run / "delta"), "--model", str(tiny_model_dir)]
    code, err = cli([*argv, "--output", str(out)], capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err,
        rf"saving the merged model to {re.escape(str(out))} failed: config\.json and the "
        r"weights .*not written",
        r"writable.*run merge again",
    )


# ---------------------------------------------------------------- 3. a single label


def test_load_task_refuses_single_label_data(tmp_path):
    path = write_reviews(tmp_path / "one.csv", rows=30, labels=("pos",))
    with pytest.raises(ValueError) as err:
        load_task(str(path), label_column="sentiment", text_column="sentence")
    assert_clear(
        str(err.value),
        r"every training example has the label 'pos' \(column 'sentiment'\)",
        r"at least 2 distinct labels.*add examples of another label",
    )


def test_cli_single_label_data_exits_2(tiny_model_dir, tmp_path, capsys):
    path = write_reviews(tmp_path / "one.csv", rows=30, labels=("pos",))
    out = tmp_path / "out"
    code, err = cli(train_argv(tiny_model_dir, path, out, "--steps", "2"), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, r"every training example has the label 'pos'", r"at least 2 distinct")
    assert not (out / "report.json").exists()


def test_cli_train_size_keeping_one_label_exits_2(tiny_model_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, tiny_csv, out, "--steps", "2", "--train-size", "1")
    code, err = cli(argv, capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err,
        r"training split of task 'reviews' has examples of only 1 label \['(neg|pos)'\]",
        r"at least 2 distinct labels: use more training examples \(--train-size\)",
    )
    assert not (out / "train_log.jsonl").exists()


# ---------------------------------------------------------------- 4. torn step log


def resume_argv(model, task, out) -> list[str]:
    return train_argv(model, task, out, "--steps", "4", "--budget", "5%", "--resume")


def copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("checkpoint.pt", "train_log.jsonl"):
        (dest / name).write_bytes((run / name).read_bytes())
    return dest


def test_resume_drops_a_torn_last_log_line(trained_run, tiny_model_dir, tiny_csv, tmp_path):
    out = copy_run(trained_run, tmp_path / "run")
    log = out / "train_log.jsonl"
    complete = log.read_text()
    log.write_text(complete + '{"step": 4, "loss": 0.6')  # a write cut short by a kill
    with pytest.warns(RuntimeWarning, match="dropped its last line"):
        assert main(resume_argv(tiny_model_dir, tiny_csv, out)) == EXIT_OK
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
    trained_run, tiny_model_dir, tiny_csv, tmp_path, capsys, damage, line
):
    out = copy_run(trained_run, tmp_path / "run")
    log = out / "train_log.jsonl"
    damaged = "".join(x + "\n" for x in damage(log.read_text().splitlines()))
    log.write_text(damaged)
    code, err = cli(resume_argv(tiny_model_dir, tiny_csv, out), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"{re.escape(str(log))} line {line} is not", r"fix or delete that line")
    assert "Traceback" not in err
    assert log.read_text() == damaged


# ---------------------------------------------------------------- 5. flags override the file


def test_flags_equal_to_their_defaults_override_the_config_file(tiny_model_dir, tiny_csv, tmp_path):
    config = tmp_path / "job.toml"
    config.write_text(
        f'model = "{tiny_model_dir}"\ntask = "{tiny_csv}"\n'
        'text_column = "sentence"\nlabel_column = "sentiment"\n'
        'method = "pafi"\nbudget = "2%"\nsteps = 3\nlr = 0.5\nseed = 7\nprogress = false\n'
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--output", str(out), "--steps", "2"]
    # Each of these flags equals its default (see `unmask train --help`).
    argv += ["--lr", "0.001", "--method", "id3", "--seed", "0"]
    assert main(argv) == EXIT_OK
    used = json.loads((out / "report.json").read_text())["config"]
    assert (used["lr"], used["method"], used["seed"], used["steps"]) == (0.001, "id3", 0, 2)
    assert used["budget"] == "2%"  # not given on the command line: the file's value
    assert used["progress"] is False  # no --no-progress flag: the file's value stays


# ---------------------------------------------------------------- 6. permissions of saved files


@pytest.fixture
def umask():
    """Set the process umask for the test; restored afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_atomic_write_follows_the_umask_like_open(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    atomic_write_text(tmp_path / "new.txt", "x")
    (tmp_path / "old.txt").write_text("old")
    os.chmod(tmp_path / "old.txt", 0o600)
    atomic_write(tmp_path / "old.txt", lambda tmp: tmp.write_bytes(b"new"))
    expected = 0o666 & ~mask
    assert mode(tmp_path / "plain.txt") == expected
    assert mode(tmp_path / "new.txt") == expected
    assert mode(tmp_path / "old.txt") == expected and (tmp_path / "old.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "old.txt", "plain.txt"]


def test_saved_delta_files_follow_the_umask(trained_run, tmp_path, umask):
    umask(0o022)
    SparseDelta.from_pretrained(trained_run / "delta").save_pretrained(tmp_path / "delta")
    saved = sorted((tmp_path / "delta").iterdir())
    assert saved and all(mode(p) == 0o644 for p in saved), {p.name: oct(mode(p)) for p in saved}


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_json_data_nested_too_deeply_is_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_task(str(path))


def test_a_step_log_line_nested_too_deeply_exits_2(tmp_path):
    from unmask.train import read_train_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n" + '{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_train_log(log)
