"""`unmask.store.files`: every file the package writes goes through `atomic_write`, so it
follows the process umask like a plain open(), no temporary file is left next to it, and a full
disk raises OSError naming the file with the previous file intact."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import numbered_delta, save_of, tiny_bert, train_argv

import unmask
from unmask import SparseDelta
from unmask.app import resources
from unmask.app.cli import EXIT_USAGE, main
from unmask.store.files import atomic_write, atomic_write_text

TENSORS, CONFIG = "delta.safetensors", "delta_config.json"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_atomic_write_follows_the_umask_like_open(tmp_path, mask):
    with umask(mask):
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


def test_saved_delta_files_follow_the_umask(trained_run, tmp_path):
    with umask(0o022):
        SparseDelta.from_pretrained(trained_run / "delta").save_pretrained(tmp_path / "delta")
    saved = sorted((tmp_path / "delta").iterdir())
    assert saved and all(mode(p) == 0o644 for p in saved), {p.name: oct(mode(p)) for p in saved}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_fetched_artifact_follows_the_umask(tmp_path, monkeypatch, mask):
    monkeypatch.setenv(resources.CACHE_ENV, str(tmp_path))
    data = b"wheel bytes"
    art = resources.Artifact(
        requirement="pkg==1.0",
        filename="pkg-1.0-py3-none-any.whl",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    monkeypatch.setitem(resources.ARTIFACTS, "pkg", art)

    def download(artifact: resources.Artifact, dest: Path) -> None:
        path = dest / artifact.filename
        path.write_bytes(data)
        os.chmod(path, 0o600)  # a downloader that keeps its files private

    monkeypatch.setattr(resources, "_pip_download", download)
    with umask(mask):
        target = resources.fetch("pkg")
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == [art.filename]


def test_inspect_plot_follows_the_umask(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    opt = unmask.SelectiveOptimizer(tiny_bert(), method="full", total_steps=1, lr=1e-3)
    opt.delta().save_pretrained(tmp_path / "delta")
    plot = tmp_path / "plots" / "budget.png"
    with umask(0o027):
        assert main(["inspect", str(tmp_path / "delta"), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(plot.stat().st_mode) == 0o640
    assert [p.name for p in plot.parent.iterdir()] == ["budget.png"]


# ---------------------------------------------------------------- a full disk


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
    numbered_delta(1).save_pretrained(folder)
    with pytest.raises(OSError) as err:
        numbered_delta(2, weights=200_000).save_pretrained(folder)  # 1.6 MB: does not fit
    assert re.search(r"could not write .*delta\.safetensors", str(err.value)), str(err.value)
    assert re.search(r"disk may be full.*free some space", str(err.value)), str(err.value)
    assert save_of(SparseDelta.from_pretrained(folder)) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", TENSORS, CONFIG]


def test_cli_train_onto_a_full_disk_exits_2(tiny_model_dir, reviews_csv, small_disk, capsys):
    free = os.statvfs(small_disk)
    with open(small_disk / "filler", "wb") as f:  # leaves a few pages: the log fits, not more
        try:
            f.write(b"\0" * (free.f_bavail * free.f_frsize - 3 * 4096))
        except OSError:
            pass
    out = small_disk / "run"
    flags = ["--budget", "5%", "--steps", "2", "--save-every", "1"]
    code = main(train_argv(tiny_model_dir, reviews_csv, out, *flags))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert re.search(r"unmask: error: could not write .*checkpoint.*free some space", err), err
