"""Issue 16 (part 2), continued: faults of the delta files, the disk and the CLI, made for real.

A second process saving while this one loads, SIGKILLs of a forked child at each point of a
save, a real full filesystem (tmpfs, where this machine lets the test mount one), and bad CLI
input that used to end in a traceback.
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import train_argv as part2_train_argv
from conftest import write_reviews

import unmask
from unmask import DeltaError, SparseDelta
from unmask.cli import EXIT_OK, EXIT_USAGE, main
from unmask.train import CHECKPOINT_FILE, _save_checkpoint

TENSORS, CONFIG = "delta.safetensors", "delta_config.json"


def make_delta(save: int, weights: int = 1000) -> SparseDelta:
    """A delta whose every value and whose metadata both say which save it is."""
    indices = torch.arange(weights, dtype=torch.int32)
    values = torch.full((weights,), float(save))
    return SparseDelta(
        sparse={"w": (indices, values)},
        replace={},
        shapes={"w": (weights,)},
        dtypes={"w": "float32"},
        base_hashes={"w": "0" * 32},
        metadata={"save": save},
    )


def save_of(delta: SparseDelta) -> int:
    """Which save a loaded delta is; fails if its config and its tensors are from two saves."""
    values = delta.sparse["w"][1]
    save = delta.metadata["save"]
    assert bool((values == save).all()), (
        f"config of save {save} with tensors of save(s) {sorted(set(values.tolist()))}"
    )
    return save


def child_env() -> dict[str, str]:
    src = str(Path(unmask.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, *sys.path])}


# ---------------------------------------------------------------- 1. a load racing a save


SAVER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from unmask import SparseDelta
    folder, weights, stop = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    save, deadline = 1, time.monotonic() + 120
    while not stop.exists() and time.monotonic() < deadline:
        save += 1
        SparseDelta(
            sparse={"w": (torch.arange(weights, dtype=torch.int32), torch.full((weights,),
                    float(save)))},
            replace={}, shapes={"w": (weights,)}, dtypes={"w": "float32"},
            base_hashes={"w": "0" * 32}, metadata={"save": save},
        ).save_pretrained(folder)
        print(save, flush=True)
    """
)


def test_a_load_racing_a_save_loop_returns_one_whole_save_or_a_clear_error(tmp_path):
    folder, stop, weights = tmp_path / "delta", tmp_path / "stop", 300_000
    make_delta(1, weights).save_pretrained(folder)
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(folder), str(weights), str(stop)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    loaded, refused, seen = 0, 0, set()
    try:
        assert saver.stdout.readline().strip() == "2"  # the saver runs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (loaded < 300 or len(seen) < 20):
            try:
                delta = SparseDelta.from_pretrained(folder)
            except DeltaError as err:  # allowed, if it says what happened
                assert re.search(r"another process keeps saving", str(err)), str(err)
                refused += 1
                continue
            seen.add(save_of(delta))  # never a config of one save with another's tensors
            loaded += 1
    finally:
        stop.touch()
        saver.communicate(timeout=60)
    assert loaded >= 50 and len(seen) >= 2, (loaded, refused, len(seen))


# ---------------------------------------------------------------- 2. saves killed at any point


