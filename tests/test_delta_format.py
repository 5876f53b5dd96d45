"""`unmask.delta_format`: a delta folder on disk is read only when every check passes, and is
never seen half written.

Each refusal is a `DeltaError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import assert_clear, numbered_delta, save_of, train_argv
from safetensors.torch import load_file, save_file

import unmask
from unmask import DeltaError, SparseDelta
from unmask.cli import EXIT_OK, main
from unmask.delta_format import CONFIG_FILE, TENSORS_FILE


def test_delta_file_with_nan_in_a_replaced_tensor(trained_delta, tmp_path):
    base, delta = trained_delta
    delta.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "delta.safetensors"))
    tensors["classifier.weight:replace"][0, 0] = math.nan
    save_file(
        tensors, str(tmp_path / "delta.safetensors"), metadata={"format": "unmask.SparseDelta"}
    )
    config = json.loads((tmp_path / "delta_config.json").read_text())
    config["tensors_sha256"] = hashlib.sha256(
        (tmp_path / "delta.safetensors").read_bytes()
    ).hexdigest()
    (tmp_path / "delta_config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"classifier\.weight.*NaN or infinity"):
        SparseDelta.from_pretrained(tmp_path)


def test_delta_config_over_the_size_limit(trained_delta, tmp_path):
    """A hostile delta_config.json is refused by its size, before it is parsed."""
    _, delta = trained_delta
    delta.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "delta_config.json").read_text())
    config["metadata"]["padding"] = "x" * (16 * 2**20)
    (tmp_path / "delta_config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"delta_config\.json is larger than 16777216 bytes"):
        SparseDelta.from_pretrained(tmp_path)


# ---------------------------------------------------------------- not a regular file


@pytest.fixture(scope="module")
def saved_delta(trained_delta, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("delta") / "d"
    trained_delta[1].save_pretrained(folder)
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


# ---------------------------------------------------------------- a load racing a save


def child_env() -> dict[str, str]:
    """The environment of a child Python that imports this `unmask`."""
    src = str(Path(unmask.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, *sys.path])}


# Saves `numbered_delta(2)`, `(3)`, ... into a folder until a stop file appears.
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
    numbered_delta(1, weights).save_pretrained(folder)
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


# ---------------------------------------------------------------- saves killed at any point


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
            numbered_delta(save).save_pretrained(folder)
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
            numbered_delta(0).save_pretrained(folder)
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
            numbered_delta(3).save_pretrained(folder)  # the next save cleans up after the kills
            assert save_of(SparseDelta.from_pretrained(folder)) == 3, where
            assert sorted(p.name for p in folder.iterdir()) == [TENSORS_FILE, CONFIG_FILE], where


def test_temporary_files_of_killed_saves_are_removed_and_not_counted(
    tiny_model_dir, reviews_csv, tmp_path
):
    out = tmp_path / "run"
    stale = [
        out / "delta" / f".{TENSORS_FILE}.0123456789abcdef.tmp",
        out / "delta" / "..delta.safetensors.previous.fedcba9876543210.tmp",
        out / "delta" / f".{CONFIG_FILE}.00112233aabbccdd.tmp",
    ]
    stale[0].parent.mkdir(parents=True)
    for path in stale:
        path.write_bytes(b"\0" * 100_000)  # what a killed save leaves
    flags = ["--budget", "5%", "--steps", "2"]
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    files = sorted(p.name for p in (out / "delta").iterdir())
    assert files == [TENSORS_FILE, CONFIG_FILE]
    sizes = sum((out / "delta" / name).stat().st_size for name in files)
    assert report["delta_bytes"] == sizes
