"""`unmask.store.delta_format`: a delta folder on disk is read only when every check passes, and is
never seen half written.

Each refusal is a `DeltaError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    DELTA_STEPS,
    assert_clear,
    make_bert,
    numbered_delta,
    save_of,
    train_argv,
    train_delta,
)
from safetensors.torch import load_file, save_file
from torch import nn

import unmask
import unmask.store.delta_format
from unmask import DeltaError, SparseDelta
from unmask.app.cli import EXIT_OK, main
from unmask.store.delta_format import CONFIG_FILE, TENSORS_FILE
from unmask.store.model_card import CARD_FILE

SAVED = sorted([CARD_FILE, TENSORS_FILE, CONFIG_FILE])  # what save_pretrained leaves in a folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rehash(folder: Path) -> None:
    """Make the config's tensors_sha256 match the (possibly tampered) tensors file."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["tensors_sha256"] = sha256(folder / TENSORS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.fixture(scope="module")
def saved_dense(bert_dense, tmp_path_factory):
    folder = tmp_path_factory.mktemp("delta") / "dense"
    bert_dense[1].save_pretrained(folder)
    return folder


@pytest.fixture
def tampered(saved_dense, tmp_path):
    """A private copy of a good saved delta, for tests that corrupt it."""
    folder = tmp_path / "copy"
    shutil.copytree(saved_dense, folder)
    return folder


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


# ---------------------------------------------------------------------------- not a regular file


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


# ------------------------------------------------------------------------ a load racing a save


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


# -------------------------------------------------------------------- saves killed at any point


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
            assert sorted(p.name for p in folder.iterdir()) == SAVED, where


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
    assert files == SAVED
    sizes = sum((out / "delta" / name).stat().st_size for name in files if name != CARD_FILE)
    assert report["delta_bytes"] == sizes


# ---------------------------------------------------------------------------- file size


def test_file_size_is_8_bytes_per_weight_plus_a_constant_per_tensor(tmp_path):
    """fp32: int32 index + fp32 value per weight; the rest is the safetensors header.

    The header holds, per sparse tensor, two JSON entries whose keys contain the parameter name
    ("name:indices", "name:values"), so we model
        size = 8 n + 2 * sum(len(name)) + c * k + c0
    (k tensors), fit c and c0 on two budgets and check a third against the fit.
    """
    measurements = []
    for budget in ("0.5%", "6%", "20%"):
        model = make_bert(0)
        _, delta = train_delta(model, budget=budget, dense=None)
        folder = tmp_path / budget
        delta.save_pretrained(folder)
        path = folder / TENSORS_FILE
        size = path.stat().st_size
        n = delta.num_weights
        # The data section alone is exactly 8 bytes per changed weight.
        assert size - 8 - header_length(path) == 8 * n
        for indices, values in delta.sparse.values():
            assert indices.dtype == torch.int32 and values.dtype == torch.float32
        names = 2 * sum(len(name) for name in delta.shapes)
        measurements.append((n, len(delta.shapes), size - 8 * n - names))

    (n1, k1, r1), (n2, k2, r2), (n3, k3, r3) = measurements
    assert n1 < n2 < n3
    assert k1 != k2, "the fit needs two budgets touching different numbers of tensors"
    c = (r2 - r1) / (k2 - k1)
    c0 = r1 - c * k1
    # A safetensors entry is {"dtype":"I32","shape":[n],"data_offsets":[a,b]} plus a
    # separator: about 65 bytes each, two per tensor, plus the 8-byte length and metadata.
    assert 0 < c <= 200, c
    assert abs(c0) <= 200, c0
    # The third budget: offsets and counts gain digits as n grows (<= 8 bytes per tensor),
    # and the header is padded to a multiple of 8.
    assert r3 <= c * k3 + c0 + 8 * k3 + 8, (r3, c, c0, k3)


# ---------------------------------------------------------------------------- files and config