def save_killed_at(folder: Path, save: int, point: int) -> bool:
    """Save `save` in a forked child that SIGKILLs itself at its `point`-th file operation
    (rename, fsync or unlink, before it happens); True if the save completed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = [0]

            def killing(real):
                def op(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == point:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)

                return op

            os.replace, os.fsync, os.unlink = map(killing, (os.replace, os.fsync, os.unlink))
            make_delta(save).save_pretrained(folder)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("a forked save did not finish within 60 s")
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return False
    assert os.WEXITSTATUS(status) == 0
    return True


def test_any_two_saves_killed_in_a_row_leave_a_delta_that_loads(tmp_path):
    points = 12  # more file operations than one save does: the last points let it complete
    for first in range(1, points + 1):
        for second in range(1, points + 1):
            folder = tmp_path / f"delta-{first}-{second}"
            make_delta(0).save_pretrained(folder)
            done_first = save_killed_at(folder, 1, first)
            done_second = save_killed_at(folder, 2, second)
            where = f"killed at operation {first}, then {second}"
            try:
                save = save_of(SparseDelta.from_pretrained(folder))
            except DeltaError as err:
                pytest.fail(f"{where}: the folder does not load: {err}")
            assert save == 2 if done_second else save in (0, 1, 2), where
            if done_first and not done_second:
                assert save in (1, 2), where  # not older than the last complete save
            make_delta(3).save_pretrained(folder)  # the next save cleans up after the kills
            assert save_of(SparseDelta.from_pretrained(folder)) == 3, where
            assert sorted(p.name for p in folder.iterdir()) == [TENSORS, CONFIG], where


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.csv")


def train_argv(model, task, out, *extra: str) -> list[str]:
    return part2_train_argv(model, task, out, "--budget", "5%", *extra)


def test_temporary_files_of_killed_saves_are_removed_and_not_counted(
    tiny_model_dir, tiny_csv, tmp_path
):
    out = tmp_path / "run"
    stale = [
        out / "delta" / f".{TENSORS}.0123456789abcdef.tmp",
        out / "delta" / "..delta.safetensors.previous.fedcba9876543210.tmp",
        out / "delta" / f".{CONFIG}.00112233aabbccdd.tmp",
    ]
    stale[0].parent.mkdir(parents=True)
    for path in stale:
        path.write_bytes(b"\0" * 100_000)  # what a killed save leaves
    assert main(train_argv(tiny_model_dir, tiny_csv, out, "--steps", "2")) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    files = sorted(p.name for p in (out / "delta").iterdir())
    assert files == [TENSORS, CONFIG]
    sizes = sum((out / "delta" / name).stat().st_size for name in files)
    assert report["delta_bytes"] == sizes


# ---------------------------------------------------------------- 3. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 1 MiB at tmp_path/disk (needs root, or skips)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip() or 'not root'}")
    yield mount
    gc.collect()  # a failed torch.save may keep its file open until collected
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_full_disk_while_saving_a_delta_raises_oserror_and_keeps_the_previous(small_disk):
    folder = small_disk / "delta"
    make_delta(1).save_pretrained(folder)
    with pytest.raises(OSError) as err:
        make_delta(2, weights=200_000).save_pretrained(folder)  # 1.6 MB: does not fit
    assert re.search(r"could not write .*delta\.safetensors", str(err.value)), str(err.value)
    assert re.search(r"disk may be full.*free some space", str(err.value)), str(err.value)
    assert save_of(SparseDelta.from_pretrained(folder)) == 1
    assert sorted(p.name for p in folder.iterdir()) == [TENSORS, CONFIG]


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous(small_disk):
    model = torch.nn.Linear(4, 4)
    opt = unmask.SelectiveOptimizer(model, method="full", budget=None, total_steps=2)
    path = small_disk / CHECKPOINT_FILE
    _save_checkpoint(path, model, opt, 1)
    before = path.read_bytes()
    free = os.statvfs(small_disk)
    with open(small_disk / "filler", "wb") as f:  # leave less room than a checkpoint needs
        try:
            f.write(b"\0" * (free.f_bavail * free.f_frsize - 4096))
        except OSError:
            pass
    with pytest.raises(OSError) as err:
        _save_checkpoint(path, model, opt, 2)
    assert re.search(r"could not write .*checkpoint\.pt.*disk may be full", str(err.value))
    assert path.read_bytes() == before
    assert not list(small_disk.glob(".*.tmp"))


def test_cli_train_onto_a_full_disk_exits_2(tiny_model_dir, tiny_csv, small_disk, capsys):
    free = os.statvfs(small_disk)
    with open(small_disk / "filler", "wb") as f:  # leaves a few pages: the log fits, not more
        try:
            f.write(b"\0" * (free.f_bavail * free.f_frsize - 3 * 4096))
        except OSError:
            pass
    out = small_disk / "run"
    code = main(train_argv(tiny_model_dir, tiny_csv, out, "--steps", "2", "--save-every", "1"))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert re.search(r"unmask: error: could not write .*checkpoint\.pt.*free some space", err), err


# ---------------------------------------------------------------- 4. bad checkpoints and options


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = train_argv(tiny_model_dir, tiny_csv, out, "--steps", "2", "--save-every", "1")
    assert main(argv) == EXIT_OK
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
    checkpointed_run, tiny_model_dir, tiny_csv, tmp_path, capsys, damage, what
):
    out = tmp_path / "run"
    out.mkdir()
    for name in (CHECKPOINT_FILE, "train_log.jsonl"):
        (out / name).write_bytes((checkpointed_run / name).read_bytes())
    damage(out / CHECKPOINT_FILE)
    code = main(train_argv(tiny_model_dir, tiny_csv, out, "--steps", "2", "--resume"))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert re.search(rf"--resume: checkpoint .*checkpoint\.pt {what}", err), err
    assert re.search(r"delete it and run without --resume", err), err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-length", "33"], r"--max-length 33 is more than the model's 32 positions"),
        (["--max-length", "-1"], r"--max-length must be a positive integer"),
        (["--epochs", "1e309"], r"--epochs must be a positive finite number, got inf"),
        (["--seed", str(2**64)], r"--seed must be an integer from -2\*\*63 to 2\*\*64 - 1"),
        (["--save-every", "-1"], r"--save-every must be an integer >= 0"),
    ],
    ids=["max-length-above-positions", "max-length-negative", "epochs-inf", "seed-2**64",
         "save-every-negative"],
)  # fmt: skip
def test_bad_train_options_exit_2_naming_the_option(
    tiny_model_dir, tiny_csv, tmp_path, capsys, flags, message
):
    code = main(train_argv(tiny_model_dir, tiny_csv, tmp_path / "run", *flags))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("job.yaml", "lr: 1e-2\n", r"lr \(--lr\) must be a number, got '1e-2' \(str\).*1\.0e-2"),
        ("job.toml", 'steps = "5"\n', r"steps \(--steps\) must be an integer or unset, got '5'"),
        ("job.toml", "batch_size = 2.5\n", r"batch_size \(--batch-size\) must be an integer"),
    ],
    ids=["yaml-lr-string", "toml-steps-string", "toml-batch-size-float"],
)
def test_config_values_of_the_wrong_type_exit_2(
    tiny_model_dir, tiny_csv, tmp_path, capsys, name, text, message
):
    (tmp_path / name).write_text(text)
    argv = train_argv(tiny_model_dir, tiny_csv, tmp_path / "run", "--config", str(tmp_path / name))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert re.search(message, err), err