def test_folder_holds_only_safetensors_and_json_without_pickle(bert_dense, tmp_path, monkeypatch):
    trained, delta, opt = bert_dense
    folder = tmp_path / "d"
    delta.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == SAVED

    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["tensors_sha256"] == sha256(folder / TENSORS_FILE)
    meta = config["metadata"]
    assert meta["method"] == "id3"
    assert meta["budget"] == opt.total_budget  # includes the dense head it charges
    assert meta["sparse_budget"] == opt.budget
    assert meta["budget"] - meta["sparse_budget"] == sum(v.numel() for v in delta.replace.values())
    assert meta["score_eps"] == 1e-3
    assert meta["score_exp"] == 1.0
    assert meta["total_steps"] == DELTA_STEPS
    assert meta["base_model"] == "tiny-random-bert"

    params = dict(trained.named_parameters())
    entries = {e["name"]: e for e in config["tensors"]}
    assert entries.keys() == delta.shapes.keys()
    for name, entry in entries.items():
        assert entry["shape"] == list(params[name].shape)
        assert entry["dtype"] == "float32"
        assert entry["kind"] == ("replace" if name in delta.replace else "sparse")
        assert entry["count"] == delta.allocation()[name]
    assert entries["classifier.weight"]["kind"] == "replace"
    assert sum(e["count"] for e in entries.values()) == config["num_weights"] == delta.num_weights

    # safetensors header: plain JSON naming only our tensors.
    raw = (folder / TENSORS_FILE).read_bytes()
    header = json.loads(raw[8 : 8 + header_length(folder / TENSORS_FILE)])
    assert set(header) - {"__metadata__"} == {
        *(f"{n}:indices" for n in delta.sparse),
        *(f"{n}:values" for n in delta.sparse),
        *(f"{n}:replace" for n in delta.replace),
    }

    # Loading must not unpickle anything.
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used while loading a delta")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = SparseDelta.from_pretrained(folder)
    assert loaded.metadata == meta


def test_metadata_records_score_settings(tmp_path):
    model = make_bert(0)
    _, delta = train_delta(model, score_eps=0.1, score_exp=2.0)
    delta.save_pretrained(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())["metadata"]
    assert (meta["score_eps"], meta["score_exp"]) == (0.1, 2.0)


# ---------------------------------------------------------------------------- corrupted files


def load(folder: Path) -> SparseDelta:
    """from_pretrained, failing the test on any exception other than DeltaError."""
    try:
        return SparseDelta.from_pretrained(folder)
    except DeltaError:
        raise
    except BaseException as err:  # every other type is a bug
        pytest.fail(f"from_pretrained raised {type(err).__name__}, not DeltaError: {err}")


def test_good_copy_loads(tampered, bert_dense):
    # Positive control for the corruption tests below.
    assert load(tampered).num_weights == bert_dense[1].num_weights


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -100, -1])
@pytest.mark.parametrize("matching_sha", [False, True], ids=["old-sha", "new-sha"])
def test_truncated_tensors_file(tampered, keep, matching_sha):
    data = (tampered / TENSORS_FILE).read_bytes()
    (tampered / TENSORS_FILE).write_bytes(data[:keep])
    if matching_sha:
        rehash(tampered)
    with pytest.raises(DeltaError):
        load(tampered)


@pytest.mark.parametrize("where", [3, 20, 200, -9, -1])
def test_flipped_byte_fails_the_checksum(tampered, where):
    data = bytearray((tampered / TENSORS_FILE).read_bytes())
    data[where] ^= 0x01
    (tampered / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(DeltaError, match=r"sha256 differs"):
        load(tampered)


def test_flipped_bytes_with_matching_checksum_never_escape_as_other_errors(tampered):
    """The checksum cannot catch a tampered pair; validation must still hold for each byte."""
    data = (tampered / TENSORS_FILE).read_bytes()
    header_end = 8 + header_length(tampered / TENSORS_FILE)
    positions = [*range(0, header_end, 11), *range(header_end, len(data), 37)]
    refused = 0
    for pos in positions:
        for mask in (0x01, 0xFF):
            flipped = bytearray(data)
            flipped[pos] ^= mask
            (tampered / TENSORS_FILE).write_bytes(bytes(flipped))
            rehash(tampered)
            try:
                load(tampered)
            except DeltaError:
                refused += 1
    assert refused > len(positions) // 2


def test_config_sha_mismatch(tampered):
    config = json.loads((tampered / CONFIG_FILE).read_text())
    config["tensors_sha256"] = hashlib.sha256(b"something else").hexdigest()
    (tampered / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"sha256 differs"):
        load(tampered)


@pytest.mark.parametrize(
    "field", ["format", "format_version", "tensors_sha256", "tensors", "metadata"]
)
def test_config_missing_top_level_field(tampered, field):
    config = json.loads((tampered / CONFIG_FILE).read_text())
    del config[field]
    (tampered / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DeltaError):
        load(tampered)


@pytest.mark.parametrize("field", ["name", "kind", "count", "shape", "dtype", "base_sha256"])
def test_config_entry_missing_field(tampered, field):
    config = json.loads((tampered / CONFIG_FILE).read_text())
    entry = next(e for e in config["tensors"] if e["kind"] == "sparse")
    del entry[field]
    (tampered / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DeltaError):
        load(tampered)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "dense"),
        ("count", -1),
        ("count", 10**9),
        ("count", "3"),
        ("shape", [-1, 32]),
        ("shape", "32x32"),
        ("dtype", "int32"),
        ("base_sha256", None),
    ],
)
def test_config_entry_bad_value(tampered, field, value):
    config = json.loads((tampered / CONFIG_FILE).read_text())
    entry = next(e for e in config["tensors"] if e["kind"] == "sparse")
    entry[field] = value
    (tampered / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DeltaError):
        load(tampered)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{not json", r"not valid JSON"),
        (b"\xff\xfe\x00garbage", r"not valid JSON"),
        (b"[1, 2, 3]", r"not an unmask delta config"),
        (b'{"format": "unmask.SparseDelta", "format_version": 99}', r"format_version 99"),
    ],
)
def test_config_not_a_delta_config(tampered, text, message):
    (tampered / CONFIG_FILE).write_bytes(text)
    with pytest.raises(DeltaError, match=message):
        load(tampered)


def test_config_listing_a_tensor_twice(tampered):
    config = json.loads((tampered / CONFIG_FILE).read_text())
    config["tensors"].append(config["tensors"][0])
    (tampered / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"listed twice"):
        load(tampered)


@pytest.mark.parametrize("missing", [TENSORS_FILE, CONFIG_FILE])
def test_missing_file(tampered, missing):
    (tampered / missing).unlink()
    with pytest.raises(DeltaError, match=r"not found"):
        load(tampered)


@pytest.mark.parametrize("case", ["deep-nesting", "huge-int", "dtype-list"])
def test_hostile_config_raises_delta_error(tampered, case):
    if case == "deep-nesting":
        (tampered / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    elif case == "huge-int":
        text = (tampered / CONFIG_FILE).read_text()
        (tampered / CONFIG_FILE).write_text(
            text.replace('"format_version": 1', '"format_version": 1' + "0" * 5000)
        )
    else:
        config = json.loads((tampered / CONFIG_FILE).read_text())
        config["tensors"][0]["dtype"] = ["float32"]
        (tampered / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DeltaError):
        load(tampered)


# ---------------------------------------------------------------------------- crafted files

SHAPE = [4, 4]


def write_crafted(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    entries: list[dict] | None = None,
) -> Path:
    """A delta folder built by hand: safetensors file plus a config with the right sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": "unmask.SparseDelta"})
    if entries is None:
        entries = [
            {
                "name": "w",
                "kind": "sparse",
                "count": int(tensors["w:indices"].numel()) if "w:indices" in tensors else 0,
                "shape": SHAPE,
                "dtype": "float32",
                "base_sha256": unmask.store.fingerprints.tensor_hash(torch.zeros(SHAPE)),
            }
        ]
    config = {
        "format": "unmask.SparseDelta",
        "format_version": 1,
        "tensors_sha256": sha256(folder / TENSORS_FILE),
        "num_weights": sum(e["count"] for e in entries),
        "tensors": entries,
        "metadata": {},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def sparse_tensors(indices, values=None, index_dtype=torch.int32, value_dtype=torch.float32):
    indices = torch.tensor(indices, dtype=index_dtype)
    if values is None:
        values = [0.5] * indices.numel()
    return {"w:indices": indices, "w:values": torch.tensor(values, dtype=value_dtype)}


def test_crafted_good_delta_loads_and_applies(tmp_path):
    folder = write_crafted(tmp_path / "d", sparse_tensors([1, 5, 15], [0.5, -1.0, 2.0]))
    delta = load(folder)
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(SHAPE))
    delta.apply_(model)
    expected = torch.zeros(16)
    expected[[1, 5, 15]] = torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(model.w.detach().view(-1), expected)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (sparse_tensors([5, 1, 7]), r"not strictly ascending"),
        (sparse_tensors([1, 1, 7]), r"not strictly ascending"),
        (sparse_tensors([1, 5, 16]), r"out of range"),
        (sparse_tensors([-1, 2, 3]), r"out of range"),
        (sparse_tensors([1, 2, 3], index_dtype=torch.int16), r"int32/int64"),
        (sparse_tensors([1, 2, 3], index_dtype=torch.float32), r"int32/int64"),
        (sparse_tensors([1, 2, 3], value_dtype=torch.int32), r"floating point"),
        (sparse_tensors([1, 2, 3], [0.5, math.nan, 1.0]), r"NaN or infinity"),
        (sparse_tensors([1, 2, 3], [0.5, math.inf, 1.0]), r"NaN or infinity"),
        (
            {"w:indices": torch.tensor([1, 2, 3], dtype=torch.int32), "w:values": torch.ones(2)},
            r"3 indices but 2 values",
        ),
        (
            {"w:indices": torch.tensor([[1, 2]], dtype=torch.int32), "w:values": torch.ones(2)},
            r"1-D",
        ),
        ({"w:indices": torch.tensor([1, 2, 3], dtype=torch.int32)}, r"lacks tensor w:values"),
        ({**sparse_tensors([1, 2]), "extra": torch.ones(1)}, r"does not list"),
    ],
    ids=[
        "descending",
        "duplicate",
        "past-end",
        "negative",
        "int16-indices",
        "float-indices",
        "int-values",
        "nan",
        "inf",
        "length-mismatch",
        "2d-indices",
        "missing-values",
        "extra-tensor",
    ],
)
def test_crafted_bad_sparse_entry(tmp_path, tensors, message):
    folder = write_crafted(tmp_path / "d", tensors)
    with pytest.raises(DeltaError, match=message):
        load(folder)


def test_crafted_count_mismatch(tmp_path):
    entries = [
        {
            "name": "w",
            "kind": "sparse",
            "count": 4,
            "shape": SHAPE,
            "dtype": "float32",
            "base_sha256": "0" * 32,
        }
    ]
    folder = write_crafted(tmp_path / "d", sparse_tensors([1, 2, 3]), entries)
    with pytest.raises(DeltaError, match=r"config says 4 weights, file has 3"):
        load(folder)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.ones(3, 4), r"has shape \(3, 4\), expected \(4, 4\)"),
        (torch.ones(4, 4).int(), "dtype"),
    ],
)
def test_crafted_bad_replaced_tensor(tmp_path, tensor, message):
    entries = [{"name": "w", "kind": "replace", "count": 16, "shape": SHAPE, "dtype": "float32"}]
    folder = write_crafted(tmp_path / "d", {"w:replace": tensor}, entries)
    with pytest.raises(DeltaError, match=message):
        load(folder)


# ---------------------------------------------------------------------------- atomic save


def test_failed_save_keeps_the_previous_delta(bert_dense, bert_sparse, tmp_path, monkeypatch):
    folder = tmp_path / "d"
    _, first, _ = bert_dense
    first.save_pretrained(folder)
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}

    real_save_file = unmask.store.delta_format.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(unmask.store.delta_format, "save_file", half_then_fail)
    _, second = bert_sparse
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(folder)

    assert {p.name: p.read_bytes() for p in folder.iterdir()} == saved  # no temp files left
    loaded = load(folder)
    assert loaded.replace.keys() == first.replace.keys()
    for name, (indices, values) in first.sparse.items():
        assert torch.equal(loaded.sparse[name][0], indices)
        assert torch.equal(loaded.sparse[name][1], values)


def test_save_interrupted_between_the_two_renames_keeps_the_previous_delta(
    bert_dense, bert_sparse, tmp_path, monkeypatch
):
    folder = tmp_path / "d"
    bert_dense[1].save_pretrained(folder)

    def crash(path, text):
        raise OSError("power cut")

    monkeypatch.setattr(unmask.store.delta_format, "atomic_write_text", crash)
    with pytest.raises(OSError, match="power cut"):
        bert_sparse[1].save_pretrained(folder)
    # New tensors file, old config: the kept copy of the old tensors pairs with the old config.
    loaded = load(folder)
    assert loaded.num_weights == bert_dense[1].num_weights and loaded.replace
    # Without that copy the mismatch is refused rather than paired up.
    (folder / unmask.store.delta_format.PREVIOUS_TENSORS_FILE).unlink()
    with pytest.raises(DeltaError, match=r"sha256 differs"):
        load(folder)


def test_save_overwrites_an_existing_delta(bert_dense, bert_sparse, tmp_path):
    folder = tmp_path / "d"
    bert_dense[1].save_pretrained(folder)
    bert_sparse[1].save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == SAVED
    loaded = load(folder)
    assert not loaded.replace
    assert loaded.num_weights == bert_sparse[1].num_weights


_SAVE_LOOP = """
import sys, torch
from unmask import SparseDelta
def make(value):
    idx = torch.arange(0, 20000, 2, dtype=torch.int32)
    return SparseDelta(sparse={"w": (idx, torch.full((10000,), value))}, replace={},
                       shapes={"w": (20000,)}, dtypes={"w": "float32"}, base_hashes={"w": "0"},
                       metadata={"value": value})
deltas = [make(1.0), make(2.0)]
i = 0
while True:
    deltas[i % 2].save_pretrained(sys.argv[1])
    i += 1
    if i == 1:
        print("saved", flush=True)
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_killed_save_leaves_a_loadable_delta(tmp_path, delay):
    """SIGKILL a process that saves deltas in a loop: the folder always loads, old or new."""
    folder = tmp_path / "d"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVE_LOOP, str(folder)], env=child_env(), stdout=subprocess.PIPE
    )
    assert proc.stdout.readline().strip() == b"saved"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    loaded = SparseDelta.from_pretrained(folder)
    value = loaded.metadata["value"]
    assert value in (1.0, 2.0)
    assert torch.equal(loaded.sparse["w"][1], torch.full((10000,), value))
